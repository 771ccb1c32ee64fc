"""DiT's Gaussian diffusion (facebookresearch/DiT ``diffusion/``, itself from OpenAI's ADM / improved DDPM).

The one DDPM in the zoo, shared by DiT, LiT, DyDi-LiT and TexTok's DiT. It is generic over the
network: every function takes ``model_fn(x_t, t) -> output`` where

* ``x_t`` is (batch, height, width, channels) (or any (batch, ..., channels) layout; the channel
  axis is last and every mean is over all non-batch axes),
* ``t`` is (batch,) int32 **original** timesteps 0..999 (``timestep_map[t]`` of a respaced
  diffusion, as upstream's ``_WrappedModel``: the network never sees a respaced index),
* ``output`` is eps (channels C), or [eps, v] (channels 2C) for ``LEARNED_RANGE`` variance, where
  v in [-1, 1] interpolates the log variance between ``log beta_t`` (v = 1) and the clipped
  posterior log variance (v = -1).

What upstream fixes and this file keeps (``diffusion/__init__.py`` ``create_diffusion``):
linear betas 1e-4..0.02 over 1000 steps (float64 numpy; coefficients cast to float32 before any
per-sample math, as ``_extract_into_tensor``), epsilon prediction, ``LEARNED_RANGE`` variance,
loss ``MSE`` = L_simple + L_vlb (no 1/1000 rescale) where L_vlb sees the eps half stop-gradient'ed
(it trains the variance only), respacing strings (``"250"``, ``"10,15,20"``, ``"ddim50"``).

API:
  ``create_diffusion(timestep_respacing, ...) -> GaussianDiffusion`` (a frozen dataclass of schedule
  arrays). Methods: ``q_sample``, ``q_posterior_mean_variance``, ``p_mean_variance``,
  ``training_losses``, ``p_sample``, ``ddim_sample``, ``p_sample_loop``, ``ddim_sample_loop``.
  ``classifier_free_guidance(model_fn, cfg_scale, cfg_channels)`` wraps a conditional network as
  upstream ``forward_with_cfg``: the batch is [cond; uncond] with labels [y; null], the network sees
  the first half of x twice, and only the first ``cfg_channels`` output channels are guided (DiT and
  SiT guide 3 of 4 latent channels "for exact reproducibility"; the variance channels are unguided).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

MODEL_VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")


# ----------------------------------------------------------------------------- schedules


def linear_betas(num_diffusion_timesteps: int = 1000) -> np.ndarray:
    """ADM's "linear" schedule: betas 1e-4..0.02, scaled for step counts other than 1000 (float64)."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def cosine_betas(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's "squaredcos_cap_v2" schedule (selectable; DiT uses linear)."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_diffusion_timesteps
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Which original steps a respaced diffusion keeps (upstream ``respace.space_timesteps``).

    ``"ddimN"``: the smallest integer stride giving exactly N steps of ``range(0, T, stride)``.
    ``"a,b,c"`` (or a list): T split into equal sections (the first T % len ones one step longer),
    section i strided to ``a``/``b``/... steps with Python's round (half to even) of an accumulated
    fractional index, as upstream.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing={section_counts!r}: cannot take exactly {desired} steps "
                             f"with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += frac_stride
        start += size
    return set(steps)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A (possibly respaced) DDPM: float64 numpy schedule arrays indexed by the diffusion's own t.

    ``timestep_map[t]`` is the original timestep the network is called with.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    model_var_type: str = "learned_range"

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if self.model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"model_var_type={self.model_var_type!r}: must be one of {MODEL_VAR_TYPES}")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        d = dict(
            alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            # posterior variance is 0 at t = 0: its log is clipped to the value at t = 1 (upstream).
            posterior_log_variance_clipped=(np.log(np.append(post_var[1], post_var[1:]))
                                            if len(post_var) > 1 else np.array([])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            log_betas=np.log(betas),
        )
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timestep_map", np.asarray(self.timestep_map, np.int64))
        for k, v in d.items():
            object.__setattr__(self, k, v)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type == "learned_range"

    # ------------------------------------------------------------------ helpers
    def _extract(self, name_or_array, t, ndim):
        """arr[t] cast to float32 (upstream's ``_extract_into_tensor``), shaped (B, 1, ..., 1)."""
        arr = getattr(self, name_or_array) if isinstance(name_or_array, str) else name_or_array
        out = jnp.asarray(np.asarray(arr, np.float64).astype(np.float32))[t]
        return out.reshape(out.shape + (1,) * (ndim - 1))

    def _wrap(self, model_fn: ModelFn) -> ModelFn:
        """Call the network with original timesteps (respace.py ``_WrappedModel``)."""
        tmap = jnp.asarray(self.timestep_map.astype(np.int32))
        return lambda x, t: model_fn(x, tmap[t])

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        n = x_start.ndim
        return (self._extract("sqrt_alphas_cumprod", t, n) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = self._extract("posterior_mean_coef1", t, n) * x_start + self._extract(
            "posterior_mean_coef2", t, n) * x_t
        return (mean, self._extract("posterior_variance", t, n),
                self._extract("posterior_log_variance_clipped", t, n))

    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, n) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, n)

    # ------------------------------------------------------------------ reverse process
    def split_output(self, model_output, channels: int):
        """(eps, v or None) from the network output's channel axis."""
        if self.learn_sigma:
            if model_output.shape[-1] != 2 * channels:
                raise ValueError(f"learned_range variance needs {2 * channels} output channels, got "
                                 f"{model_output.shape[-1]}")
            return model_output[..., :channels], model_output[..., channels:]
        return model_output[..., :channels], None

    def log_variance(self, var_values, t, ndim, shape):
        """Model log variance: LEARNED_RANGE interpolation, or fixed small/large."""
        if self.model_var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, ndim)
            max_log = self._extract("log_betas", t, ndim)
            frac = (var_values + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        if self.model_var_type == "fixed_large":
            # ADM: betas, with the first entry replaced by the posterior variance at t = 1.
            arr = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
        else:
            arr = self.posterior_log_variance_clipped
        return jnp.broadcast_to(self._extract(arr, t, ndim), shape)

    def p_mean_variance(self, model_fn: ModelFn, x, t, *, clip_denoised: bool = True, _raw_output=None):
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart). t: this diffusion's indices."""
        out = self._wrap(model_fn)(x, t) if _raw_output is None else _raw_output
        eps, var_values = self.split_output(out, x.shape[-1])
        log_var = self.log_variance(var_values, t, x.ndim, x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": jnp.exp(log_var), "log_variance": log_var,
                "pred_xstart": pred_xstart, "eps": eps}

    def p_sample(self, model_fn: ModelFn, x, t, noise, *, clip_denoised: bool = False):
        """One ancestral step: mean + (t != 0) exp(log_var / 2) noise. Returns dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return {"sample": out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x, t, noise, *, eta: float = 0.0, clip_denoised: bool = False):
        """One DDIM step (Song et al. Eq. 12), eps re-derived from the (possibly clipped) x_0."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x.ndim)
        abar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
        mean_pred = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model_fn, rng, x_T, **kw):
        """Steps T-1 .. 0 under lax.scan, a fresh noise draw per step."""
        keys = jax.random.split(rng, self.num_timesteps)
        ts = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)

        def body(x, xs):
            i, key = xs
            t = jnp.full((x.shape[0],), i, jnp.int32)
            return step(model_fn, x, t, jax.random.normal(key, x.shape, x.dtype), **kw)["sample"], None

        x, _ = jax.lax.scan(body, x_T, (ts, keys))
        return x

    def p_sample_loop(self, model_fn: ModelFn, rng, x_T, *, clip_denoised: bool = False):
        """Ancestral sampling from x_T (upstream ``p_sample_loop``; DiT passes clip_denoised=False)."""
        return self._loop(self.p_sample, model_fn, rng, x_T, clip_denoised=clip_denoised)

    def ddim_sample_loop(self, model_fn: ModelFn, rng, x_T, *, eta: float = 0.0, clip_denoised: bool = False):
        return self._loop(self.ddim_sample, model_fn, rng, x_T, eta=eta, clip_denoised=clip_denoised)

    # ------------------------------------------------------------------ training
    def vb_terms_bpd(self, x_start, x_t, t, model_output, *, clip_denoised: bool = False):
        """L_vlb term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=clip_denoised, _raw_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"])) / np.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise, *, model_output=None):
        """Per-sample dict(loss, mse, vb, model_output) for this diffusion's t (upstream ``MSE`` loss type).

        ``model_output``: an already computed ``model_fn(q_sample(x_start, t, noise), timestep_map[t])``
        (methods that reuse the output, e.g. LiT's distillation); otherwise the network is called here.
        """
        x_t = self.q_sample(x_start, t, noise)
        out = self._wrap(model_fn)(x_t, t) if model_output is None else model_output
        eps, var_values = self.split_output(out, x_start.shape[-1])
        terms = {"mse": mean_flat(jnp.square(noise - eps)), "model_output": out}
        if self.learn_sigma:
            # The vlb trains only the variance: the mean (eps) is frozen (upstream ``frozen_out``).
            frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
            terms["vb"] = self.vb_terms_bpd(x_start, x_t, t, frozen)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


def create_diffusion(timestep_respacing: str | list[int] = "", *, noise_schedule: str = "linear",
                     diffusion_steps: int = 1000, learn_sigma: bool = True,
                     sigma_small: bool = False) -> GaussianDiffusion:
    """DiT's ``create_diffusion``: "" = all ``diffusion_steps`` steps; "250", "ddim50", "10,15,20" respace."""
    if noise_schedule == "linear":
        base = linear_betas(diffusion_steps)
    elif noise_schedule == "squaredcos_cap_v2":
        base = cosine_betas(diffusion_steps)
    else:
        raise ValueError(f"noise_schedule={noise_schedule!r}: must be 'linear' or 'squaredcos_cap_v2'")
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    use = space_timesteps(diffusion_steps, timestep_respacing)
    # SpacedDiffusion: new betas from the kept steps' cumulative alphas.
    ac = np.cumprod(1.0 - base)
    last, betas, tmap = 1.0, [], []
    for i, a in enumerate(ac):
        if i in use:
            betas.append(1 - a / last)
            last = a
            tmap.append(i)
    var = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    return GaussianDiffusion(np.array(betas), np.array(tmap), var)


def classifier_free_guidance(model_fn: ModelFn, cfg_scale: float, cfg_channels: int | None) -> ModelFn:
    """Upstream ``forward_with_cfg`` for a [cond; uncond] batch (labels bound inside ``model_fn``).

    The network sees the first half of x twice; ``eps[:cfg_channels]`` of both halves becomes
    uncond + s (cond - uncond); the remaining channels (eps beyond ``cfg_channels``, and the
    variance) come from each half's own output. ``cfg_channels=None`` guides every eps channel.
    """

    def guided(x, t):
        half = x[: x.shape[0] // 2]
        out = model_fn(jnp.concatenate([half, half], axis=0), t)
        k = out.shape[-1] if cfg_channels is None else cfg_channels
        eps, rest = out[..., :k], out[..., k:]
        cond, uncond = jnp.split(eps, 2, axis=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)

    return guided


# ----------------------------------------------------------------------------- losses


def mean_flat(x):
    """Mean over every non-batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] discretised to 256 bins (bin width 2/255), edge bins open-ended."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))

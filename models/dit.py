"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") trained by flow matching (SiT).

Network as facebookresearch/DiT ``models.py``: patch embedding, fixed 2-D sin-cos
positions, timestep + label embedders (label row ``num_classes`` is the null
class), adaLN-Zero blocks, final adaLN layer. Objective as SiT (Ma et al.):
linear interpolant x_t = t * x_data + (1 - t) * noise, the network predicts the
velocity x_data - noise, labels dropped to the null class with probability 0.1.
Sampler: Euler or Heun ODE from t = 0 (noise) to t = 1 (data) with
classifier-free guidance on the velocity.

Layout: images (batch, height, width, channels); tokens row-major over the patch grid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import diffusion as diffusion_lib
from models import layers
from trainers.method import Method


class DiTBlock(nnx.Module):
    """adaLN-Zero block: attention and MLP, each modulated (shift, scale) and gated by the condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype,
                 attention: Callable | None = None):
        # ``attention(hidden_size, num_heads, rngs=, dtype=)``: the token mixer (LiT / DyDi-LiT swap it).
        self.attn = (attention or layers.Attention)(hidden_size, num_heads, rngs=rngs, dtype=dtype)
        self.mlp = layers.Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs, dtype=dtype)
        # adaLN-Zero: the modulation starts at zero so each block starts as the identity.
        self.adaLN_modulation = layers.dense(hidden_size, 6 * hidden_size, ("embed", "mlp"),
                                             kernel_init=layers.zeros, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        x = layers.grad_fusion_barrier(x)  # XLA:CPU: materialise the residual gradient (3x faster step)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
        x = x + gate_msa[:, None] * self.attn(layers.modulate(layers.layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(layers.modulate(layers.layer_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) then a linear map to p*p*out_channels per token; zero-initialised."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs, dtype):
        self.adaLN_modulation = layers.dense(hidden_size, 2 * hidden_size, ("embed", "mlp"),
                                             kernel_init=layers.zeros, rngs=rngs, dtype=dtype)
        self.linear = layers.dense(hidden_size, patch_size * patch_size * out_channels, ("embed", None),
                                   kernel_init=layers.zeros, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(layers.modulate(layers.layer_norm(x), shift, scale))


class DiT(nnx.Module):
    """The DiT network: (x (B, H, W, C), t (B,), y (B,)) -> (B, H, W, out_channels)."""

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, remat: bool = False, rngs: nnx.Rngs,
                 dtype=jnp.float32, attention: Callable | None = None, attention_impl: str = "xla"):
        """``attention_impl``: the softmax-attention kernel of the default token mixer (layers.ATTENTION_IMPLS;
        "xla" is the float32 reference); ignored when ``attention`` (LiT's mixers) is given."""
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.patch_size = patch_size
        self.remat = remat  # recompute each block in the backward pass (memory; see benchmarks/train_step.py)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.x_embedder = layers.conv(in_channels, hidden_size, patch_size, strides=patch_size, padding="VALID",
                                      out_name="embed", kernel_init=layers.xavier_uniform, rngs=rngs, dtype=dtype)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs=rngs, dtype=dtype)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        grid = input_size // patch_size
        # Fixed, not trained (upstream: nn.Parameter with requires_grad=False).
        self.pos_embed = nnx.Variable(jnp.asarray(layers.get_2d_sincos_pos_embed(hidden_size, grid))[None])
        if attention is None:
            attention = functools.partial(layers.Attention, attention_impl=attention_impl)
        self.blocks = nnx.List([DiTBlock(hidden_size, num_heads, mlp_ratio, rngs=rngs, dtype=dtype,
                                         attention=attention) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """``cond``: optional extra (B, hidden) conditioning added to t_emb + y_emb (MeanFlow's h embedding)."""
        from trainers.sharding import constrain

        h = self.x_embedder(x.astype(self.x_embedder.dtype))
        b, gh, gw, d = h.shape
        h = h.reshape(b, gh * gw, d) + self.pos_embed[...].astype(h.dtype)
        h = constrain(h, ("act_batch", "act_len", "act_embed"))
        c = self.t_embedder(t) + self.y_embedder(y)
        if cond is not None:
            c = c + cond
        apply = nnx.remat(lambda block, h, c: block(h, c)) if self.remat else (lambda block, h, c: block(h, c))
        for block in self.blocks:
            h = apply(block, h, c)
        h = self.final_layer(h, c)
        return layers.unpatchify(h, self.patch_size, self.out_channels).astype(jnp.float32)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float) -> jax.Array:
        """Upstream's guided forward, kept for parity: the batch is [cond; uncond] with x[:B/2] used
        for both halves, and (as upstream) only the first 3 channels are guided."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        eps, rest = out[..., :3], out[..., 3:]
        cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)


def build_network(model_config, rngs: nnx.Rngs, dtype=jnp.float32, attention: Callable | None = None) -> DiT:
    return DiT(input_size=model_config.input_size, patch_size=model_config.patch_size,
               in_channels=model_config.in_channels, hidden_size=model_config.hidden_size,
               depth=model_config.depth, num_heads=model_config.num_heads, mlp_ratio=model_config.mlp_ratio,
               class_dropout_prob=model_config.class_dropout_prob, num_classes=model_config.num_classes,
               learn_sigma=model_config.learn_sigma, remat=model_config.get("remat", False), rngs=rngs,
               dtype=dtype, attention=attention, attention_impl=model_config.get("attention_impl", "xla"))


OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("sde", "dopri5", "euler", "heun")}


def training_diffusion(config) -> diffusion_lib.GaussianDiffusion:
    """DiT's training diffusion: all ``config.diffusion.diffusion_steps`` steps (no respacing)."""
    d = config.diffusion
    return diffusion_lib.create_diffusion("", noise_schedule=d.noise_schedule, diffusion_steps=d.diffusion_steps,
                                          learn_sigma=config.model.learn_sigma)


def sampling_diffusion(config, method: str, num_steps: int) -> diffusion_lib.GaussianDiffusion:
    """Respaced diffusion for sampling: ``config.sample.timestep_respacing`` if set, else "N" (ddpm) or
    "ddimN" (ddim) from the step count, as DiT's sample.py (``create_diffusion(str(num_steps))``)."""
    d = config.diffusion
    respacing = config.sample.get("timestep_respacing", "") or (
        f"ddim{num_steps}" if method == "ddim" else str(num_steps))
    return diffusion_lib.create_diffusion(respacing, noise_schedule=d.noise_schedule,
                                          diffusion_steps=d.diffusion_steps, learn_sigma=config.model.learn_sigma)


class DiTMethod(Method):
    """DiT with either objective (``config.model.objective``):

    * ``ddpm`` (DiT): Gaussian diffusion of ``models/diffusion.py``; eps prediction with learned-range
      variance, L_simple + L_vlb, integer timesteps 0..999 into the t-embedder; ancestral (``ddpm``) or
      DDIM sampling on a respaced schedule (DiT: 250 steps, cfg 1.5 for FID).
    * ``flow`` (SiT, Ma et al.): linear interpolant x_t = t x_data + (1 - t) noise, velocity target
      x_data - noise, t ~ U(0, 1); SiT's samplers: Euler-Maruyama SDE (``sde``; diffusion form "sigma",
      last step "Mean" of 0.04, 250 steps), adaptive ``dopri5`` ODE (atol 1e-6, rtol 1e-3) or a fixed-step
      ``euler`` / ``heun`` ODE. Step counts as SiT: ``linspace(t0, t1, num_steps)``, so a fixed-step solver
      takes ``num_steps - 1`` steps.

    Guidance as upstream ``forward_with_cfg``: a [cond; null] batch, only the first
    ``config.sample.cfg_channels`` output channels guided (eps for DiT, velocity for SiT).
    """

    def validate_config(self, config) -> None:
        m = config.model
        if m.input_size % m.patch_size:
            raise ValueError(f"config.model.input_size={m.input_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}")
        if m.hidden_size % m.num_heads:
            raise ValueError(f"config.model.hidden_size={m.hidden_size} is not divisible by "
                             f"config.model.num_heads={m.num_heads}")
        if m.get("attention_impl", "xla") not in layers.ATTENTION_IMPLS:
            raise ValueError(f"config.model.attention_impl={m.attention_impl!r}: must be one of "
                             f"{layers.ATTENTION_IMPLS}")
        objective = m.get("objective", "flow")
        if objective not in OBJECTIVES:
            raise ValueError(f"config.model.objective={objective!r}: must be one of {OBJECTIVES}")
        if config.sample.method not in SAMPLERS[objective]:
            raise ValueError(f"config.sample.method={config.sample.method!r}: objective {objective!r} samples "
                             f"with one of {SAMPLERS[objective]}")
        if objective == "ddpm":
            d = config.get("diffusion")
            if d is None:
                raise ValueError("config.diffusion (noise_schedule, diffusion_steps) is required for "
                                 "config.model.objective='ddpm'")
            if d.noise_schedule not in ("linear", "squaredcos_cap_v2"):
                raise ValueError(f"config.diffusion.noise_schedule={d.noise_schedule!r}: must be 'linear' or "
                                 "'squaredcos_cap_v2'")
            try:
                sampling_diffusion(config, config.sample.method, config.sample.num_steps)
            except ValueError as e:
                raise ValueError(f"config.sample.timestep_respacing / num_steps: {e}") from None
        if config.sample.get("cfg_channels", 0) < 0:
            raise ValueError(f"config.sample.cfg_channels={config.sample.cfg_channels}: must be >= 0 "
                             "(0 guides every channel)")

    @property
    def objective(self) -> str:
        return self.config.model.get("objective", "flow")

    def create_model(self, rngs: nnx.Rngs) -> DiT:
        return build_network(self.config.model, rngs, jnp.dtype(self.config.compute_dtype))

    # ------------------------------------------------------------------ objectives
    def velocity(self, model: DiT, x_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """v(x_t, t, y): the first ``in_channels`` output channels (SiT drops the sigma half)."""
        return model(x_t, t, labels)[..., : model.in_channels]

    def loss(self, model: DiT, batch, rng):
        x_data = batch["latent"] if "latent" in batch else batch["image"]
        rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
        labels = model.y_embedder.drop_labels(batch["label"], rng_drop)
        noise = jax.random.normal(rng_noise, x_data.shape)
        if self.objective == "ddpm":
            return self.ddpm_loss(model, x_data, labels, rng_t, noise)
        t = jax.random.uniform(rng_t, (x_data.shape[0],))
        t_ = t[:, None, None, None]
        x_t = t_ * x_data + (1 - t_) * noise  # SiT linear path: alpha_t = t, sigma_t = 1 - t
        target = x_data - noise  # d/dt x_t
        v = self.velocity(model, x_t, t, labels)
        loss = jnp.mean(jnp.square(v - target))
        return loss, {"loss": loss}

    def ddpm_loss(self, model: DiT, x_data, labels, rng_t, noise):
        """DiT train.py: t ~ U{0..T-1}; loss = mean over the batch of L_simple + L_vlb."""
        diffusion = training_diffusion(self.config)
        t = jax.random.randint(rng_t, (x_data.shape[0],), 0, diffusion.num_timesteps)
        terms = diffusion.training_losses(lambda x, tt: model(x, tt, labels), x_data, t, noise)
        loss = jnp.mean(terms["loss"])
        metrics = {"loss": loss, "mse": jnp.mean(terms["mse"])}
        if "vb" in terms:
            metrics["vb"] = jnp.mean(terms["vb"])
        return loss, metrics

    # ------------------------------------------------------------------ samplers
    def sample_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of a batch of samples (subclasses on other layouts override it, e.g. 1D tokens)."""
        m = self.config.model
        return (batch, m.input_size, m.input_size, m.in_channels)

    def sample(self, model: DiT, rng: jax.Array, labels: jax.Array, *, num_steps: int | None = None,
               cfg_scale: float | None = None, method: str | None = None) -> jax.Array:
        """Class-conditional samples (B, H, W, C) in the data's range (latents for a latent config)."""
        s = self.config.sample
        num_steps = num_steps or s.num_steps
        cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
        method = method or s.method
        if method not in SAMPLERS[self.objective]:
            raise ValueError(f"sampler {method!r} does not fit objective {self.objective!r} "
                             f"(one of {SAMPLERS[self.objective]})")
        m = self.config.model
        rng_init, rng_loop = jax.random.split(rng)
        x = jax.random.normal(rng_init, self.sample_shape(labels.shape[0]))
        guided = cfg_scale > 1.0  # upstream samples without the null half at cfg <= 1
        if guided:  # upstream layout: z = cat([z, z]), y = cat([y, null]); keep the first half at the end
            x = jnp.concatenate([x, x])
            labels = jnp.concatenate([labels, jnp.full_like(labels, m.num_classes)])
        net = ((lambda x, t: model(x, t, labels)) if self.objective == "ddpm"
               else (lambda x, t: self.velocity(model, x, t, labels)))
        if guided:
            net = diffusion_lib.classifier_free_guidance(net, cfg_scale, s.get("cfg_channels", 3) or None)
        if self.objective == "ddpm":
            diffusion = sampling_diffusion(self.config, method, num_steps)
            clip = s.get("clip_denoised", False)
            if method == "ddpm":
                out = diffusion.p_sample_loop(net, rng_loop, x, clip_denoised=clip)
            else:
                out = diffusion.ddim_sample_loop(net, rng_loop, x, eta=s.get("ddim_eta", 0.0), clip_denoised=clip)
        elif method == "sde":
            out = sit_sde_sample(net, rng_loop, x, num_steps=num_steps,
                                 last_step=s.get("sde_last_step", "Mean"),
                                 last_step_size=s.get("sde_last_step_size", 0.04),
                                 diffusion_form=s.get("sde_diffusion_form", "sigma"),
                                 diffusion_norm=s.get("sde_diffusion_norm", 1.0))
        else:
            out = sit_ode_sample(net, x, method=method, num_steps=num_steps, atol=s.get("atol", 1e-6),
                                 rtol=s.get("rtol", 1e-3))
        return out[: out.shape[0] // 2] if guided else out


# ----------------------------------------------------------------------------- SiT samplers
# willisma/SiT transport/ for the Linear path with a velocity model: alpha_t = t, sigma_t = 1 - t,
# noise at t = 0, data at t = 1; train_eps = sample_eps = 0.


def sit_score(v, x, t):
    """Score from velocity (SiT ``get_score_from_velocity``, Linear path): (t v - x) / (1 - t)."""
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return (t * v - x) / (1 - t)


def sit_diffusion_coefficient(t, form: str, norm: float):
    """SiT ``compute_diffusion`` w(t) for the Linear path; the SDE noise scale is sqrt(2 w(t))."""
    forms = {"constant": lambda: jnp.full_like(t, norm), "sigma": lambda: norm * (1 - t),
             "linear": lambda: norm * (1 - t),
             "decreasing": lambda: 0.25 * (norm * jnp.cos(jnp.pi * t) + 1) ** 2,
             "increasing-decreasing": lambda: norm * jnp.sin(jnp.pi * t) ** 2}
    if form not in forms:
        raise ValueError(f"config.sample.sde_diffusion_form={form!r}: one of {sorted(forms)}")
    return forms[form]()


def sit_sde_sample(velocity, rng, x, *, num_steps: int = 250, last_step: str = "Mean",
                   last_step_size: float = 0.04, diffusion_form: str = "sigma", diffusion_norm: float = 1.0):
    """SiT ``sample_sde``: Euler-Maruyama on ``linspace(0, 1 - last_step_size, num_steps)`` (num_steps - 1
    stochastic steps) with drift v + w(t) s(x, t) and noise sqrt(2 w(t) dt), then one deterministic last
    step to t = 1: "Mean" (x + drift * size), "Euler" (x + v * size) or "none"."""
    if last_step not in ("Mean", "Euler", "none"):
        raise ValueError(f"config.sample.sde_last_step={last_step!r}: one of 'Mean', 'Euler', 'none'")
    t1 = 1.0 - (last_step_size if last_step != "none" else 0.0)
    ts = jnp.linspace(0.0, t1, num_steps)
    dt = ts[1] - ts[0]

    def drift(x, t):
        tb = jnp.full((x.shape[0],), t)
        v = velocity(x, tb)
        return v + sit_diffusion_coefficient(t, diffusion_form, diffusion_norm) * sit_score(v, x, tb), v

    def step(x, xs):
        t, key = xs
        d, _ = drift(x, t)
        w = sit_diffusion_coefficient(t, diffusion_form, diffusion_norm)
        return x + d * dt + jnp.sqrt(2 * w) * jnp.sqrt(dt) * jax.random.normal(key, x.shape, x.dtype), None

    x, _ = jax.lax.scan(step, x, (ts[:-1], jax.random.split(rng, num_steps - 1)))
    if last_step == "none":
        return x
    d, v = drift(x, t1)
    return x + (d if last_step == "Mean" else v) * last_step_size


def sit_ode_sample(velocity, x, *, method: str = "dopri5", num_steps: int = 250, atol: float = 1e-6,
                   rtol: float = 1e-3):
    """SiT ``sample_ode`` from t = 0 to 1 with diffrax: adaptive ``dopri5`` (PID step control, atol/rtol
    as SiT), or fixed-step ``euler`` / ``heun`` on ``linspace(0, 1, num_steps)``."""
    import diffrax

    term = diffrax.ODETerm(lambda t, y, args: velocity(y, jnp.full((y.shape[0],), t, y.dtype)))
    if method == "dopri5":
        solver, controller, dt0 = diffrax.Dopri5(), diffrax.PIDController(rtol=rtol, atol=atol), None
    elif method in ("euler", "heun"):
        solver = diffrax.Euler() if method == "euler" else diffrax.Heun()
        controller, dt0 = diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, num_steps)), None
    else:
        raise ValueError(f"ODE method {method!r}: one of 'dopri5', 'euler', 'heun'")
    sol = diffrax.diffeqsolve(term, solver, t0=0.0, t1=1.0, dt0=dt0, y0=x, stepsize_controller=controller,
                              saveat=diffrax.SaveAt(t1=True), max_steps=max(4096, num_steps))
    return sol.ys[0]



# ----------------------------------------------------------------------------- conversion
# Upstream layout (DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt): torch state_dict, Linear (out, in),
# Conv (out, in, kh, kw).

def _linear(sd, prefix):
    return {"kernel": np.asarray(sd[prefix + ".weight"]).T, "bias": np.asarray(sd[prefix + ".bias"])}


def params_from_torch(sd: dict[str, np.ndarray], depth: int) -> dict:
    """Pure-dict params of :class:`DiT` from an upstream DiT/SiT state_dict."""
    params = {
        "x_embedder": {"kernel": np.asarray(sd["x_embedder.proj.weight"]).transpose(2, 3, 1, 0),
                       "bias": np.asarray(sd["x_embedder.proj.bias"])},
        "t_embedder": {"linear_1": _linear(sd, "t_embedder.mlp.0"), "linear_2": _linear(sd, "t_embedder.mlp.2")},
        "y_embedder": {"embedding": {"embedding": np.asarray(sd["y_embedder.embedding_table.weight"])}},
        "blocks": {},
        "final_layer": {"adaLN_modulation": _linear(sd, "final_layer.adaLN_modulation.1"),
                        "linear": _linear(sd, "final_layer.linear")},
    }
    for i in range(depth):
        p = f"blocks.{i}"
        params["blocks"][i] = {
            "attn": {"qkv": _linear(sd, p + ".attn.qkv"), "proj": _linear(sd, p + ".attn.proj")},
            "mlp": {"fc1": _linear(sd, p + ".mlp.fc1"), "fc2": _linear(sd, p + ".mlp.fc2")},
            "adaLN_modulation": _linear(sd, p + ".adaLN_modulation.1"),
        }
    return params


def _depth_of(sd) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def _check_pos_embed(sd, model: DiT):
    if "pos_embed" in sd:
        ours = np.asarray(model.pos_embed[...])
        if ours.shape != sd["pos_embed"].shape or not np.allclose(ours, sd["pos_embed"], atol=1e-5):
            raise ValueError("checkpoint pos_embed differs from the fixed 2-D sin-cos embedding: "
                             f"shape {sd['pos_embed'].shape} vs ours {ours.shape}")


def load_into(model: DiT, sd: dict[str, np.ndarray]) -> DiT:
    _check_pos_embed(sd, model)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_torch(sd, len(model.blocks))))
    nnx.update(model, state)
    return model


# Which objective an upstream checkpoint was trained with: DiT releases DDPM (eps + learned-range
# variance, integer t) models, SiT releases velocity models on the same network and key names.
CHECKPOINT_OBJECTIVE = {"dit": "ddpm", "sit": "flow"}


def _check_final_layer(state_dict, config):
    m = config.model
    rows = np.asarray(state_dict["final_layer.linear.weight"]).shape[0]
    want = m.patch_size * m.patch_size * m.in_channels * (2 if m.learn_sigma else 1)
    if rows != want:
        raise ValueError(f"checkpoint final_layer.linear has {rows} outputs but config.model (patch_size="
                         f"{m.patch_size}, in_channels={m.in_channels}, learn_sigma={m.learn_sigma}) needs {want}")


def _importer(kind: str):
    def import_checkpoint(state_dict: dict[str, np.ndarray], config) -> dict:
        objective = config.model.get("objective", "flow")
        if objective != CHECKPOINT_OBJECTIVE[kind]:
            other = next(k for k, v in CHECKPOINT_OBJECTIVE.items() if v == objective)
            raise ValueError(
                f"a {kind!r} checkpoint is a {CHECKPOINT_OBJECTIVE[kind]!r} model but config.model.objective="
                f"{objective!r}: set --config.model.objective={CHECKPOINT_OBJECTIVE[kind]} (or import it as "
                f"kind {other!r} if it really is one)")
        return import_dit(state_dict, config)

    import_checkpoint.__doc__ = f"IMPORTERS entry for kind {kind!r} (objective {CHECKPOINT_OBJECTIVE[kind]!r})."
    return import_checkpoint


def import_dit(state_dict: dict[str, np.ndarray], config) -> dict:
    """Upstream DiT/SiT checkpoint -> params for ``config.model`` (no objective check; see IMPORTERS)."""
    depth = _depth_of(state_dict)
    if depth != config.model.depth:
        raise ValueError(f"checkpoint has {depth} blocks but config.model.depth={config.model.depth}")
    _check_final_layer(state_dict, config)
    model = build_network(config.model, nnx.Rngs(0))
    load_into(model, state_dict)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_dit_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``dit``: forward and forward_with_cfg, NCHW in and out."""
    model = _network_from_fixture(meta, params, buffers)
    nhwc = functools.partial(jnp.transpose, axes=(0, 2, 3, 1))
    nchw = functools.partial(np.transpose, axes=(0, 3, 1, 2))
    out = {"forward": nchw(np.asarray(model(nhwc(inputs["x"]), jnp.asarray(inputs["t"]),
                                            jnp.asarray(inputs["y"], jnp.int32))))}
    if "cfg_x" in inputs:
        out["forward_with_cfg"] = nchw(np.asarray(model.forward_with_cfg(
            nhwc(inputs["cfg_x"]), jnp.asarray(inputs["cfg_t"]), jnp.asarray(inputs["cfg_y"], jnp.int32),
            float(inputs["cfg_scale"]))))
    return out


def _network_from_fixture(meta, params, buffers) -> DiT:
    c = meta["constructor"]["model"] if "model" in meta["constructor"] else meta["constructor"]
    model = DiT(input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
                hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
                mlp_ratio=c["mlp_ratio"], class_dropout_prob=c["class_dropout_prob"],
                num_classes=c["num_classes"], learn_sigma=c["learn_sigma"], rngs=nnx.Rngs(0))
    return load_into(model, {**params, **buffers})


def _diffusion_from_fixture(entry) -> diffusion_lib.GaussianDiffusion:
    r = entry["resolved"]
    if r["model_mean_type"] != "EPSILON" or r["loss_type"] != "MSE":
        raise ValueError(f"fixture diffusion {r}: only EPSILON prediction with the MSE loss type is ported")
    return diffusion_lib.create_diffusion(entry.get("timestep_respacing", ""), noise_schedule=r["noise_schedule"],
                                          diffusion_steps=r["diffusion_steps"],
                                          learn_sigma=r["model_var_type"] == "LEARNED_RANGE")


def check_dit_diffusion_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``dit_diffusion``: schedules, respacing, q_sample, training losses,
    p_mean_variance, one p_sample / DDIM step and one guided p_sample of a DiT (NCHW in and out)."""
    model = _network_from_fixture(meta, params, buffers)
    train = _diffusion_from_fixture(meta["constructor"]["diffusion_train"])
    resp = _diffusion_from_fixture(meta["constructor"]["diffusion_respaced"])
    nhwc = lambda a: jnp.transpose(jnp.asarray(a, jnp.float32), (0, 2, 3, 1))
    nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    net = lambda y: (lambda x, t: model(x, t, i32(y)))
    out = {"train_betas": train.betas, "train_alphas_cumprod": train.alphas_cumprod,
           "train_timestep_map": train.timestep_map}
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "timestep_map"):
        out["resp_" + name] = getattr(resp, name)
    for call in meta["calls"]:
        for key, respacing in call.get("extra_respacings", {}).items():
            out[key.removeprefix("out/")] = np.array(sorted(diffusion_lib.space_timesteps(
                train.num_timesteps, respacing)))
    if "x0" in inputs:
        x0, noise, t = nhwc(inputs["x0"]), nhwc(inputs["noise"]), i32(inputs["t_train"])
        x_t = train.q_sample(x0, t, noise)
        terms = train.training_losses(net(inputs["y_train"]), x0, t, noise)
        out.update(q_sample=nchw(x_t), train_model_output=nchw(terms["model_output"]), loss=terms["loss"],
                   mse=terms["mse"], vb=terms["vb"])
    for prefix, diffusion, clip in (("pmv1000", train, False), ("pmv", resp, True)):
        if prefix + "_x" in inputs:
            o = diffusion.p_mean_variance(net(inputs[prefix + "_y"]), nhwc(inputs[prefix + "_x"]),
                                          i32(inputs[prefix + "_t"]), clip_denoised=clip)
            out.update({f"{prefix}_{k}": nchw(o[k]) for k in ("mean", "variance", "log_variance", "pred_xstart")})
    if "pmv_t" in inputs:
        out["pmv_model_t"] = resp.timestep_map[np.asarray(inputs["pmv_t"])]
    if "ps_x" in inputs:
        o = resp.p_sample(net(inputs["ps_y"]), nhwc(inputs["ps_x"]), i32(inputs["ps_t"]), nhwc(inputs["ps_noise"]))
        out.update(ps_sample=nchw(o["sample"]), ps_pred_xstart=nchw(o["pred_xstart"]))
    if "ddim_x" in inputs:
        for eta, tag in ((0.0, "ddim"), (1.0, "ddim_eta1")):
            o = resp.ddim_sample(net(inputs["ddim_y"]), nhwc(inputs["ddim_x"]), i32(inputs["ddim_t"]),
                                 nhwc(inputs["ddim_noise"]), eta=eta)
            out.update({tag + "_sample": nchw(o["sample"]), tag + "_pred_xstart": nchw(o["pred_xstart"])})
    if "cfg_x" in inputs:
        x, t, scale = nhwc(inputs["cfg_x"]), i32(inputs["cfg_t"]), float(inputs["cfg_scale"])
        guided = diffusion_lib.classifier_free_guidance(net(inputs["cfg_y"]), scale, 3)  # upstream: eps[:, :3]
        out["cfg_model_output"] = nchw(guided(x, i32(resp.timestep_map)[t]))
        o = resp.p_sample(guided, x, t, nhwc(inputs["cfg_noise"]))
        out.update(cfg_sample=nchw(o["sample"]), cfg_pred_xstart=nchw(o["pred_xstart"]))
    return {k: np.asarray(v) for k, v in out.items()}


FIXTURE_CHECKS = {"dit": check_dit_fixture, "dit_diffusion": check_dit_diffusion_fixture}
IMPORTERS = {kind: _importer(kind) for kind in CHECKPOINT_OBJECTIVE}

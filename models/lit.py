"""LiT and DyDi-LiT: DiT with linear attention, on DiT's Gaussian diffusion.

LiT (Wang et al., "LiT: Delving into a Simple(-ified) Linear Diffusion Transformer", arXiv 2501.12976):
DiT (``models/dit.py``, adaLN-Zero blocks, learned-sigma output) with softmax attention replaced by
linear attention with a ReLU kernel and the LiT normaliser, plus a 5x5 depth-wise convolution on V
added to the attention output before the output projection; fewer heads than DiT (a config field);
weights inherited from a DiT checkpoint (everything except attention); a hybrid distillation loss from
a DiT teacher (noise term 0.5, variance term 0.05) on top of DiT's L_simple + L_vlb.

DyDi-LiT (Cao et al., "Dynamic Differential Linear Attention", arXiv 2601.13683): LiT with DyDiLA.
The paper's method section could not be read; the forms below follow ``shared/methods/dydi_lit_paper.md``
and every point that note marks "choice" is a config field (``config.model.dydila``):

* dynamic projection (paper): routers R_Q^P, R_K^P (d -> n_P) pick, per token, one of n_P extra
  projections W_Q^j, W_K^j (d x d); Q'_i = X_i W_Q^{argmax}, K'_i likewise. Hard argmax forward with a
  straight-through softmax gradient (choice: ``onehot + p - stop_gradient(p)``).
* dynamic measure kernel: each of Q, K, Q', K' has its own router (head vector -> n_K) choosing a
  focusing power gamma from a learned bank (choice: init linspace(1.5, 4, n_K), clamped to [1, 8]);
  phi_gamma(z) = ||relu z|| * (relu z)^gamma / ||(relu z)^gamma|| (FLatten's focused kernel).
* token differential operator: q_hat = phi(Q) - lambda_q phi(Q'), k_hat = phi(K) - lambda_k phi(K'),
  lambda routed per token from a per-head learned bank (choice: init linspace(0.05, 0.5, n_D); routers on
  [phi(Z), phi(Z')]).
* normaliser (unknown in the paper; choice ``normaliser``): "positive" (default) divides by the
  positive kernels' denominator phi(Q)_i . sum_j phi(K)_j; "rmsnorm" uses no denominator, then an
  RMSNorm over the head dim times (1 - lambda_init) (DIFF-Transformer style).

The O(N d^2) attention product runs through ``pallas_kernels/linear_attention.py`` (Pallas on GPU/TPU).
DyDiLA's "positive" denominator uses other features than its numerator; it is an O(N d) reduction
computed beside the kernel (``normalize="none"`` numerator divided by it).

Layout: tokens (batch, tokens, channels) row-major over the (grid, grid) patch grid; heads
(batch, heads, tokens, head_dim).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import dit, layers
from pallas_kernels.linear_attention import linear_attention

LIT_EPS = 1e-6  # LiT-style code: denominator q . mean(k) + 1e-6


# ----------------------------------------------------------------------------- LiT attention


def lit_linear_attention(q, k, v, *, impl: str = "auto"):
    """LiT's normalised ReLU linear attention on (B, H, N, d): o_i = phi(q_i) S / (phi(q_i) . mean_j phi(k_j) + eps)
    with S = mean_j phi(k_j)^T v_j (== sums with eps * N), phi = ReLU."""
    n = q.shape[-2]
    return linear_attention(jax.nn.relu(q), jax.nn.relu(k), v, normalize="denominator", eps=LIT_EPS * n, impl=impl)


class DepthwiseConvV(nnx.Module):
    """LiT's 5x5 depth-wise convolution on V over the token grid, weights shared across heads (d_h channels)."""

    def __init__(self, head_dim: int, grid_size: int, kernel_size: int = 5, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.grid_size = grid_size
        self.conv = nnx.Conv(head_dim, head_dim, (kernel_size, kernel_size), padding="SAME",
                             feature_group_count=head_dim, dtype=dtype, param_dtype=jnp.float32,
                             kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                               ("conv_kernel", "conv_kernel", None, None)),
                             bias_init=nnx.with_partitioning(layers.zeros, (None,)), rngs=rngs)

    def __call__(self, v):
        b, h, n, d = v.shape
        g = self.grid_size
        if g * g != n:
            raise ValueError(f"depth-wise conv on V needs a square token grid {g}x{g}, got {n} tokens")
        out = self.conv(v.reshape(b * h, g, g, d))
        return out.reshape(b, h, n, d).astype(v.dtype)


class LiTAttention(nnx.Module):
    """qkv (fused, bias) -> ReLU linear attention + DWC(V) -> output projection."""

    def __init__(self, dim: int, num_heads: int, *, grid_size: int, kernel_size: int = 5, impl: str = "auto",
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.impl = num_heads, impl
        self.qkv = layers.dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.dwc = DepthwiseConvV(dim // num_heads, grid_size, kernel_size, rngs=rngs, dtype=dtype)
        self.proj = layers.dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        q, k, v = layers.split_heads(self.qkv(x), 3, self.num_heads)
        out = lit_linear_attention(q, k, v, impl=self.impl).astype(v.dtype) + self.dwc(v)
        return self.proj(_merge_heads(out))


def _merge_heads(x):
    b, h, n, d = x.shape
    return jnp.moveaxis(x, 1, 2).reshape(b, n, h * d)


# ----------------------------------------------------------------------------- DyDiLA


@dataclasses.dataclass(frozen=True)
class DyDiLAConfig:
    """DyDiLA's sizes and the note's implementation choices (``shared/methods/dydi_lit_paper.md``)."""

    num_projectors: int = 3  # n_P ("Small" per the P2Echo adaptation)
    num_kernels: int = 9  # n_K
    num_lambdas: int = 9  # n_D
    gamma_init: tuple[float, float] = (1.5, 4.0)  # linspace over the bank (distinct: routing not symmetric)
    gamma_range: tuple[float, float] = (1.0, 8.0)  # clamp
    lambda_init: tuple[float, float] = (0.05, 0.5)  # linspace over the per-head bank
    normaliser: str = "positive"  # "positive" | "rmsnorm"
    rmsnorm_lambda_init: float = 0.8  # "rmsnorm": output scaled by (1 - this), DIFF-Transformer style
    power_eps: float = 1e-6  # added to relu(z) before the power (float32)

    @classmethod
    def from_config(cls, c) -> "DyDiLAConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(c).items() if k in fields}
        unknown = set(dict(c)) - fields
        if unknown:
            raise ValueError(f"config.model.dydila has unknown fields {sorted(unknown)}; known: {sorted(fields)}")
        out = cls(**kw)
        if out.normaliser not in ("positive", "rmsnorm"):
            raise ValueError(f"config.model.dydila.normaliser={out.normaliser!r}: 'positive' or 'rmsnorm'")
        if min(out.num_projectors, out.num_kernels, out.num_lambdas) < 1:
            raise ValueError("config.model.dydila: num_projectors, num_kernels and num_lambdas must be >= 1")
        return out


def route(logits):
    """Hard argmax routing with a straight-through softmax gradient: forward one-hot, backward d softmax."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return hard + (p - jax.lax.stop_gradient(p))  # forward exactly one-hot


def focused_kernel(z, gamma, eps: float = 1e-6):
    """phi_gamma(z) = ||relu z|| * (relu z + eps)^gamma / ||(relu z + eps)^gamma|| over the last axis, float32;
    gamma broadcastable to z[..., :1]. For gamma = 1 this is relu(z) up to eps."""
    r = jax.nn.relu(z.astype(jnp.float32))
    p = jnp.exp(gamma * jnp.log(r + eps))
    norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=-1, keepdims=True))
    return norm(r) * p / norm(p)


def _param(rngs, init, shape, names):
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32))


class DyDiLA(nnx.Module):
    """Dynamic Differential Linear Attention (one block's token mixer), see the module docstring."""

    def __init__(self, dim: int, num_heads: int, *, grid_size: int, cfg: DyDiLAConfig = DyDiLAConfig(),
                 kernel_size: int = 5, impl: str = "auto", rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.impl, self.cfg = num_heads, impl, cfg
        head_dim = dim // num_heads
        self.qkv = layers.dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dtype)  # W_Q^0, W_K^0, W_V^0
        # Dynamic projection: routers (d -> n_P) and projector banks (n_P, d, d) for Q' and K'.
        xavier = nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        small = nnx.initializers.normal(0.02)
        self.proj_router = _param(rngs, small, (2, dim, cfg.num_projectors), (None, "embed", None))
        self.proj_bank = _param(rngs, xavier, (2, cfg.num_projectors, dim, dim), (None, None, "embed", "heads"))
        # Dynamic measure kernel: one router (head vector -> n_K) and gamma bank per tensor Q, K, Q', K'.
        self.kernel_router = _param(rngs, small, (4, head_dim, cfg.num_kernels), (None, None, None))
        gammas = np.linspace(*cfg.gamma_init, cfg.num_kernels) if cfg.num_kernels > 1 else [cfg.gamma_init[0]]
        self.gamma = nnx.Param(jnp.tile(jnp.asarray(gammas, jnp.float32)[None], (4, 1)),
                               out_sharding=(None, None))
        # Token differential operator: Q- and K-side routers on [phi(Z), phi(Z')] -> n_D, per-head lambda bank.
        self.lambda_router = _param(rngs, small, (2, 2 * head_dim, cfg.num_lambdas), (None, None, None))
        lambdas = np.linspace(*cfg.lambda_init, cfg.num_lambdas) if cfg.num_lambdas > 1 else [cfg.lambda_init[0]]
        self.lambdas = nnx.Param(jnp.tile(jnp.asarray(lambdas, jnp.float32)[None], (num_heads, 1)),
                                 out_sharding=(None, None))
        self.dwc = DepthwiseConvV(head_dim, grid_size, kernel_size, rngs=rngs, dtype=dtype)
        self.proj = layers.dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def redundancy(self, x, which: int):
        """Q' (which=0) or K' (which=1): X_i W^{argmax_j (X_i R)_j}, (B, N, d), with the routing weights."""
        g = route(jnp.einsum("bnd,dj->bnj", x.astype(jnp.float32), self.proj_router[which]))
        all_proj = jnp.einsum("bnd,jde->bnje", x, self.proj_bank[which].astype(x.dtype))
        return jnp.einsum("bnje,bnj->bne", all_proj, g.astype(all_proj.dtype)), g

    def kernel(self, z, which: int):
        """Routed focused kernel of head vectors z (B, H, N, d_h) with bank ``which`` (0 Q, 1 K, 2 Q', 3 K')."""
        g = route(jnp.einsum("bhnd,dk->bhnk", z.astype(jnp.float32), self.kernel_router[which]))
        lo, hi = self.cfg.gamma_range
        gamma = jnp.einsum("bhnk,k->bhn", g, jnp.clip(self.gamma[which], lo, hi))[..., None]
        return focused_kernel(z, gamma, self.cfg.power_eps), g

    def differential_lambda(self, zt, zpt, which: int):
        """Per-token lambda (B, H, N, 1) routed from the head's bank on [phi(Z), phi(Z')]."""
        logits = jnp.einsum("bhnd,dk->bhnk", jnp.concatenate([zt, zpt], -1), self.lambda_router[which])
        g = route(logits)
        return jnp.einsum("bhnk,hk->bhn", g, self.lambdas[...])[..., None], g

    def __call__(self, x, *, return_routing: bool = False):
        q, k, v = layers.split_heads(self.qkv(x), 3, self.num_heads)
        qp, gq = self.redundancy(x, 0)
        kp, gk = self.redundancy(x, 1)
        qp, kp = (layers.split_heads(a, 1, self.num_heads)[0] for a in (qp, kp))
        (qt, g0), (kt, g1), (qpt, g2), (kpt, g3) = (self.kernel(z, i) for i, z in enumerate((q, k, qp, kp)))
        lq, gl_q = self.differential_lambda(qt, qpt, 0)
        lk, gl_k = self.differential_lambda(kt, kpt, 1)
        q_hat, k_hat = qt - lq * qpt, kt - lk * kpt
        n = x.shape[1]
        num = linear_attention(q_hat, k_hat, v.astype(jnp.float32), normalize="none", impl=self.impl) / n
        if self.cfg.normaliser == "positive":
            den = jnp.einsum("bhnd,bhd->bhn", qt, kt.mean(axis=2))[..., None] + LIT_EPS
            out = num / den
        else:
            out = layers.rms_norm(num) * (1 - self.cfg.rmsnorm_lambda_init)
        out = out.astype(v.dtype) + self.dwc(v)
        out = self.proj(_merge_heads(out))
        if return_routing:
            return out, {"projector_q": gq, "projector_k": gk, "kernel": (g0, g1, g2, g3), "lambda": (gl_q, gl_k)}
        return out


# ----------------------------------------------------------------------------- network


class TeacherParam(nnx.Variable):
    """A frozen distillation teacher's weight: non-trainable state (the loop's ``rest``), sharded by its names."""


def freeze(module: nnx.Module) -> nnx.Module:
    """The same module with every nnx.Param turned into a TeacherParam (kept out of the optimizer)."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: TeacherParam(v.get_value(), **v.get_metadata()) if isinstance(v, nnx.Param)
                         else v, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


class LiT(dit.DiT):
    """DiT with a linear-attention token mixer, and optionally a frozen DiT teacher (``self.teacher``)."""

    def __init__(self, *, attention, teacher_num_heads: int | None = None, **dit_kwargs):
        super().__init__(attention=attention, **dit_kwargs)
        if teacher_num_heads:
            self.teacher = freeze(dit.DiT(**{**dit_kwargs, "num_heads": teacher_num_heads}))
        # Set by the DiT importer: distillation refuses a teacher that was never loaded.
        self.teacher_loaded = nnx.Variable(jnp.zeros((), jnp.bool_))


def attention_factory(model_config):
    """``attention(hidden, heads, rngs=, dtype=)`` for config.model.attention: "lit" | "dydila"."""
    grid = model_config.input_size // model_config.patch_size
    impl = model_config.get("attention_impl", "auto")
    if model_config.attention == "lit":
        return functools.partial(LiTAttention, grid_size=grid, impl=impl)
    if model_config.attention == "dydila":
        cfg = DyDiLAConfig.from_config(model_config.get("dydila", {}))
        return functools.partial(DyDiLA, grid_size=grid, cfg=cfg, impl=impl)
    raise ValueError(f"config.model.attention={model_config.attention!r}: 'lit' or 'dydila'")


def build_network(config, rngs: nnx.Rngs) -> LiT:
    m = config.model
    d = config.distill
    return LiT(attention=attention_factory(m), teacher_num_heads=d.teacher_num_heads if d.enabled else None,
               input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
               hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
               class_dropout_prob=m.class_dropout_prob, num_classes=m.num_classes, learn_sigma=m.learn_sigma,
               remat=m.get("remat", False), rngs=rngs, dtype=jnp.dtype(config.compute_dtype))


# ----------------------------------------------------------------------------- method


def _refuse_unloaded_teacher(loaded):
    if not bool(loaded):
        raise ValueError("config.distill.enabled but the DiT teacher was never loaded: create the workdir with "
                         "`python -m trainers.convert import lit DiT-XL-2-256x256.pt --config=... --out=WORKDIR` "
                         "(weights: https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt), or set "
                         "--config.distill.enabled=False")


class LiTMethod(dit.DiTMethod):
    """LiT / DyDi-LiT on DiT's Gaussian diffusion (objective ddpm), with LiT's hybrid distillation:

        L = L_simple + L_vlb + noise_weight ||eps_T - eps_S||^2 + variance_weight ||v_T - v_S||^2

    (LiT: 0.5 / 0.05). The teacher sees the same x_t, t and (dropped) labels. ``v`` is the raw
    learned-range variance output (choice: the paper says "variance"; the raw interpolation channels
    are what both networks output). ``config.distill.vlb`` keeps DiT's L_vlb (choice, default on).
    """

    def validate_config(self, config) -> None:
        super().validate_config(config)
        m = config.model
        if m.get("objective", "ddpm") != "ddpm":
            raise ValueError("config.model.objective must be 'ddpm' for LiT / DyDi-LiT (DiT's Gaussian diffusion)")
        attention_factory(m)
        d = config.distill
        if d.enabled:
            if not m.learn_sigma:
                raise ValueError("config.distill needs config.model.learn_sigma=True (the variance term)")
            if m.hidden_size % d.teacher_num_heads:
                raise ValueError(f"config.distill.teacher_num_heads={d.teacher_num_heads} does not divide "
                                 f"config.model.hidden_size={m.hidden_size}")

    @property
    def objective(self) -> str:
        return "ddpm"

    def create_model(self, rngs: nnx.Rngs) -> LiT:
        return build_network(self.config, rngs)

    def ddpm_loss(self, model: LiT, x_data, labels, rng_t, noise):
        d = self.config.distill
        if not d.enabled:
            return super().ddpm_loss(model, x_data, labels, rng_t, noise)
        jax.debug.callback(_refuse_unloaded_teacher, model.teacher_loaded[...])
        diffusion = dit.training_diffusion(self.config)
        t = jax.random.randint(rng_t, (x_data.shape[0],), 0, diffusion.num_timesteps)
        x_t = diffusion.q_sample(x_data, t, noise)
        tmap = jnp.asarray(diffusion.timestep_map.astype(np.int32))
        student = model(x_t, tmap[t], labels)
        teacher = jax.lax.stop_gradient(model.teacher(x_t, tmap[t], labels))
        terms = diffusion.training_losses(None, x_data, t, noise, model_output=student)
        c = x_data.shape[-1]
        kd_eps = jnp.mean(jnp.square(teacher[..., :c] - student[..., :c]))
        kd_var = jnp.mean(jnp.square(teacher[..., c:] - student[..., c:]))
        base = terms["mse"] + (terms["vb"] if d.vlb else 0.0)
        loss = jnp.mean(base) + d.noise_weight * kd_eps + d.variance_weight * kd_var
        return loss, {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]),
                      "kd_eps": kd_eps, "kd_var": kd_var}


# ----------------------------------------------------------------------------- weight inheritance


def _is_attention(path) -> bool:
    return len(path) >= 3 and path[0] == "blocks" and path[2] == "attn"


def import_from_dit(state_dict: dict[str, np.ndarray], config):
    """IMPORTERS entry (kinds ``lit`` / ``dydi_lit``): LiT's weight inheritance from a DiT checkpoint.

    Every weight except attention comes from the DiT (through ``models/dit.py``'s converter); attention
    (and DyDiLA's routers/banks) stays freshly initialised (LiT: loading Q/K/V/O hurts slightly). With
    ``config.distill.enabled`` the whole DiT also becomes the frozen teacher. Returns (params, rest).
    """
    m = config.model
    depth = dit._depth_of(state_dict)
    if depth != m.depth:
        raise ValueError(f"checkpoint has {depth} blocks but config.model.depth={m.depth}")
    dit._check_final_layer(state_dict, config)
    model = build_network(config, nnx.Rngs(config.seed))
    dit._check_pos_embed(state_dict, model)
    converted = dit.params_from_torch(state_dict, depth)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def inherit(path, ours):
        if _is_attention(path):
            return ours
        node = converted
        for key in path:
            node = node[key]
        if np.shape(node) != np.shape(ours):
            raise ValueError(f"checkpoint {'/'.join(map(str, path))} has shape {np.shape(node)}, the config "
                             f"needs {np.shape(ours)}")
        return jnp.asarray(node)

    params = _map_with_path(inherit, params)
    if config.distill.enabled:
        teacher_sd = {k: v for k, v in state_dict.items() if k != "pos_embed"}
        teacher_params = dit.params_from_torch(teacher_sd, depth)
        state = nnx.state(model.teacher, TeacherParam)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, teacher_params))
        nnx.update(model.teacher, state)
        model.teacher_loaded[...] = jnp.ones((), jnp.bool_)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return params, nnx.to_pure_dict(rest)


def _map_with_path(fn, tree, path=()):
    if isinstance(tree, dict):
        return {k: _map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)


IMPORTERS = {"lit": import_from_dit, "dydi_lit": import_from_dit}

"""MeanFlow (Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

As the official JAX code (Gsunshine/meanflow: ``meanflow.py``, ``models/models_dit.py``):

* Path: z_t = (1 - t) x + t e, t = 1 is noise; conditional velocity v = e - x.
* Network u(z, t, h, y): average velocity over [r, t] with h = t - r. A DiT
  (``models/dit.py``, learn_sigma off) with a second TimestepEmbedder for h:
  c = emb(t) + emb(h) + emb(y); both times raw in [0, 1] (no x1000).
* MeanFlow identity u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t), with the
  total derivative d/dt u = v d_z u + d_t u taken by one ``jax.jvp`` along the
  tangent (v, 1, 0) of (z, t, r). Target u_tgt = sg(v_g - clip(t - r, 0, 1) du/dt).
* Times: t, r ~ logit-normal(P_mean, P_std) independently, (t, r) = (max, min),
  and a fixed share ``data_proportion`` of the batch (its first rows) has r = t.
* CFG folded into the target (no guidance at sampling): with the network's own
  instantaneous velocities at h = 0, v_g = omega v + kappa u(z, t, 0 | y)
  + (1 - omega - kappa) u(z, t, 0 | null), only for t in [t_start, t_end]
  (effective scale omega / (1 - kappa)). Label drop: the first
  ``#(uniform < class_dropout_prob)`` rows get the null label and the plain v.
* Loss: per-sample squared error summed over pixels, divided by the adaptive
  weight sg((err + norm_eps) ** norm_p), batch mean.
* Samplers: 1 step z_0 = z_1 - u(z_1, t=1, h=1); k steps on a uniform grid.

Layout: images / latents (batch, height, width, channels).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import dit, layers
from trainers.method import Method

sg = jax.lax.stop_gradient


class MeanFlowDiT(dit.DiT):
    """MeanFlow's DiT: ``models/dit.py``'s DiT (no learned sigma) plus ``h_embedder`` for h = t - r.

    __call__(z (B, H, W, C), t (B,), h (B,), y (B,)) -> u (B, H, W, C).
    """

    def __init__(self, *, hidden_size: int, rngs: nnx.Rngs, dtype=jnp.float32, **dit_kwargs):
        super().__init__(hidden_size=hidden_size, learn_sigma=False, rngs=rngs, dtype=dtype, **dit_kwargs)
        self.h_embedder = layers.TimestepEmbedder(hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array, t: jax.Array, h: jax.Array, y: jax.Array) -> jax.Array:
        return super().__call__(z, t, y, cond=self.h_embedder(h))


NETWORK_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                  "num_classes")


def build_network(model_config, rngs: nnx.Rngs, dtype=jnp.float32) -> MeanFlowDiT:
    kw = {f: model_config[f] for f in NETWORK_FIELDS}
    # The label table always has the null row (num_classes): label drop happens in the objective.
    return MeanFlowDiT(**kw, class_dropout_prob=max(float(model_config.class_dropout_prob), 1e-6),
                       remat=model_config.get("remat", False), rngs=rngs, dtype=dtype)


def logit_normal_or_uniform(draw: jax.Array, model_config) -> jax.Array:
    """Map a standard-normal draw to a time in (0, 1): sigmoid(P_mean + P_std * n), or, for
    ``time_dist='uniform'``, the normal CDF of the draw (a uniform time)."""
    m = model_config
    if m.time_dist == "logit_normal":
        return jax.nn.sigmoid(draw * m.P_std + m.P_mean)
    return jax.scipy.stats.norm.cdf(draw)


def sample_tr(t_draw: jax.Array, r_draw: jax.Array, model_config, equal_proportion: float):
    """(t, r), each (B, 1, 1, 1): sorted pair of independent draws; the first
    int(B * equal_proportion) rows get r = t (upstream ``sample_tr``)."""
    t_n = logit_normal_or_uniform(t_draw, model_config)
    r_n = logit_normal_or_uniform(r_draw, model_config)
    t, r = jnp.maximum(t_n, r_n), jnp.minimum(t_n, r_n)
    bz = t.shape[0]
    equal = (jnp.arange(bz) < int(bz * equal_proportion)).reshape(bz, 1, 1, 1)
    return t, jnp.where(equal, t, r)


def guidance_terms(v_fn, v: jax.Array, z_t: jax.Array, t: jax.Array, labels: jax.Array, model_config) -> dict:
    """MeanFlow's folded CFG target (upstream ``guidance_fn``). ``v_fn(z, t, y)`` is the guiding
    instantaneous velocity (the network at h = 0). Returns the named terms, ``v_g_guided`` included."""
    m = model_config
    if m.guidance != "cfg":
        return {"v_g_guided": v}
    null = jnp.full_like(labels, m.num_classes)
    inside = (t >= m.t_start) & (t <= m.t_end)
    out = {"v_uncond": sg(v_fn(z_t, t, null))}
    out["guid_omega"] = jnp.where(inside, m.omega, 1.0)
    if m.kappa == 0:
        out["v_g_guided"] = out["v_uncond"] + out["guid_omega"] * (v - out["v_uncond"])
    else:
        out["v_cond"] = sg(v_fn(z_t, t, labels))
        out["guid_kappa"] = jnp.where(inside, m.kappa, 0.0)
        out["v_g_guided"] = (out["guid_omega"] * v + (1 - out["guid_omega"] - out["guid_kappa"]) * out["v_uncond"]
                             + out["guid_kappa"] * out["v_cond"])
    return out


def cond_drop(v: jax.Array, v_g: jax.Array, labels: jax.Array, drop_u: jax.Array, model_config):
    """(y_inp, v_g, drop): the FIRST #(drop_u < class_dropout_prob) rows get the null label and the
    unguided v (upstream ``cond_drop``)."""
    bz = v.shape[0]
    num_drop = jnp.sum(drop_u < model_config.class_dropout_prob).astype(jnp.int32)
    drop = jnp.arange(bz) < num_drop
    y_inp = jnp.where(drop, model_config.num_classes, labels)
    return y_inp, jnp.where(drop[:, None, None, None], v, v_g), drop


def adaptive_loss(u: jax.Array, u_tgt: jax.Array, model_config) -> dict:
    """Per-sample sum of squares over (H, W, C), divided by sg((sq + norm_eps) ** norm_p), batch mean."""
    sq = jnp.sum(jnp.square(u - sg(u_tgt)), axis=(1, 2, 3))
    adp_wt = (sq + model_config.norm_eps) ** model_config.norm_p
    weighted = sq / sg(adp_wt)
    return {"sq_per_sample": sq, "adp_wt": adp_wt, "weighted_per_sample": weighted, "loss": weighted.mean()}


def draws(rng: jax.Array, x: jax.Array) -> dict:
    """The objective's random draws, in upstream's order: normal t, normal r, noise, uniform label drop."""
    k_t, k_r, k_e, k_d = jax.random.split(rng, 4)
    bz = x.shape[0]
    return {"t_draw": jax.random.normal(k_t, (bz, 1, 1, 1)), "r_draw": jax.random.normal(k_r, (bz, 1, 1, 1)),
            "noise": jax.random.normal(k_e, x.shape), "drop_u": jax.random.uniform(k_d, (bz,))}


class MeanFlow(Method):
    """MeanFlow on the MeanFlow DiT: the JVP objective and the 1- / k-step samplers."""

    objective_fields = ("time_dist", "P_mean", "P_std", "guidance", "omega", "kappa", "t_start", "t_end",
                        "class_dropout_prob", "norm_p", "norm_eps")

    def validate_config(self, config) -> None:
        m = config.model
        for field in self.objective_fields:
            if field not in m:
                raise ValueError(f"config.model.{field} is missing ({type(self).__name__} objective field)")
        if m.input_size % m.patch_size:
            raise ValueError(f"config.model.input_size={m.input_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}")
        if m.hidden_size % m.num_heads:
            raise ValueError(f"config.model.hidden_size={m.hidden_size} is not divisible by "
                             f"config.model.num_heads={m.num_heads}")
        if m.time_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"config.model.time_dist={m.time_dist!r}: must be 'logit_normal' or 'uniform'")
        if m.guidance not in ("cfg", "none"):
            raise ValueError(f"config.model.guidance={m.guidance!r}: must be 'cfg' or 'none'")
        if not 0.0 <= m.t_start <= m.t_end <= 1.0:
            raise ValueError(f"config.model.t_start={m.t_start}, t_end={m.t_end}: need 0 <= t_start <= t_end <= 1")
        if not m.kappa >= 0.0:
            raise ValueError(f"config.model.kappa={m.kappa} must be >= 0")
        if not 0.0 <= m.class_dropout_prob < 1.0:
            raise ValueError(f"config.model.class_dropout_prob={m.class_dropout_prob} must be in [0, 1)")
        if "data_proportion" in m and not 0.0 <= m.data_proportion <= 1.0:
            raise ValueError(f"config.model.data_proportion={m.data_proportion} must be in [0, 1]")
        if int(config.sample.num_steps) < 1:
            raise ValueError(f"config.sample.num_steps={config.sample.num_steps} must be >= 1")

    def create_model(self, rngs: nnx.Rngs) -> MeanFlowDiT:
        return build_network(self.config.model, rngs, jnp.dtype(self.config.compute_dtype))

    # ------------------------------------------------------------------ objective
    def objective(self, model: MeanFlowDiT, x: jax.Array, labels: jax.Array, t_draw, r_draw, noise, drop_u):
        """Upstream ``MeanFlow.forward`` with its draws given; returns (loss, every named term)."""
        m = self.config.model
        x = x.astype(jnp.float32)
        bz = x.shape[0]
        t, r = sample_tr(t_draw, r_draw, m, m.data_proportion)
        z_t = (1 - t) * x + t * noise
        v = noise - x

        def v_fn(z, t, y):  # instantaneous velocity: h = 0
            return model(z, t.reshape(bz), jnp.zeros((bz,)), y)

        terms = {"t": t, "r": r, "z_t": z_t, "v": v, **guidance_terms(v_fn, v, z_t, t, labels, m)}
        y_inp, v_g, _ = cond_drop(v, terms["v_g_guided"], labels, drop_u, m)
        v_g = sg(v_g)
        terms.update(y_inp=y_inp, v_g=v_g)

        def u_fn(z, t, r):
            return model(z, t.reshape(bz), (t - r).reshape(bz), y_inp)

        u, du_dt = jax.jvp(u_fn, (z_t, t, r), (v_g, jnp.ones_like(t), jnp.zeros_like(r)))
        u_tgt = sg(v_g - jnp.clip(t - r, 0.0, 1.0) * du_dt)
        terms.update(u=u, du_dt=du_dt, u_tgt=u_tgt, **adaptive_loss(u, u_tgt, m))
        terms["v_loss"] = jnp.sum(jnp.square(u - v), axis=(1, 2, 3))  # monitoring only
        return terms["loss"], terms

    def loss(self, model, batch, rng):
        x = batch["latent"] if "latent" in batch else batch["image"]
        loss, terms = self.objective(model, x, batch["label"], **draws(rng, x))
        return loss, {"loss": loss, "v_loss": terms["v_loss"].mean(),
                      "sq_loss": terms["sq_per_sample"].mean()}

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def solver_step(model: MeanFlowDiT, z: jax.Array, t: jax.Array, r: jax.Array, labels: jax.Array) -> jax.Array:
        """z_r = z_t - (t - r) u(z_t, t, h = t - r, y); t, r scalars."""
        bz = z.shape[0]
        tb, rb = jnp.full((bz,), t), jnp.full((bz,), r)
        return z - (t - r) * model(z, tb, tb - rb, labels)

    def sample(self, model: MeanFlowDiT, rng: jax.Array, labels: jax.Array, *, num_steps: int | None = None,
               t_steps=None) -> jax.Array:
        """``num_steps`` u-steps on the uniform grid 1 -> 0 (1 = upstream's default [1, 0]), or the
        given decreasing ``t_steps``. No guidance at sampling (it is folded into training)."""
        m = self.config.model
        if t_steps is None:
            t_steps = jnp.linspace(1.0, 0.0, int(num_steps or self.config.sample.num_steps) + 1)
        t_steps = jnp.asarray(t_steps, jnp.float32)
        z = jax.random.normal(rng, (labels.shape[0], m.input_size, m.input_size, m.in_channels))

        def step(z, i):
            return self.solver_step(model, z, t_steps[i], t_steps[i + 1], labels), None

        z, _ = jax.lax.scan(step, z, jnp.arange(t_steps.shape[0] - 1))
        return z


# ----------------------------------------------------------------------------- conversion
# Upstream layout: the flax.linen tree of MeanFlow (``params['net']`` = models_dit.DiT), TorchLinear
# wrappers (``<name>._flax_linear.{kernel (in, out), bias}``), nn.Sequential children ``layers_<i>``,
# PatchEmbed conv ``x_embedder.proj`` (kh, kw, in, out), TorchEmbedding ``_flax_embedding``.

def _lin(flat, name):
    return {"kernel": np.asarray(flat[name + "._flax_linear.kernel"]),
            "bias": np.asarray(flat[name + "._flax_linear.bias"])}


def params_from_flax(flat: dict[str, np.ndarray]) -> dict:
    """Pure-dict params of :class:`MeanFlowDiT` from upstream's net tree, flattened with '.'
    (keys with or without the leading ``net.``)."""
    flat = {k[len("net."):] if k.startswith("net.") else k: v for k, v in flat.items()}
    depth = 1 + max(int(k.split(".")[1].split("_")[1]) for k in flat if k.startswith("blocks."))

    def temb(name):
        return {"linear_1": _lin(flat, name + ".mlp.layers_0"), "linear_2": _lin(flat, name + ".mlp.layers_2")}

    params = {
        "x_embedder": {"kernel": np.asarray(flat["x_embedder.proj.kernel"]),
                       "bias": np.asarray(flat["x_embedder.proj.bias"])},
        "t_embedder": temb("t_embedder"),
        "h_embedder": temb("h_embedder"),
        "y_embedder": {"embedding": {"embedding": np.asarray(flat["y_embedder.embedding_table._flax_embedding.embedding"])}},
        "final_layer": {"adaLN_modulation": _lin(flat, "final_layer.adaLN_modulation.layers_1"),
                        "linear": _lin(flat, "final_layer.linear")},
        "blocks": {},
    }
    for i in range(depth):
        p = f"blocks.layers_{i}"
        params["blocks"][i] = {"attn": {"qkv": _lin(flat, p + ".attn.qkv"), "proj": _lin(flat, p + ".attn.proj")},
                               "mlp": {"fc1": _lin(flat, p + ".mlp.fc1"), "fc2": _lin(flat, p + ".mlp.fc2")},
                               "adaLN_modulation": _lin(flat, p + ".adaLN_modulation.layers_1")}
    return params


def load_params(model: nnx.Module, params: dict) -> nnx.Module:
    """Replace ``model``'s nnx.Params by a pure dict, checking every shape."""
    state = nnx.state(model, nnx.Param)
    ref = nnx.to_pure_dict(state)
    ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref))
    new_flat = dict(jax.tree_util.tree_leaves_with_path(params))
    if set(ref_flat) != set(new_flat):
        missing = sorted(jax.tree_util.keystr(k) for k in set(ref_flat) - set(new_flat))
        extra = sorted(jax.tree_util.keystr(k) for k in set(new_flat) - set(ref_flat))
        raise ValueError(f"parameter trees differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in ref_flat.items():
        if tuple(v.shape) != tuple(np.shape(new_flat[k])):
            raise ValueError(f"{jax.tree_util.keystr(k)}: checkpoint shape {np.shape(new_flat[k])} "
                             f"!= model shape {tuple(v.shape)}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def load_state_dict(src: str) -> dict[str, np.ndarray]:
    """Read upstream's released checkpoint (``flax.training.checkpoints``: an orbax directory
    ``checkpoint_<step>`` or a msgpack file) -> the net's params flattened with '.'; the EMA
    params (``ema_params``) when the checkpoint holds them, as upstream evaluates them.

    MF-B/4 is published on Google Drive (link in Gsunshine/meanflow's README: "MF-B/4 Checkpoint");
    unzip it and pass the ``checkpoint_*`` path.
    """
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{src} not found: download the MF-B/4 checkpoint linked in "
                                "github.com/Gsunshine/meanflow's README (Google Drive), unzip it and pass "
                                "its checkpoint_<step> path")
    if path.is_dir():
        import orbax.checkpoint as ocp

        inner = path / "default" if (path / "default").is_dir() else path
        tree = ocp.PyTreeCheckpointer().restore(str(inner.absolute()))
    else:
        from flax import serialization

        tree = serialization.msgpack_restore(path.read_bytes())
    for key in ("ema_params", "params"):
        if isinstance(tree, dict) and key in tree:
            tree = tree[key]
            break
    else:
        raise ValueError(f"{src}: no 'ema_params' or 'params' in the checkpoint (top-level keys: "
                         f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__})")
    if "net" not in tree:
        raise ValueError(f"{src}: the params have no 'net' subtree (keys: {sorted(tree)})")
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep=".").items()}


def import_meanflow(state_dict: dict[str, np.ndarray], config) -> dict:
    """IMPORTERS entry: upstream MeanFlow params (flattened) -> params for ``config.model``."""
    params = params_from_flax(state_dict)
    if len(params["blocks"]) != config.model.depth:
        raise ValueError(f"checkpoint has {len(params['blocks'])} blocks but config.model.depth="
                         f"{config.model.depth}")
    model = build_network(config.model, nnx.Rngs(0))
    load_params(model, params)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _fixture_config(net: dict, method: dict):
    import ml_collections

    from configs import common

    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="meanflow", **{k: net[k] for k in NETWORK_FIELDS}, remat=False,
        time_dist="logit_normal" if method["noise_dist"] == "logit_normal" else "uniform",
        P_mean=method["P_mean"], P_std=method["P_std"], data_proportion=method["data_proportion"],
        guidance="cfg" if method["guidance_eq"] == "cfg" else "none", omega=method["omega"],
        kappa=method["kappa"], t_start=method["t_start"], t_end=method["t_end"],
        class_dropout_prob=method["class_dropout_prob"], norm_p=method["norm_p"], norm_eps=method["norm_eps"]))
    if net.get("learn_sigma", False):
        raise ValueError("MeanFlow fixture: learn_sigma=True is not MeanFlow's network")
    return c


def check_meanflow_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``meanflow``: u(z, t, h, y), every loss term (kappa > 0 and
    kappa = 0), the per-step solver and the 1-NFE sampler. Everything NHWC."""
    c = meta["constructor"]
    method = MeanFlow(_fixture_config(c["net"], c["method"]))
    model = load_params(build_network(method.config.model, nnx.Rngs(0)), params_from_flax(params))
    variants = [("loss", MeanFlow(_fixture_config(c["net"], c["method"])))]
    if c.get("method_k0"):
        variants.append(("k0", MeanFlow(_fixture_config(c["net"], {**c["method"], **c["method_k0"]}))))

    @nnx.jit
    def run(model, f):
        out = {"u": model(f["u_z"], f["u_t"], f["u_h"], f["u_y"].astype(jnp.int32))}
        draws_in = {k: f[k] for k in ("t_draw", "r_draw", "noise", "drop_u")}
        for prefix, m in variants:
            _, terms = m.objective(model, f["x"], f["labels"].astype(jnp.int32), **draws_in)
            for name, value in terms.items():
                out["loss" if (prefix, name) == ("loss", "loss") else f"{prefix}_{name}"] = value
        z, y, ts = f["sample_z"], f["sample_y"].astype(jnp.int32), f["sample_t_steps"]
        for i in range(ts.shape[0] - 1):
            out[f"sample_step{i}"] = MeanFlow.solver_step(model, z, ts[i], ts[i + 1], y)
        out["sample_1nfe"] = MeanFlow.solver_step(model, z, jnp.float32(1.0), jnp.float32(0.0), y)  # [1, 0]
        return out

    out = run(model, {k: jnp.asarray(v) for k, v in inputs.items()})
    return {k: np.asarray(v) for k, v in out.items()}


FIXTURE_CHECKS = {"meanflow": check_meanflow_fixture}
IMPORTERS = {"meanflow": import_meanflow}

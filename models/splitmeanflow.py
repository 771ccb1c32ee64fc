"""SplitMeanFlow (Guo et al., "SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative
Modeling", arXiv 2507.16884), on MeanFlow's network, times, CFG folding and loss weighting.

The paper reports speech only; on images the zoo runs its objective on MeanFlow's
official ImageNet recipe (``models/meanflow.py``), swapping only the target.

Interval splitting: the average velocity u(z_t, r, t) = 1/(t - r) int_r^t v is additive,
(t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t) for r <= s <= t. With
s = (1 - lambda) t + lambda r, lambda ~ U(0, 1) (paper Algorithm 1):

    u2  = sg u(z_t, s, t)                       # h = t - s
    z_s = z_t - (t - s) u2                      # step along the model's own flow
    u1  = sg u(z_s, r, s)                       # h = s - r
    target = (1 - lambda) u1 + lambda u2        # no JVP

Boundary: a fraction ``flow_ratio`` of the batch (its first rows, as MeanFlow's
``data_proportion``) has r = t and regresses the instantaneous velocity with
MeanFlow's folded CFG target ("self": the network's own h = 0 velocities, from
scratch), or the guided velocity of a frozen flow-matching teacher ("teacher":
the paper's two-stage training). Split rows use the same label input as the
prediction (null for label-dropped rows), so the guided field propagates
through the split. Loss: MeanFlow's per-sample sum with the adaptive weight,
on both kinds of rows (implementation choice; the paper's weighting is not
public).

Two-stage option (``boundary_target='teacher'``): a SiT-objective DiT
(``models/dit.py``, t = 0 noise, velocity data - noise) is converted exactly
into MeanFlow's convention (t -> 1 - t folded into the t embedder, output
negated, sigma half dropped) with the h embedder zero-initialised, so that
u_student(z, t, h = 0, y) equals the teacher's velocity at step 0. The frozen
teacher is that converted copy (``model.teacher``); it receives no gradient
(stop_gradient on its outputs; with Adam and weight decay 0 its update is
exactly zero, which validate_config requires).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import dit, meanflow
from models.meanflow import MeanFlowDiT, adaptive_loss, cond_drop, guidance_terms, sample_tr, sg


class StudentWithTeacher(nnx.Module):
    """The two-stage model: the trained student (``student``) and a frozen copy of the converted
    flow-matching teacher (``teacher``), both MeanFlow DiTs; __call__ is the student."""

    def __init__(self, model_config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.student = meanflow.build_network(model_config, rngs, dtype)
        self.teacher = meanflow.build_network(model_config, rngs, dtype)

    def __call__(self, z, t, h, y):
        return self.student(z, t, h, y)


class SplitMeanFlow(meanflow.MeanFlow):
    """SplitMeanFlow objective; network and samplers are MeanFlow's."""

    objective_fields = meanflow.MeanFlow.objective_fields + ("flow_ratio", "boundary_target", "teacher_cfg_scale")

    def validate_config(self, config) -> None:
        super().validate_config(config)
        m = config.model
        if not 0.0 <= m.flow_ratio < 1.0:
            raise ValueError(f"config.model.flow_ratio={m.flow_ratio} must be in [0, 1) (share of r = t rows)")
        if m.boundary_target not in ("self", "teacher"):
            raise ValueError(f"config.model.boundary_target={m.boundary_target!r}: must be 'self' or 'teacher'")
        if m.boundary_target == "teacher" and config.optim.weight_decay != 0.0:
            raise ValueError(f"config.optim.weight_decay={config.optim.weight_decay}: the frozen teacher "
                             "(boundary_target='teacher') needs weight decay 0 to stay exactly unchanged")

    def create_model(self, rngs: nnx.Rngs):
        if self.config.model.boundary_target == "teacher":
            return StudentWithTeacher(self.config.model, rngs=rngs, dtype=jnp.dtype(self.config.compute_dtype))
        return super().create_model(rngs)

    def boundary_velocity(self, model, z_t, t, v, labels, drop):
        """Target of the r = t rows before label drop handling: MeanFlow's folded CFG ("self") or the
        frozen teacher's guided velocity u_T(z, t, 0 | y) with scale ``teacher_cfg_scale`` inside
        [t_start, t_end] ("teacher"; label-dropped rows get the teacher's unconditional velocity)."""
        m = self.config.model
        bz = z_t.shape[0]
        if m.boundary_target == "self":
            def v_fn(z, t, y):
                return model(z, t.reshape(bz), jnp.zeros((bz,)), y)

            return guidance_terms(v_fn, v, z_t, t, labels, m)["v_g_guided"]
        teacher = model.teacher
        null = jnp.full_like(labels, m.num_classes)
        tb, zero = t.reshape(bz), jnp.zeros((bz,))
        both = sg(teacher(jnp.concatenate([z_t, z_t]), jnp.concatenate([tb, tb]), jnp.concatenate([zero, zero]),
                          jnp.concatenate([labels, null])))
        cond, uncond = jnp.split(both, 2)
        scale = jnp.where((t >= m.t_start) & (t <= m.t_end), m.teacher_cfg_scale, 1.0)
        return jnp.where(drop[:, None, None, None], uncond, uncond + scale * (cond - uncond))

    def objective(self, model, x, labels, t_draw, r_draw, noise, drop_u, lam_u=None):
        """(loss, terms). ``lam_u`` (B,) uniforms for lambda (drawn by ``loss``)."""
        m = self.config.model
        x = x.astype(jnp.float32)
        bz = x.shape[0]
        n_b = int(bz * m.flow_ratio)  # boundary rows [:n_b] (r = t), split rows [n_b:]
        t, r = sample_tr(t_draw, r_draw, m, m.flow_ratio)
        z_t = (1 - t) * x + t * noise
        v = noise - x
        # Label drop first (it only needs v for the boundary rows' unguided target).
        y_inp, _, drop = cond_drop(v, v, labels, drop_u, m)

        # Boundary rows: instantaneous velocity, CFG folded in (guidance forwards on these rows only).
        sl_b = slice(0, n_b)
        v_b = self.boundary_velocity(model, z_t[sl_b], t[sl_b], v[sl_b], labels[sl_b], drop[sl_b])
        v_b = jnp.where(drop[sl_b, None, None, None], v[sl_b], v_b) if m.boundary_target == "self" else v_b

        # Split rows: the interval-splitting target, two no-grad evaluations on these rows only.
        sl_s = slice(n_b, bz)
        lam = lam_u[sl_s].reshape(-1, 1, 1, 1)
        t_s, r_s, z_s_t, y_s = t[sl_s], r[sl_s], z_t[sl_s], y_inp[sl_s]
        s = (1 - lam) * t_s + lam * r_s
        n_s = bz - n_b

        def u_net(z, t_end, t_start, y):
            return model(z, t_end.reshape(n_s), (t_end - t_start).reshape(n_s), y)

        u2 = sg(u_net(z_s_t, t_s, s, y_s))
        z_s = sg(z_s_t - (t_s - s) * u2)
        u1 = sg(u_net(z_s, s, r_s, y_s))
        split_tgt = (1 - lam) * u1 + lam * u2

        u_tgt = sg(jnp.concatenate([v_b, split_tgt]))
        u = model(z_t, t.reshape(bz), (t - r).reshape(bz), y_inp)
        terms = {"t": t, "r": r, "s": s, "lam": lam, "z_t": z_t, "v": v, "y_inp": y_inp, "u1": u1, "u2": u2,
                 "u": u, "u_tgt": u_tgt, **adaptive_loss(u, u_tgt, m)}
        terms["v_loss"] = jnp.sum(jnp.square(u - v), axis=(1, 2, 3))  # monitoring only
        terms["boundary_sq"] = terms["sq_per_sample"][:n_b]
        terms["split_sq"] = terms["sq_per_sample"][n_b:]
        return terms["loss"], terms

    def loss(self, model, batch, rng):
        x = batch["latent"] if "latent" in batch else batch["image"]
        rng, rng_lam = jax.random.split(rng)
        loss, terms = self.objective(model, x, batch["label"], **meanflow.draws(rng, x),
                                     lam_u=jax.random.uniform(rng_lam, (x.shape[0],)))
        metrics = {"loss": loss, "v_loss": terms["v_loss"].mean(), "sq_loss": terms["sq_per_sample"].mean()}
        if terms["boundary_sq"].size:
            metrics["boundary_sq"] = terms["boundary_sq"].mean()
        if terms["split_sq"].size:
            metrics["split_sq"] = terms["split_sq"].mean()
        return loss, metrics


# ----------------------------------------------------------------------------- two-stage initialisation

def time_flip_matrix(frequency_embedding_size: int, max_period: float = 10000.0) -> np.ndarray:
    """M with e(1 - t) = e(t) @ M for the sinusoid e(t) = [cos(f t), sin(f t)] of layers.timestep_embedding:
    cos(f(1-t)) = cos f cos ft + sin f sin ft, sin(f(1-t)) = sin f cos ft - cos f sin ft."""
    half = frequency_embedding_size // 2
    f = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
    c, s = np.cos(f), np.sin(f)
    m = np.zeros((frequency_embedding_size, frequency_embedding_size))
    i = np.arange(half)
    m[i, i], m[half + i, i] = c, s  # column of cos(f(1-t))
    m[i, half + i], m[half + i, half + i] = s, -c  # column of sin(f(1-t))
    return m  # an odd frequency_embedding_size pads a zero column; it stays zero (row and column 2*half)


def student_params_from_sit(dit_params: dict, *, patch_size: int, in_channels: int, hidden_size: int) -> dict:
    """MeanFlow-DiT params from a SiT-objective DiT's (``models/dit.py``): u(z, t, 0, y) = -v_SiT(z, 1 - t, y)
    exactly, and the h embedder is zero (its output is 0 for every h)."""
    p = jax.tree.map(np.asarray, dit_params)
    out = jax.tree.map(np.array, {k: v for k, v in p.items()})
    # t -> 1 - t inside the t embedder's first linear map (kernel (F, D): e(1 - t) @ W = e(t) @ (M W)).
    w = p["t_embedder"]["linear_1"]["kernel"]
    freq = w.shape[0]
    flip = np.eye(freq)
    flip[: 2 * (freq // 2), : 2 * (freq // 2)] = time_flip_matrix(2 * (freq // 2))
    out["t_embedder"]["linear_1"]["kernel"] = (flip @ w.astype(np.float64)).astype(w.dtype)
    # Output: the velocity half (drop learned sigma), negated (MeanFlow's v = noise - data).
    lin = p["final_layer"]["linear"]
    out_ch = lin["kernel"].shape[1] // (patch_size * patch_size)
    if out_ch not in (in_channels, 2 * in_channels):
        raise ValueError(f"teacher final layer has {lin['kernel'].shape[1]} outputs, not patch^2 x "
                         f"{in_channels} (or x2 with learned sigma)")
    kernel = lin["kernel"].reshape(-1, patch_size, patch_size, out_ch)[..., :in_channels]
    bias = lin["bias"].reshape(patch_size, patch_size, out_ch)[..., :in_channels]
    out["final_layer"]["linear"] = {"kernel": -kernel.reshape(kernel.shape[0], -1), "bias": -bias.reshape(-1)}
    # A zero h embedder (its last linear map is zero), so the student starts equal to the teacher.
    rng = np.random.default_rng(0)
    out["h_embedder"] = {
        "linear_1": {"kernel": (0.02 * rng.standard_normal((freq, hidden_size))).astype(np.float32),
                     "bias": np.zeros((hidden_size,), np.float32)},
        "linear_2": {"kernel": np.zeros((hidden_size, hidden_size), np.float32),
                     "bias": np.zeros((hidden_size,), np.float32)}}
    return out


def two_stage_params(dit_params: dict, model_config) -> dict:
    """Params of :class:`StudentWithTeacher` (student = teacher = the converted flow-matching DiT)."""
    m = model_config
    student = student_params_from_sit(dit_params, patch_size=m.patch_size, in_channels=m.in_channels,
                                      hidden_size=m.hidden_size)
    return {"student": student, "teacher": jax.tree.map(np.copy, student)}


def import_sit_teacher(state_dict: dict[str, np.ndarray], config) -> dict:
    """IMPORTERS entry ``splitmeanflow_sit``: an upstream DiT/SiT torch checkpoint (or a zoo DiT
    checkpoint exported as a state_dict) -> step-0 params of a two-stage SplitMeanFlow run."""
    if config.model.boundary_target != "teacher":
        raise ValueError("kind splitmeanflow_sit builds the two-stage model: use a config with "
                         "config.model.boundary_target='teacher' (e.g. configs/splitmeanflow_xl2.py:two_stage)")
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    if depth != config.model.depth:
        raise ValueError(f"checkpoint has {depth} blocks but config.model.depth={config.model.depth}")
    params = two_stage_params(dit.params_from_torch(state_dict, depth), config.model)
    model = SplitMeanFlow(config).create_model(nnx.Rngs(0))
    meanflow.load_params(model, params)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


IMPORTERS = {"splitmeanflow_sit": import_sit_teacher}

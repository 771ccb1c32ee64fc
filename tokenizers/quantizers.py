"""Vector quantizers shared by the discrete tokenizers (One-D-Piece/TiTok, ReTok, TokenFlow).

Layout: vectors to quantize are channels-last, ``(..., dim)``; indices are
``(...)`` int32. Everything here runs in float32 (upstream quantizers switch
autocast off).

Pieces, composable so that wrappers reuse them instead of copying:

* :func:`l2_normalize` -- ``torch.nn.functional.normalize`` (x / max(||x||, eps)).
* :func:`squared_distances` -- ``|z|^2 + |e|^2 - 2 z.e``, the form every upstream
  VQ uses (TiTok ``VectorQuantizer``, taming, LlamaGen), so argmin ties break alike.
* :func:`vq_losses` -- commitment ``beta * mean((sg(z_q) - z)^2)`` and codebook
  ``mean((z_q - sg(z))^2)``.
* :func:`straight_through` and :func:`rotation_trick` -- the two gradient
  estimators (the forward value is ``z_q`` for both).
* :func:`code_usage` -- codebook-usage statistics of a batch of indices.
* :class:`VectorQuantizer` -- an ``nnx`` module with one codebook
  (``embedding``: (codebook_size, dim), logical axes ``("codebook", "channels")``):
  ``nearest(z)`` gives indices and the distance table, ``quantize_indices(z, idx)``
  turns any choice of indices into (z_q, losses) -- the hook for a shared-index dual
  codebook (TokenFlow: ``idx = argmin(d_sem + w * d_pix)`` over two quantizers'
  ``distances``) and for multi-scale residual quantization (call the quantizer on
  each scale's residual and sum the z_q's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from trainers import sharding  # noqa: F401  (sets flax_always_shard_variable=False before any Param exists)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along ``axis`` (torch ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """(..., dim) x (K, dim) -> (..., K): |z|^2 + |e|^2 - 2 z.e (float32)."""
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    return (jnp.sum(jnp.square(z), axis=-1, keepdims=True) + jnp.sum(jnp.square(codebook), axis=-1)
            - 2.0 * jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST))


def vq_losses(z: jax.Array, z_q: jax.Array, commitment_cost: float) -> dict[str, jax.Array]:
    """VQ-VAE losses on the (already normalised, if l2) encoder output ``z`` and its code ``z_q``.

    commitment = beta * mean((sg(z_q) - z)^2) trains the encoder; codebook = mean((z_q - sg(z))^2)
    trains the codebook; quantizer_loss is their sum (TiTok ``VectorQuantizer.forward``).
    """
    commitment = commitment_cost * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    codebook = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    return {"quantizer_loss": commitment + codebook, "commitment_loss": commitment, "codebook_loss": codebook}


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """z + sg(z_q - z): forward value z_q, gradient copied to z (van den Oord et al. 2017)."""
    return z + jax.lax.stop_gradient(z_q - z)


def rotation_trick(z: jax.Array, z_q: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The rotation trick (Fifty et al. 2024, arXiv 2410.06424, eq. 4 with the Householder form).

    Forward value z_q; the gradient reaches z through ``sg(||z_q|| / ||z||) * sg(R) z``, where R is
    the rotation taking z/||z|| onto z_q/||z_q|| (R = I - 2 w w^T + 2 q u^T with u = z/||z||,
    q = z_q/||z_q||, w = (u + q)/||u + q||, all treated as constants). Under l2-normalised codes
    the scale is 1 (ReTok's ``rot: True``).
    """
    norm_z = jnp.linalg.norm(z, axis=-1, keepdims=True)
    norm_q = jnp.linalg.norm(z_q, axis=-1, keepdims=True)
    u = jax.lax.stop_gradient(z / jnp.maximum(norm_z, eps))
    q = jax.lax.stop_gradient(z_q / jnp.maximum(norm_q, eps))
    w = jax.lax.stop_gradient(l2_normalize(u + q, eps=eps))
    rotated = (z - 2.0 * jnp.sum(z * w, axis=-1, keepdims=True) * w
               + 2.0 * jnp.sum(z * u, axis=-1, keepdims=True) * q)
    scale = jax.lax.stop_gradient(norm_q / jnp.maximum(norm_z, eps))
    out = rotated * scale
    # Exact forward value (the rotation reproduces z_q only up to rounding).
    return out + jax.lax.stop_gradient(z_q - out)


GRADIENT_ESTIMATORS = {"straight_through": straight_through, "rotation_trick": rotation_trick}


def code_usage(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Usage statistics of a batch of code indices (any shape).

    ``counts`` (K,) int32; ``usage``: fraction of the K codes used at least once; ``perplexity``:
    exp of the entropy of the empirical code distribution (K when uniform, 1 when collapsed).
    """
    counts = jnp.bincount(indices.reshape(-1), length=codebook_size)
    probs = counts / jnp.maximum(counts.sum(), 1)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return {"counts": counts.astype(jnp.int32), "usage": jnp.mean(counts > 0),
            "perplexity": jnp.exp(entropy)}


def uniform_codebook_init(key, shape, dtype=jnp.float32):
    """U(-1/K, 1/K) for a (K, dim) codebook (TiTok and taming ``VectorQuantizer``)."""
    k = shape[0]
    return jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)


class VectorQuantizer(nnx.Module):
    """Nearest-neighbour vector quantization with one codebook.

    ``__call__(z)`` with z (..., dim) returns ``(z_q, info)``: z_q (..., dim) carries the gradient
    estimator's gradient to z; ``info`` holds ``indices`` (...) int32 and the scalar losses of
    :func:`vq_losses`. With ``use_l2_norm`` the inputs and the codebook are l2-normalised before the
    search, z_q is the normalised code, and the losses compare normalised vectors (TiTok,
    ``use_l2_norm: True``).
    """

    def __init__(self, codebook_size: int, dim: int, *, commitment_cost: float = 0.25,
                 use_l2_norm: bool = False, estimator: str = "straight_through", rngs: nnx.Rngs,
                 codebook_init=uniform_codebook_init):
        if estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(f"quantizer estimator={estimator!r}: one of {sorted(GRADIENT_ESTIMATORS)}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.estimator = estimator
        self.embedding = nnx.Param(codebook_init(rngs.params(), (codebook_size, dim)),
                                   out_sharding=("codebook", "channels"))

    def codebook(self) -> jax.Array:
        """(K, dim) float32 codes as the search sees them (l2-normalised when use_l2_norm)."""
        e = self.embedding[...].astype(jnp.float32)
        return l2_normalize(e) if self.use_l2_norm else e

    def prepare(self, z: jax.Array) -> jax.Array:
        """The encoder output as compared with the codes: float32, l2-normalised when use_l2_norm."""
        z = z.astype(jnp.float32)
        return l2_normalize(z) if self.use_l2_norm else z

    def distances(self, z: jax.Array) -> jax.Array:
        """(..., dim) -> (..., K) squared distances between prepare(z) and the codebook."""
        return squared_distances(self.prepare(z), self.codebook())

    def nearest(self, z: jax.Array) -> jax.Array:
        """(..., dim) -> (...) int32 indices of the nearest codes."""
        return jnp.argmin(self.distances(z), axis=-1).astype(jnp.int32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """(...) int -> (..., dim) codes (normalised when use_l2_norm), TiTok ``get_codebook_entry``."""
        return jnp.take(self.codebook(), indices, axis=0)

    def quantize_indices(self, z: jax.Array, indices: jax.Array):
        """(z_q with the estimator's gradient, info) for a given choice of indices."""
        zn = self.prepare(z)
        z_q = self.lookup(indices)
        info = vq_losses(zn, z_q, self.commitment_cost)
        info["indices"] = indices
        return GRADIENT_ESTIMATORS[self.estimator](zn, z_q), info

    def __call__(self, z: jax.Array):
        return self.quantize_indices(z, self.nearest(z))


# ----------------------------------------------------------------------------
# TokenFlow: one index over two codebooks, and multi-scale residual quantization
# ----------------------------------------------------------------------------


def entropy_loss(affinity: jax.Array, temperature: float = 0.01) -> jax.Array:
    """LlamaGen/TokenFlow ``compute_entropy_loss(affinity)`` (softmax type): mean per-vector entropy
    of softmax(affinity / T) minus the entropy of the mean distribution (both over the last axis)."""
    a = affinity.reshape(-1, affinity.shape[-1]).astype(jnp.float32) / temperature
    probs = jax.nn.softmax(a, axis=-1)
    log_probs = jax.nn.log_softmax(a + 1e-5, axis=-1)
    avg = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg * jnp.log(avg + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


class SharedIndexQuantizer(nnx.Module):
    """TokenFlow's dual codebook: a semantic and a pixel codebook of the same size K, one index.

    z (..., split[0] + split[1]) is split into its semantic and pixel parts; each part and each
    codebook is l2-normalised on its own (``semantic``/``pixel`` are :class:`VectorQuantizer` with
    ``use_l2_norm``), and the shared index is ``argmin_k d_sem[k] + distance_weight * d_pix[k]``
    (the paper's w_dis; upstream hard-codes 1.0). z_q = concat(e_sem[i], e_pix[i]); losses on the
    concatenated normalised vectors (vq = mean((z_q - sg(z))^2), commitment = beta * mean((sg(z_q) -
    z)^2)), the entropy term ``entropy_loss_ratio * entropy_loss(-d)``, and the distance norms
    ``vqkd_d_norm``/``vqgan_d_norm`` = mean over vectors of sum_k d^2 (upstream logs them).
    """

    def __init__(self, codebook_size: int, split: tuple[int, int], *, commitment_cost: float = 0.25,
                 distance_weight: float = 1.0, entropy_loss_ratio: float = 0.0,
                 entropy_temperature: float = 0.01, estimator: str = "straight_through", rngs: nnx.Rngs,
                 codebook_init=uniform_codebook_init):
        self.split = tuple(int(s) for s in split)
        self.codebook_size = codebook_size
        self.distance_weight = float(distance_weight)
        self.entropy_loss_ratio = float(entropy_loss_ratio)
        self.entropy_temperature = float(entropy_temperature)
        self.commitment_cost = commitment_cost
        if estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(f"quantizer estimator={estimator!r}: one of {sorted(GRADIENT_ESTIMATORS)}")
        self.estimator = estimator
        kw = dict(commitment_cost=commitment_cost, use_l2_norm=True, rngs=rngs, codebook_init=codebook_init)
        self.semantic = VectorQuantizer(codebook_size, self.split[0], **kw)
        self.pixel = VectorQuantizer(codebook_size, self.split[1], **kw)

    def _parts(self, z):
        return z[..., :self.split[0]], z[..., self.split[0]:]

    def distances(self, z: jax.Array):
        """(d_sem, d_pix), each (..., K)."""
        zs, zp = self._parts(z)
        return self.semantic.distances(zs), self.pixel.distances(zp)

    def nearest(self, z: jax.Array) -> jax.Array:
        d_sem, d_pix = self.distances(z)
        return jnp.argmin(d_sem + self.distance_weight * d_pix, axis=-1).astype(jnp.int32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """(...) -> (..., split[0] + split[1]) concatenated normalised codes (``get_codebook_entry``)."""
        return jnp.concatenate([self.semantic.lookup(indices), self.pixel.lookup(indices)], axis=-1)

    def __call__(self, z: jax.Array):
        zs, zp = self._parts(z)
        d_sem, d_pix = self.semantic.distances(zs), self.pixel.distances(zp)
        d = d_sem + self.distance_weight * d_pix
        indices = jnp.argmin(d, axis=-1).astype(jnp.int32)
        zn = jnp.concatenate([self.semantic.prepare(zs), self.pixel.prepare(zp)], axis=-1)
        z_q = self.lookup(indices)
        info = vq_losses(zn, z_q, self.commitment_cost)
        info["indices"] = indices
        info["entropy_loss"] = (self.entropy_loss_ratio * entropy_loss(-d, self.entropy_temperature)
                                if self.entropy_loss_ratio else jnp.zeros((), jnp.float32))
        info["vqkd_d_norm"] = jnp.mean(jnp.sum(jnp.square(d_sem.reshape(-1, d.shape[-1])), axis=-1))
        info["vqgan_d_norm"] = jnp.mean(jnp.sum(jnp.square(d_pix.reshape(-1, d.shape[-1])), axis=-1))
        return GRADIENT_ESTIMATORS[self.estimator](zn, z_q), info


def multiscale_residual_quantize(quantizer, h: jax.Array, scales, *, down, up, keep=None):
    """VAR-style residual quantization over a list of grid sizes (TokenFlow ``encode``).

    h (B, S, S, C). For each scale s: r_s = down(residual, s) (area), (q_s, info_s) = quantizer(r_s),
    q_up = up(q_s, S) (bicubic; identity at s == S); f += q_up; residual -= sg(q_up). ``down``/``up``
    are ``(x, (h, w)) -> x`` resizes (``eval.resize.torch_area`` / ``torch_bicubic``).

    ``keep`` (n_scales,) float/bool, optional: 0 drops a scale (it neither adds to f nor changes the
    residual and is left out of the loss mean), which equals removing it from the list while keeping
    shapes static (TokenFlow's training-time random scale drop). Returns (f, indices (B, sum s^2)
    int32 coarse-to-fine row-major per scale, dropped scales' indices included as computed, losses =
    the mean over kept scales of every scalar in info, per_scale = list of (r_s, q_s, info_s)).
    """
    b, size = h.shape[0], h.shape[1]
    residual, f = h, jnp.zeros_like(h)
    keep = jnp.ones((len(scales),), jnp.float32) if keep is None else jnp.asarray(keep, jnp.float32)
    indices, per_scale, sums = [], [], {}
    for k, s in enumerate(scales):
        r = down(residual, (s, s))
        q, info = quantizer(r)
        q_up = up(q, (size, size)) * keep[k]
        f = f + q_up
        residual = residual - jax.lax.stop_gradient(q_up)
        indices.append(info["indices"].reshape(b, s * s))
        per_scale.append((r, q, info))
        for name, value in info.items():
            if name != "indices" and jnp.ndim(value) == 0:
                sums[name] = sums.get(name, 0.0) + keep[k] * value
    n = jnp.maximum(jnp.sum(keep), 1.0)
    return f, jnp.concatenate(indices, axis=1), {k: v / n for k, v in sums.items()}, per_scale


def multiscale_decode_indices(quantizer, indices: jax.Array, scales, size: int, *, up) -> jax.Array:
    """(B, sum s^2) indices -> f (B, size, size, C): the sum over scales of up(lookup(codes_s)) (TokenFlow
    ``decode_code`` before the decoders)."""
    f, at = 0.0, 0
    for s in scales:
        codes = quantizer.lookup(indices[:, at:at + s * s]).reshape(indices.shape[0], s, s, -1)
        f = f + up(codes, (size, size))
        at += s * s
    if at != indices.shape[1]:
        raise ValueError(f"indices have {indices.shape[1]} tokens, scales {tuple(scales)} need {at}")
    return f

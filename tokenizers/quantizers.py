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

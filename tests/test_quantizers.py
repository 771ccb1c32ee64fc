"""The shared vector quantizers (tokenizers/quantizers.py): search, losses, gradient estimators, usage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers import quantizers


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    return rng.randn(5, 7, 4).astype(np.float32), rng.randn(16, 4).astype(np.float32)


@pytest.mark.parametrize("use_l2_norm", [False, True])
def test_nearest_code_and_losses_match_numpy(data, use_l2_norm):
    z, codebook = data
    vq = quantizers.VectorQuantizer(16, 4, use_l2_norm=use_l2_norm, rngs=nnx.Rngs(0))
    vq.embedding[...] = jnp.asarray(codebook)
    z_q, info = vq(jnp.asarray(z))
    normalize = (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)) if use_l2_norm else (lambda a: a)
    zn, en = normalize(z), normalize(codebook)
    idx = np.argmin(((zn[..., None, :] - en) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(np.asarray(info["indices"]), idx)
    np.testing.assert_allclose(np.asarray(z_q), en[idx], atol=1e-6)  # forward value = the code
    mse = np.mean((en[idx] - zn) ** 2)
    np.testing.assert_allclose(float(info["commitment_loss"]), 0.25 * mse, rtol=1e-5)
    np.testing.assert_allclose(float(info["codebook_loss"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(info["quantizer_loss"]), 1.25 * mse, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vq.lookup(info["indices"])), en[idx], atol=1e-6)


def test_straight_through_copies_the_gradient_and_codebook_loss_trains_the_codes(data):
    z, codebook = data
    w = jnp.asarray(np.random.RandomState(1).randn(*z.shape).astype(np.float32))
    vq = quantizers.VectorQuantizer(16, 4, rngs=nnx.Rngs(0))
    vq.embedding[...] = jnp.asarray(codebook)
    grad = jax.grad(lambda z: jnp.sum(vq(z)[0] * w))(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(w), atol=1e-6)
    # The codebook loss trains the codes, the commitment loss the encoder output (and not the codes).
    graphdef, state = nnx.split(vq)

    def loss_of(name):
        return lambda st, z: nnx.merge(graphdef, st)(z)[1][name]

    g_code_state, g_code_z = jax.grad(loss_of("codebook_loss"), argnums=(0, 1))(state, jnp.asarray(z))
    g_commit_state, g_commit_z = jax.grad(loss_of("commitment_loss"), argnums=(0, 1))(state, jnp.asarray(z))
    assert float(jnp.abs(g_code_state["embedding"][...]).max()) > 0 and float(jnp.abs(g_code_z).max()) == 0
    assert float(jnp.abs(g_commit_state["embedding"][...]).max()) == 0 and float(jnp.abs(g_commit_z).max()) > 0


def test_rotation_trick_forward_is_the_code_and_gradient_is_the_rotation():
    rng = np.random.RandomState(2)
    z = jnp.asarray(rng.randn(6, 5).astype(np.float32))
    q = jnp.asarray(rng.randn(6, 5).astype(np.float32))
    out = quantizers.rotation_trick(z, q)
    np.testing.assert_allclose(np.asarray(out), np.asarray(q), atol=1e-6)
    # d out / d z = (|q|/|z|) R with R the rotation taking z/|z| to q/|q|: R maps z to |z| q/|q|.
    jac = jax.vmap(jax.jacobian(lambda a, b: quantizers.rotation_trick(a, b)))(z, q)
    rotated = jnp.einsum("bij,bj->bi", jac, z)
    np.testing.assert_allclose(np.asarray(rotated), np.asarray(q), atol=1e-5)
    # R is a scaled rotation: orthogonal up to |q|/|z|, unlike the straight-through identity.
    scale = np.linalg.norm(np.asarray(q), axis=-1) / np.linalg.norm(np.asarray(z), axis=-1)
    gram = np.einsum("bij,bkj->bik", np.asarray(jac), np.asarray(jac)) / scale[:, None, None] ** 2
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(5), gram.shape), atol=1e-4)
    # A code in z's own direction is reached by scaling only.
    same = quantizers.rotation_trick(z, 2.0 * z)
    g = jax.grad(lambda a: jnp.sum(quantizers.rotation_trick(a, 2.0 * jax.lax.stop_gradient(z))))(z)
    np.testing.assert_allclose(np.asarray(same), 2.0 * np.asarray(z), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g), 2.0 * np.ones_like(np.asarray(z)), atol=1e-4)
    vq = quantizers.VectorQuantizer(8, 5, use_l2_norm=True, estimator="rotation_trick", rngs=nnx.Rngs(0))
    z_q, info = vq(z)
    np.testing.assert_allclose(np.asarray(z_q), np.asarray(vq.lookup(info["indices"])), atol=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        quantizers.VectorQuantizer(8, 5, estimator="gumbel", rngs=nnx.Rngs(0))


def test_code_usage_statistics():
    k = 8
    uniform = quantizers.code_usage(jnp.arange(4 * k) % k, k)
    np.testing.assert_allclose(float(uniform["perplexity"]), k, rtol=1e-5)
    assert float(uniform["usage"]) == 1.0 and uniform["counts"].tolist() == [4] * k
    collapsed = quantizers.code_usage(jnp.full((3, 5), 2), k)
    np.testing.assert_allclose(float(collapsed["perplexity"]), 1.0, rtol=1e-6)
    assert float(collapsed["usage"]) == 1 / k


def test_shared_index_hook_quantizes_any_choice_of_indices(data):
    """A dual codebook (TokenFlow) picks indices from two quantizers' summed distances, then
    quantizes each branch with them: quantize_indices serves that without a second copy."""
    z, codebook = data
    a = quantizers.VectorQuantizer(16, 4, use_l2_norm=True, rngs=nnx.Rngs(0))
    b = quantizers.VectorQuantizer(16, 4, use_l2_norm=True, rngs=nnx.Rngs(1))
    za, zb = jnp.asarray(z), jnp.asarray(z[..., ::-1])
    shared = jnp.argmin(a.distances(za) + 0.5 * b.distances(zb), axis=-1)
    qa, ia = a.quantize_indices(za, shared)
    qb, ib = b.quantize_indices(zb, shared)
    np.testing.assert_array_equal(np.asarray(ia["indices"]), np.asarray(ib["indices"]))
    np.testing.assert_allclose(np.asarray(qa), np.asarray(a.lookup(shared)), atol=1e-6)

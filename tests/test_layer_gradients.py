"""The shared layers with hand-written derivatives (``layers.softmax``, ``layers.gelu``) and the q/k/v split
(``layers.split_heads``): the same values as jax's own functions, gradients and forward-mode tangents equal
to jax's autodiff at float32 rounding, and only what the backward pass needs kept for it."""

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def _saved(fn, x, capsys) -> list[str]:
    """The residuals jax keeps for ``fn``'s backward pass, one line each (``print_saved_residuals``)."""
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(fn, x)
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def _grad_close(ours, ref, x, rtol=1e-5):
    w = jax.random.normal(jax.random.key(7), ref(x).shape)  # a generic cotangent

    def loss(f):
        return lambda x: jnp.sum(jnp.sin(f(x).astype(jnp.float32)) * w)

    g, g_ref = jax.jit(jax.grad(loss(ours)))(x), jax.jit(jax.grad(loss(ref)))(x)
    scale = float(jnp.max(jnp.abs(g_ref.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=rtol,
                               atol=rtol * scale)


@pytest.mark.parametrize("shape", [(3, 17), (2, 2, 9, 33)])
def test_softmax_values_gradients_and_residual(shape, capsys):
    x = 4 * jax.random.normal(jax.random.key(0), shape)
    x = x.at[..., 0].set(-1e30)  # a masked score (the attention reference's finfo.min fill)
    ref = lambda x: jax.nn.softmax(x, axis=-1)  # noqa: E731
    np.testing.assert_array_equal(layers.softmax(x), ref(x))
    np.testing.assert_array_equal(jax.jit(layers.softmax)(x), jax.jit(ref)(x))
    _grad_close(layers.softmax, ref, x)
    saved = _saved(lambda x: jnp.sum(layers.softmax(x) ** 2), x, capsys)
    assert len(saved) == 2 and sum("_softmax_jvp" in line for line in saved) == 1, saved  # p (and p**2's p)
    assert len(_saved(lambda x: jnp.sum(ref(x) ** 2), x, capsys)) > len(saved)  # jax keeps exp and 1 / sum too


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_values_gradients_and_residual(approximate, dtype, capsys):
    x = (3 * jax.random.normal(jax.random.key(1), (4, 257))).astype(dtype)
    ref = lambda x: jax.nn.gelu(x, approximate=approximate)  # noqa: E731
    ours = lambda x: layers.gelu(x, approximate)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(ours(x), np.float32), np.asarray(ref(x), np.float32))
    if dtype == jnp.float32:
        _grad_close(ours, ref, x)
    else:  # ours differentiates in float32 and rounds once; jax's bfloat16 chain rounds at every step
        xf = x.astype(jnp.float32)
        g = jax.grad(lambda x: jnp.sum(ours(x).astype(jnp.float32)))(x).astype(jnp.float32)
        g32 = jax.grad(lambda x: jnp.sum(ref(x)))(xf)
        np.testing.assert_allclose(g, g32, atol=2 ** -7 * 1.2, rtol=2 ** -7)
    saved = _saved(lambda x: jnp.sum(ours(x).astype(jnp.float32) ** 2), x, capsys)
    assert sum("argument x" in line for line in saved) == 1 and len(saved) == 2, saved  # x, and gelu(x) for **2


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_mlp_gradient_keeps_less(approximate):
    """In an MLP's compiled gradient, the tanh / erfc is recomputed, not kept: fewer temporaries and
    fewer bytes moved than with jax's gradient (XLA's CSE would otherwise share the forward's)."""
    x, w1, w2 = jnp.ones((512, 64)), jnp.ones((64, 256)), jnp.ones((256, 64))

    def stats(act):
        grad = jax.jit(jax.grad(lambda w1, w2: jnp.sum(jnp.sin(act(x @ w1) @ w2)), argnums=(0, 1)))
        compiled = grad.lower(w1, w2).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return compiled.memory_analysis().temp_size_in_bytes, cost["bytes accessed"]

    ours = stats(lambda h: layers.gelu(h, approximate))
    ref = stats(lambda h: jax.nn.gelu(h, approximate=approximate))
    assert ours[0] < ref[0] and ours[1] < ref[1], (ours, ref)


@pytest.mark.parametrize("parts", [1, 3])
def test_split_heads_is_the_permuted_unpack(parts):
    b, n, heads, d = 2, 5, 3, 4
    x = jax.random.normal(jax.random.key(2), (b, n, parts * heads * d))

    def ref(x):
        return tuple(jnp.moveaxis(x.reshape(b, n, parts, heads, d), (2, 3), (0, 2)))  # timm's permute

    for a, r in zip(layers.split_heads(x, parts, heads), ref(x), strict=True):
        assert a.shape == (b, heads, n, d)
        np.testing.assert_array_equal(a, r)
    w = jax.random.normal(jax.random.key(3), (parts, b, heads, n, d))
    g = jax.grad(lambda x: jnp.sum(jnp.stack(layers.split_heads(x, parts, heads)) * w))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.stack(ref(x)) * w))(x)
    np.testing.assert_array_equal(g, g_ref)


def test_forward_mode_and_its_gradient():
    """MeanFlow differentiates a ``jax.jvp`` of the network: tangents and the gradient of a tangent."""
    x = jax.random.normal(jax.random.key(4), (3, 8, 16))
    dx = jax.random.normal(jax.random.key(5), x.shape)
    for ours, ref in ((layers.softmax, lambda x: jax.nn.softmax(x, axis=-1)),
                      (layers.gelu, lambda x: jax.nn.gelu(x, approximate=True)),
                      (lambda x: layers.gelu(x, False), lambda x: jax.nn.gelu(x, approximate=False))):
        (y, t), (y_ref, t_ref) = jax.jvp(ours, (x,), (dx,)), jax.jvp(ref, (x,), (dx,))
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda x: jnp.sum(jax.jvp(ours, (x,), (dx,))[1] ** 2))(x)
        g_ref = jax.grad(lambda x: jnp.sum(jax.jvp(ref, (x,), (dx,))[1] ** 2))(x)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))

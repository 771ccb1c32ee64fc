"""DiT's config.model.attention_impl: the fused kernels agree with the XLA reference (values and gradients
of the whole network) on CPU and lower for cuda (cuDNN flash) and tpu (Pallas splash); the residual-stream
gradient barrier (layers.grad_fusion_barrier) is the identity and keeps its conditional only on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dit_s
from models import dit, layers
from trainers.method import get_method


def _tiny(impl, dtype=jnp.float32, depth=1):
    return dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                   num_classes=10, rngs=nnx.Rngs(0), dtype=dtype, attention_impl=impl)


def _randomise(model):
    """adaLN-Zero starts every block as the identity: random parameters so attention reaches the output."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


def _inputs():
    ks = jax.random.split(jax.random.key(3), 2)
    return jax.random.normal(ks[0], (1, 8, 8, 4)), jax.random.uniform(ks[1], (1,)) * 999, jnp.asarray([7])


@pytest.mark.slow  # Pallas interpret mode on CPU: ~1-2 min on a loaded 2-core machine
def test_pallas_forward_and_grad_match_xla():
    ref, fused = _randomise(_tiny("xla")), _randomise(_tiny("pallas"))
    x, t, y = _inputs()
    forward = nnx.jit(lambda model: model(x, t, y))
    np.testing.assert_allclose(forward(fused), forward(ref), atol=2e-5, rtol=2e-5)
    grad = nnx.jit(nnx.grad(lambda model: jnp.sum(model(x, t, y) ** 2)))
    g_ref, g = grad(ref), grad(fused)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):  # the fixtures' tolerance, per parameter
        assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(b)))), np.max(np.abs(a - b))


def test_config_field_reaches_every_block_and_is_validated():
    config = dit_s.get_config("p2")
    assert config.model.attention_impl == "auto"
    config.model.update(depth=1, hidden_size=32, num_heads=2)
    config.model.attention_impl = "pallas"
    model = get_method(config).create_model(nnx.Rngs(0))
    assert [b.attn.attention_impl for b in model.blocks] == ["pallas"]
    config.model.attention_impl = "flash"
    with pytest.raises(ValueError, match="config.model.attention_impl"):
        get_method(config).validate_config(config)


def _grad_fn(impl, dtype, depth=1):
    graphdef, params = nnx.split(_tiny(impl, dtype, depth))

    def loss(params, x, t, y):
        return jnp.sum(nnx.merge(graphdef, params)(x, t, y) ** 2)

    args = (jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.int32))
    return jax.jit(jax.grad(loss)), params, args


def _custom_calls(text):
    return {line.split("custom_call @")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line}


def test_pallas_lowers_for_tpu(monkeypatch):
    monkeypatch.setattr(layers, "PALLAS_INTERPRET", False)  # the TPU kernel, not its CPU interpretation
    fn, params, args = _grad_fn("pallas", jnp.bfloat16)
    text = fn.trace(params, *args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in _custom_calls(text)


def test_cudnn_lowers_for_cuda(monkeypatch):
    """cuDNN flash attention forward and backward (the CPU jaxlib has no cuDNN: its version is pinned)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    fn, params, args = _grad_fn("cudnn", jnp.bfloat16)
    text = fn.trace(params, *args).lower(lowering_platforms=("cuda",)).as_text()
    calls = _custom_calls(text)
    assert any(c.startswith("__cudnn$fmha") and "Backward" not in c for c in calls), calls
    assert any(c.startswith("__cudnn$fmha") and "Backward" in c for c in calls), calls


def test_grad_fusion_barrier_is_the_identity_and_survives_xla_cpu():
    g = jax.random.normal(jax.random.key(0), (2, 3, 4))
    x = jnp.ones((2, 3, 4))
    _, vjp = jax.vjp(layers.grad_fusion_barrier, x)
    np.testing.assert_array_equal(layers.grad_fusion_barrier(x), x)
    np.testing.assert_array_equal(vjp(g)[0], g)
    g_nan = g.at[0, 0, 0].set(jnp.nan)  # NaNs pass through unchanged
    np.testing.assert_array_equal(jax.jit(vjp)(g_nan)[0], g_nan)
    x_nan = x.at[0, 0, 0].set(jnp.nan)  # the branch the predicate (on the primal) takes
    np.testing.assert_array_equal(jax.jit(jax.vjp(layers.grad_fusion_barrier, x_nan)[1])(g)[0], g)
    np.testing.assert_array_equal(jax.jvp(layers.grad_fusion_barrier, (x,), (g,))[1], g)  # forward mode too
    # Only the CPU lowering reads the cotangent for the conditional's predicate (isnan: a compare).
    f = jax.jit(jax.grad(lambda x: jnp.sum(layers.grad_fusion_barrier(x) ** 2)))
    for platform in ("cpu", "cuda", "tpu"):
        text = f.trace(x).lower(lowering_platforms=(platform,)).as_text()
        assert ("stablehlo.compare" in text) == (platform == "cpu"), platform
    # The compiled CPU gradient keeps one conditional per block (XLA must not fold it away).
    fn, params, args = _grad_fn("xla", jnp.float32, depth=2)
    hlo = fn.lower(params, *args).compile().as_text()
    assert hlo.count(" conditional(") == 2, hlo.count(" conditional(")

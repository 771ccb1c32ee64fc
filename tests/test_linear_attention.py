"""Linear attention: Pallas kernels (interpret mode) against the jnp reference, values and gradients;
GPU (Triton) and TPU (Mosaic) lowering from this CPU machine."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import linear_attention, linear_attention_reference

# bf16 inputs carry 8 significant bits (relative rounding 2^-9); the kernels also round the
# float32 state S and the intra-chunk scores to bf16 before their matmuls (fla's choice) and the
# output to bf16, so a few roundings of 2^-9 each bound the error: 3% of the output scale is
# comfortably above that and far below what a wrong mask, state or normaliser gives (O(1)).
BF16_RTOL = 3e-2
F32_RTOL = 2e-5


def _inputs(shape, d_v, dtype, seed=0, signed_features=False):
    b, h, n, d_k = shape
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    feature = (lambda z: z) if signed_features else jax.nn.relu
    q = feature(jax.random.normal(kq, (b, h, n, d_k)))
    k = feature(jax.random.normal(kk, (b, h, n, d_k)))
    v = jax.random.normal(kv, (b, h, n, d_v))
    return tuple(x.astype(dtype) for x in (q, k, v))


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _loss(fn, cotangent):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)


CASES = [
    # (batch, heads, tokens, d_k), d_v, chunk: N below, equal to and not a multiple of the chunk.
    ((1, 2, 40, 32), 32, 16),
    ((2, 1, 16, 16), 24, 16),
    ((1, 1, 9, 48), 16, 16),
]


@pytest.mark.parametrize("variant", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,d_v,chunk", CASES)
def test_kernel_matches_reference_f32(variant, causal, shape, d_v, chunk):
    q, k, v = _inputs(shape, d_v, jnp.float32)
    kernel = lambda q, k, v: linear_attention(q, k, v, causal=causal, impl="pallas", chunk=chunk,
                                              pallas_variant=variant)
    reference = lambda q, k, v: linear_attention_reference(q, k, v, causal=causal)
    assert _rel_err(kernel(q, k, v), reference(q, k, v)) < F32_RTOL
    cot = jax.random.normal(jax.random.PRNGKey(7), v.shape)
    grads = jax.grad(_loss(kernel, cot), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(_loss(reference, cot), argnums=(0, 1, 2))(q, k, v)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert _rel_err(g, g_ref) < F32_RTOL, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize,eps", [("none", 1e-6), ("denominator", 0.0)])
def test_normaliser_options_and_signed_features(causal, normalize, eps):
    # DyDiLA's differential features are signed; eps = 0 must keep padded rows finite.
    q, k, v = _inputs((1, 2, 20, 16), 16, jnp.float32, seed=3, signed_features=normalize == "none")
    kw = dict(causal=causal, normalize=normalize, eps=eps)
    kernel = lambda q, k, v: linear_attention(q, k, v, impl="pallas", chunk=16, **kw)
    reference = lambda q, k, v: linear_attention_reference(q, k, v, **kw)
    out = kernel(q, k, v)
    assert np.all(np.isfinite(np.asarray(out)))
    assert _rel_err(out, reference(q, k, v)) < F32_RTOL
    cot = jax.random.normal(jax.random.PRNGKey(1), v.shape)
    for g, g_ref in zip(jax.grad(_loss(kernel, cot), argnums=(0, 1, 2))(q, k, v),
                        jax.grad(_loss(reference, cot), argnums=(0, 1, 2))(q, k, v)):
        assert np.all(np.isfinite(np.asarray(g)))
        assert _rel_err(g, g_ref) < F32_RTOL


@pytest.mark.parametrize("variant", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_bf16_within_stated_tolerance(variant, causal):
    q, k, v = _inputs((1, 2, 40, 32), 32, jnp.bfloat16, seed=5)
    kernel = lambda q, k, v: linear_attention(q, k, v, causal=causal, impl="pallas", chunk=16,
                                              pallas_variant=variant)
    # The reference sees the same bf16 values, in float32.
    reference = lambda q, k, v: linear_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=causal)
    out = kernel(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, reference(q, k, v)) < BF16_RTOL
    cot = jax.random.normal(jax.random.PRNGKey(2), v.shape)
    grads = jax.grad(_loss(kernel, cot), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(_loss(reference, cot), argnums=(0, 1, 2))(q, k, v)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == jnp.bfloat16
        assert _rel_err(g, g_ref) < BF16_RTOL, name


def test_causal_output_ignores_future_tokens():
    q, k, v = _inputs((1, 1, 24, 16), 16, jnp.float32, seed=4)
    out = linear_attention(q, k, v, causal=True, impl="pallas", chunk=16)
    changed = v.at[:, :, 10:].set(100.0)
    out_changed = linear_attention(q, k, changed, causal=True, impl="pallas", chunk=16)
    np.testing.assert_array_equal(np.asarray(out[:, :, :10]), np.asarray(out_changed[:, :, :10]))
    assert not np.allclose(np.asarray(out[:, :, 10:]), np.asarray(out_changed[:, :, 10:]))


@pytest.mark.parametrize("causal", [False, True])
def test_xla_path_matches_reference(causal):
    q, k, v = _inputs((2, 2, 300, 16), 8, jnp.float32, seed=6)
    ours = linear_attention(q, k, v, causal=causal, impl="xla")
    assert _rel_err(ours, linear_attention_reference(q, k, v, causal=causal)) < F32_RTOL
    # On CPU "auto" is the jnp path.
    np.testing.assert_array_equal(np.asarray(linear_attention(q, k, v, causal=causal)), np.asarray(ours))


def test_rejects_bad_arguments():
    q, k, v = _inputs((1, 1, 8, 16), 16, jnp.float32)
    with pytest.raises(ValueError, match="normalize"):
        linear_attention(q, k, v, normalize="softmax")
    with pytest.raises(ValueError, match="impl"):
        linear_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="expected q, k"):
        linear_attention(q, k[:, :, :4], v)


@pytest.mark.parametrize("platform,marker", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 96])
def test_lowers_for_gpu_and_tpu(platform, marker, causal, d):
    # Lowering builds the Triton / Mosaic kernel IR here; compiling it needs the device.
    q = jax.ShapeDtypeStruct((2, 3, 200, d), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(linear_attention(q, k, v, causal=causal).astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(
        lowering_platforms=(platform,)).as_text()
    kernel_names = set(re.findall(r'linear_attention_\w+', text))
    # forward and backward kernels are all there
    expected = ({"linear_attention_fwd_chunk", "linear_attention_bwd_q_chunk", "linear_attention_bwd_kv_chunk"}
                | (set() if causal else {"linear_attention_kv_state_chunk"}))
    assert marker in text
    assert expected <= kernel_names, kernel_names

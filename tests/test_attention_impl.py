"""config.model.attention_impl: the fused kernels agree with the XLA reference (values and gradients) on
xAR's entity-causal block mask and KV cache; they lower for cuda (cuDNN flash) and tpu (Pallas splash);
a bfloat16-compute train step stays within a stated tolerance of float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers, xar

B, H, D = 2, 2, 16


def _qkv(nq, nk, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, H, nq, D)), jax.random.normal(ks[1], (B, H, nk, D)),
            jax.random.normal(ks[2], (B, H, nk, D)))


def _cell_mask(grid=4, cell=2):
    return xar.make_layout("cell", grid, cell_size=cell).mask()


def test_resolve_auto_and_unknown():
    assert layers.resolve_attention_impl("auto", jnp.float32, "cpu") == "xla"
    assert layers.resolve_attention_impl("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert layers.resolve_attention_impl("auto", jnp.float32, "gpu") == "xla"  # cuDNN flash: half precision only
    assert layers.resolve_attention_impl("auto", jnp.float32, "tpu") == "pallas"
    with pytest.raises(ValueError, match="attention_impl"):
        layers.resolve_attention_impl("flash", jnp.float32)


def _check_against_xla(fn, mask, nq, nk):
    """Values and gradients (w.r.t. q, k, v) of ``fn`` against the XLA reference."""
    q, k, v = _qkv(nq, nk)
    w = jax.random.normal(jax.random.key(9), (B, H, nq, D))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    ref = layers.attention_weights_and_values(q, k, v, jnp.asarray(mask))
    out = fn(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    g_ref = jax.grad(loss(lambda q, k, v: layers.attention_weights_and_values(q, k, v, jnp.asarray(mask))),
                     argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_key_prefix_runs_of_masks():
    runs = layers.key_prefix_runs(_cell_mask())  # 16 tokens, 4 cells of 4
    assert runs == [(0, 4, 4), (4, 8, 8), (8, 12, 12), (12, 16, 16)]
    cached = np.concatenate([np.ones((4, 3), bool), np.tril(np.ones((4, 4), bool))], axis=1)
    assert layers.key_prefix_runs(cached) == [(0, 1, 4), (1, 2, 5), (2, 3, 6), (3, 4, 7)]
    assert layers.key_prefix_runs(np.ones((3, 5), bool)) == [(0, 3, 5)]
    assert layers.key_prefix_runs(np.tril(np.ones((9, 9), bool))) is None  # 9 runs > 8
    assert layers.key_prefix_runs(np.tril(np.ones((9, 9), bool)), max_runs=9) is not None
    assert layers.key_prefix_runs(np.triu(np.ones((4, 4), bool))) is None  # suffixes, not prefixes
    assert layers.key_prefix_runs(np.zeros((2, 2), bool)) is None  # an empty row keeps the reference's rule
    assert layers.key_prefix_runs(jnp.ones((2, 2), bool)) is None  # traced / device masks: the full path


def test_key_prefix_runs_attention_is_the_masked_reference_with_the_same_dropout():
    """A static prefix-run mask is attended run by run: the values and gradients of the full masked
    computation (traced mask), and with dropout on the weights the very same masks."""
    mask = _cell_mask()
    _check_against_xla(lambda q, k, v: layers.attention_weights_and_values(q, k, v, mask), mask, 16, 16)
    q, k, v = _qkv(16, 16, seed=3)
    rng = jax.random.PRNGKey(4)
    for rate in (0.3, 0.5):
        full = jax.jit(lambda q, k, v: layers.attention_weights_and_values(q, k, v, jnp.asarray(mask), rate, rng))
        runs = jax.jit(lambda q, k, v: layers.attention_weights_and_values(q, k, v, mask, rate, rng))
        np.testing.assert_allclose(runs(q, k, v), full(q, k, v), atol=2e-5, rtol=2e-5)
    with_dropout = layers.attention_weights_and_values(q, k, v, mask, 0.5, rng)
    assert float(jnp.abs(with_dropout - layers.attention_weights_and_values(q, k, v, mask)).max()) > 1e-2


def test_dropout_window_is_the_window_of_the_full_mask():
    x = jnp.ones((2, 3, 10, 7))
    rng = jax.random.PRNGKey(8)
    full = layers.dropout(x, 0.5, rng)
    part = layers.dropout(x[:, :, 4:9, :5], 0.5, rng, within=(x.shape, (0, 0, 4, 0)))
    np.testing.assert_array_equal(part, full[:, :, 4:9, :5])
    bits = jax.random.bits(rng, (4, 6, 9), jnp.uint32)
    np.testing.assert_array_equal(layers.random_bits(rng, (2, 3, 4), within=((4, 6, 9), (1, 2, 5))),
                                  bits[1:3, 2:5, 5:9])
    rbg = jax.random.key(1, impl="rbg")  # the fallback slices jax.random.bits itself
    np.testing.assert_array_equal(layers.random_bits(rbg, (2, 2), within=((3, 4), (1, 2))),
                                  jax.random.bits(rbg, (3, 4), jnp.uint32)[1:, 2:])
    with pytest.raises(ValueError, match="even"):
        layers.dropout(x[..., 1:], 0.5, rng, within=(x.shape, (0, 0, 0, 1)))
    with pytest.raises(ValueError, match="not inside"):
        layers.random_bits(rng, (2, 3), within=((2, 3), (1, 0)))


def test_pallas_splash_static_block_mask():
    mask = _cell_mask()  # 16 tokens, 4 cells: query entity >= key entity
    _check_against_xla(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, impl="pallas"), mask, 16, 16)


def test_pallas_splash_traced_kv_cache_validity():
    """The cached sampling step: 4 new tokens against 12 cache slots (the first 8 filled, a traced count)
    and themselves; the filled slots reach the kernel as segment ids."""
    fn = jax.jit(lambda q, k, v, filled: layers.dot_product_attention(
        q, k, v, np.ones((4, 16), bool), kv_valid=jnp.concatenate([jnp.arange(12) < filled, jnp.ones(4, bool)]),
        impl="pallas"))
    mask = np.concatenate([np.broadcast_to(np.arange(12) < 8, (4, 12)), np.ones((4, 4), bool)], axis=1)
    _check_against_xla(lambda q, k, v: fn(q, k, v, 8), mask, 4, 16)
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda q, k, v, m: layers.dot_product_attention(q, k, v, m, impl="pallas"))(*_qkv(4, 16), mask)


def test_jax_nn_path_layout_and_mask():
    """The cudnn path's wrapper (layout swap, mask broadcast) run through jax.nn's XLA implementation on CPU."""
    mask = _cell_mask()
    _check_against_xla(lambda q, k, v: layers._nn_attention(q, k, v, mask, "xla"), mask, 16, 16)


@pytest.fixture(scope="module")
def tiny_xar():
    def build(impl, dtype=jnp.float32):
        return xar.XARNet(layout=xar.make_layout("cell", 4, cell_size=2), token_dim=8, hidden_size=32,
                          encoder_depth=1, decoder_depth=1, num_heads=2, num_classes=10, rngs=nnx.Rngs(0),
                          attention_impl=impl, dtype=dtype)
    return build


def _inputs(n=16, e=4):
    ks = jax.random.split(jax.random.key(3), 2)
    return (jax.random.normal(ks[0], (B, n, 8)), jax.random.uniform(ks[1], (B, e)),
            jnp.asarray([1, 7], jnp.int32))


def test_xar_forward_grad_and_kv_cache_match_xla(tiny_xar):
    ref, fused = tiny_xar("xla"), tiny_xar("pallas")
    x, t, y = _inputs()
    np.testing.assert_allclose(fused(x, t, y), ref(x, t, y), atol=2e-5, rtol=2e-5)

    def loss(model):
        return jnp.sum(model(x, t, y) ** 2)

    g_ref, g = nnx.grad(loss)(ref), nnx.grad(loss)(fused)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # A KV-cache step: cell 2 (tokens 8..11) against the cache of cells 0, 1 in a 16-slot buffer.
    caches_ref = ref(x, t, y, return_kv=True)[1]
    kv = [tuple(jnp.where(jnp.arange(16)[None, None, :, None] < 8, c, 0.0) for c in pair) for pair in caches_ref]
    args = dict(token_index=jnp.arange(8, 12), row_entity=np.zeros(4, np.int32), kv_cache=kv,
                kv_valid=jnp.arange(16) < 8)
    v_ref = ref(x[:, 8:12], t[:, 2:3], y, **args)
    v = jax.jit(lambda m, *a: m(*a, **args))(fused, x[:, 8:12], t[:, 2:3], y)
    np.testing.assert_allclose(v, v_ref, atol=2e-5, rtol=2e-5)


def _custom_calls(text):
    return {line.split("custom_call @")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line}


def _xar_train_grad(impl, dtype, n_tok=256):
    """The gradient of a one-cell-of-xAR-B-shaped forward (256 tokens = 4 cells of 8x8, head dim 64)."""
    model = xar.XARNet(layout=xar.make_layout("cell", 16, cell_size=8), token_dim=16, hidden_size=128,
                       encoder_depth=1, decoder_depth=1, num_heads=2, num_classes=10, rngs=nnx.Rngs(0),
                       attention_impl=impl, dtype=dtype)
    graphdef, params = nnx.split(model)

    def loss(params, x, t, y):
        return jnp.sum(nnx.merge(graphdef, params)(x, t, y) ** 2)

    x = jax.ShapeDtypeStruct((2, n_tok, 16), jnp.float32)
    t = jax.ShapeDtypeStruct((2, 4), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    return jax.jit(jax.grad(loss)), params, (x, t, y)


def test_pallas_lowers_for_tpu(monkeypatch):
    monkeypatch.setattr(layers, "PALLAS_INTERPRET", False)  # the TPU kernel, not its CPU interpretation
    fn, params, args = _xar_train_grad("pallas", jnp.bfloat16)
    text = fn.trace(params, *args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in _custom_calls(text)


def test_cudnn_lowers_for_cuda(monkeypatch):
    """cuDNN flash attention (forward and backward custom calls). The CPU jaxlib has no cuDNN to query, so
    its version check is pinned to cuDNN 9.10 for the lowering only."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    fn, params, args = _xar_train_grad("cudnn", jnp.bfloat16)
    calls = _custom_calls(fn.trace(params, *args).lower(lowering_platforms=("cuda",)).as_text())
    assert any(c.startswith("__cudnn$fmha") and "Backward" not in c for c in calls), calls
    assert any(c.startswith("__cudnn$fmha") and "Backward" in c for c in calls), calls


# ----------------------------------------------------------------------------- mixed precision
BF16_LOSS_RTOL = 2e-2  # relative |loss_bf16 - loss_f32| / loss_f32 of one step (bf16 has an 8-bit mantissa)
BF16_UPDATE_RTOL = 5e-2  # ||update_bf16 - update_f32|| / ||update_f32|| over all parameters


def test_bfloat16_step_within_tolerance_of_float32():
    """One loop train step of a tiny xAR with compute_dtype float32 vs bfloat16 (params, AdamW state and
    norms stay float32): same loss and parameter update within BF16_LOSS_RTOL / BF16_UPDATE_RTOL."""
    from tests.conftest import tiny_xar_config
    from trainers.method import ModelDef, get_method
    from trainers.optim import make_optimizer
    from trainers.train import _init_fn, make_train_step

    out = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_xar_config()
        config.compute_dtype = dtype
        method = get_method(config)
        model_def = ModelDef(method)
        tx, schedule = make_optimizer(config)
        state = jax.jit(_init_fn(model_def, tx, None))(jax.random.PRNGKey(0))
        before = jax.tree.map(np.asarray, state["params"])
        rng = np.random.default_rng(0)
        batch = {"image": rng.uniform(-1, 1, (config.batch_size, 16, 16, 1)).astype(np.float32),
                 "label": rng.integers(0, 10, config.batch_size).astype(np.int32)}
        new_state, metrics = jax.jit(make_train_step(method, model_def, tx, schedule, config.ema_rate))(state, batch)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state["params"]))
        out[dtype] = (float(metrics["loss"]), jax.tree.map(lambda a, b: np.asarray(a) - b, new_state["params"],
                                                           before))
    (loss32, upd32), (loss16, upd16) = out["float32"], out["bfloat16"]
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32), (loss16, loss32)
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(upd16), jax.tree.leaves(upd32))))
    norm = np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(upd32)))
    assert diff <= BF16_UPDATE_RTOL * norm, (diff, norm)

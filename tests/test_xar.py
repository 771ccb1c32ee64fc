"""xAR: golden parity, every prediction entity X (layout, mask, train step, sample), KV cache, guidance."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import xar_b, xar_l, xar_h
from models import layers, xar
from tests.conftest import REPO, run_python
from trainers import convert
from trainers.method import ModelDef, get_method

GOLDEN = REPO.parent / "shared" / "golden"


# ----------------------------------------------------------------------------- golden fixtures
@pytest.mark.parametrize("name", ["xar_net", "xar_kvcache_step"])
def test_golden_fixture_through_converter(name):
    assert convert.check(GOLDEN / f"{name}.npz")


def test_converter_rejects_a_checkpoint_of_another_layout():
    """Upstream's constant buffers pin its layout: the subsample layout has the same block-causal mask in
    sequence order but other token positions, which the RoPE tables reveal."""
    meta, params, buffers, _, _ = convert.load_fixture(GOLDEN / "xar_net.npz")
    model = xar.XARNet(layout=xar.make_layout("subsample", 16, subsample_stride=2), token_dim=16,
                       hidden_size=64, encoder_depth=2, decoder_depth=2, num_heads=4, num_classes=1000,
                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RoPE"):
        xar.params_from_torch({**params, **buffers}, model)
    token_model = xar.XARNet(layout=xar.make_layout("token", 16), token_dim=16, hidden_size=64, encoder_depth=2,
                             decoder_depth=2, num_heads=4, num_classes=1000, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask"):
        xar.params_from_torch({**params, **buffers}, token_model)


def test_importer_reads_an_upstream_state_dict_for_a_config():
    """``trainers.convert import xar`` path: upstream keys -> params of the model a config describes."""
    _, params, buffers, inputs, outputs = convert.load_fixture(GOLDEN / "xar_net.npz")
    config = xar_b.get_config()
    config.compute_dtype = "float32"  # the fixture's dtype (accelerator configs default to bfloat16)
    config.model.update(hidden_size=64, encoder_depth=2, decoder_depth=2, num_heads=4)
    imported = xar.IMPORTERS["xar"]({**params, **buffers}, config)
    model_def = ModelDef(get_method(config))
    model = model_def.merge(imported)
    v = jitted(lambda m, x, t, y: m(x, t, y), model)(inputs["x_t"], inputs["t"], jnp.asarray(inputs["y"], jnp.int32))
    np.testing.assert_allclose(v, outputs["v"], atol=1e-4 * max(1.0, np.abs(outputs["v"]).max()))
    config.model.encoder_depth = 3
    with pytest.raises(ValueError, match="encoder blocks"):
        xar.IMPORTERS["xar"]({**params, **buffers}, config)


# ----------------------------------------------------------------------------- sizes
PAPER_PARAMS_M = {"B": 172.0, "L": 608.0, "H": 1190.0}


@pytest.mark.parametrize("size,module", [("B", xar_b), ("L", xar_l), ("H", xar_h)])
def test_parameter_counts_match_the_paper(size, module):
    config = module.get_config()
    model = nnx.eval_shape(lambda: get_method(config).create_model(nnx.Rngs(0)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / 1e6 - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.02, count


def test_config_validation_names_the_field():
    config = xar_b.get_config("demo")
    config.model.cell_size = 3
    with pytest.raises(ValueError, match="config.model.cell_size"):
        get_method(config).validate_config(config)
    config = xar_b.get_config("demo,scale")
    config.model.scales = (1, 3, 8)
    with pytest.raises(ValueError, match="config.model.scales"):
        get_method(config).validate_config(config)


# ----------------------------------------------------------------------------- layouts and masks (4x4 grid)
def _grid_ids(layout):
    """(G, G) entity id of each grid position (full-resolution level)."""
    ids = np.empty(layout.grid ** 2, int)
    r, order, level_ids = layout.levels[-1]
    ids[order] = level_ids
    return ids.reshape(layout.grid, layout.grid)


def test_token_layout_is_raster_causal():
    layout = xar.make_layout("token", 4)
    np.testing.assert_array_equal(_grid_ids(layout), np.arange(16).reshape(4, 4))
    np.testing.assert_array_equal(layout.mask(), np.tril(np.ones((16, 16), bool)))


def test_cell_layout_groups_neighbours_and_is_block_causal():
    layout = xar.make_layout("cell", 4, cell_size=2)
    np.testing.assert_array_equal(_grid_ids(layout), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    np.testing.assert_array_equal(layout.levels[0][1][:4], [0, 1, 4, 5])  # cell 0 = top-left 2x2, row-major
    np.testing.assert_array_equal(layout.mask(), np.kron(np.tril(np.ones((4, 4), bool)), np.ones((4, 4), bool)))


def test_subsample_layout_groups_distant_tokens():
    layout = xar.make_layout("subsample", 4, subsample_stride=2)
    np.testing.assert_array_equal(_grid_ids(layout), [[0, 1, 0, 1], [2, 3, 2, 3], [0, 1, 0, 1], [2, 3, 2, 3]])
    np.testing.assert_array_equal(layout.levels[0][1][:4], [0, 2, 8, 10])
    np.testing.assert_array_equal(layout.mask(), np.kron(np.tril(np.ones((4, 4), bool)), np.ones((4, 4), bool)))


def test_scale_layout_is_coarse_to_fine():
    layout = xar.make_layout("scale", 4, scales=(1, 2, 4))
    np.testing.assert_array_equal(layout.entity_sizes, [1, 4, 16])
    expected = np.zeros((21, 21), bool)
    for lo, hi in ((0, 1), (1, 5), (5, 21)):
        expected[lo:hi, :hi] = True
    np.testing.assert_array_equal(layout.mask(), expected)
    grid = jnp.arange(16.0).reshape(1, 4, 4, 1)
    tokens = layout.encode(grid)
    assert float(tokens[0, 0, 0]) == pytest.approx(7.5)  # 1x1 scale = mean
    np.testing.assert_allclose(tokens[0, 1:5, 0], [2.5, 4.5, 10.5, 12.5])  # 2x2 area means
    np.testing.assert_allclose(layout.positions[0], [1.5, 1.5])  # a coarse token sits at its area's centre
    np.testing.assert_array_equal(layout.decode(tokens), grid)


def test_image_layout_is_one_bidirectional_entity():
    layout = xar.make_layout("image", 4)
    assert layout.num_entities == 1
    assert layout.mask().all()


@pytest.mark.parametrize("entity", xar.ENTITIES)
def test_encode_decode_round_trip(entity):
    layout = xar.make_layout(entity, 4, cell_size=2, subsample_stride=2, scales=(1, 2, 4))
    grid = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    np.testing.assert_array_equal(layout.decode(layout.encode(grid)), grid)


def test_rope_rotates_by_relative_position():
    """q.k after 2-D RoPE depends only on the offset between the two positions."""
    positions = np.array([[0, 0], [1, 2], [3, 3], [4, 5]], np.float32)
    cos, sin = xar.rope_tables(positions, 8)
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
    score = lambda i, j: float(xar.apply_rope(q, cos[i], sin[i]) @ xar.apply_rope(k, cos[j], sin[j]))
    assert score(0, 1) == pytest.approx(score(2, 3), rel=1e-5)  # both offsets are (1, 2)
    assert score(0, 1) != pytest.approx(score(0, 2), rel=1e-3)


# ----------------------------------------------------------------------------- tiny models per entity
def tiny_config(entity="cell"):
    """8x8x1 pixels, patch 2 -> a 4x4 grid of 4-channel tokens; width 16, 1+1 blocks; upstream's dropout."""
    c = xar_b.get_config("demo," + entity)
    c.model.update(input_size=8, patch_size=2, hidden_size=16, encoder_depth=1, decoder_depth=1, num_heads=2,
                   cell_size=2, subsample_stride=2, scales=(1, 2, 4), attn_dropout=0.1, proj_dropout=0.1)
    c.data.image_size = 8
    c.sample.num_steps = 3
    return c


def perturbed_model(method, seed=1):
    """The tiny network with every parameter moved off its init (jitted: eager init compiles op by op)."""
    model_def = ModelDef(method)

    @jax.jit
    def init(rng):
        params, rest = model_def.init(rng)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        params = jax.tree.unflatten(treedef, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
        return params, rest

    return model_def.merge(*init(jax.random.PRNGKey(0)))


def jitted(fn, model):
    """fn(model, *args) as a jitted function of (*args) closing over the model's state."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: compiled(state, *args)


def test_every_parameter_has_logical_axis_names():
    model_def = ModelDef(get_method(tiny_config()))
    names = jax.tree.leaves(model_def.param_names(), is_leaf=lambda x: isinstance(x, tuple) or x is None)
    assert names and all(isinstance(n, tuple) for n in names)


@pytest.mark.parametrize("entity", xar.ENTITIES)
def test_each_entity_trains_and_samples(entity):
    config = tiny_config(entity)
    method = get_method(config)
    method.validate_config(config)
    model = perturbed_model(method)
    graphdef, state = nnx.split(model)
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(2), (4, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.array([0, 1, 2, 3], jnp.int32)}

    @jax.jit
    def loss_and_grad(state):
        def f(params):
            return method.loss(nnx.merge(graphdef, params), batch, jax.random.PRNGKey(3))[0]
        return jax.value_and_grad(f)(state)

    loss, grads = loss_and_grad(state)
    assert np.isfinite(float(loss)) and float(loss) > 0
    flat = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert all(np.isfinite(g).all() for g in flat)
    # every parameter tensor gets a gradient (none is disconnected from the loss)
    nonzero = [float(jnp.abs(g).max()) > 0 for g in flat]
    assert sum(nonzero) == len(flat), sum(nonzero)

    sample = jax.jit(lambda s, use_cache: method.sample(nnx.merge(graphdef, s), jax.random.PRNGKey(4),
                                                        batch["label"], cfg_scale=2.0, use_cache=use_cache),
                     static_argnums=1)
    cached = sample(state, True)
    assert cached.shape == (4, 8, 8, 1)
    assert np.isfinite(np.asarray(cached)).all()
    if entity in ("token", "scale"):  # many entities; entities of several sizes (cell: the ODE tests below)
        np.testing.assert_allclose(cached, sample(state, False), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config("cell")
    method = get_method(config)
    return config, method, perturbed_model(method)


def _sample(model, labels, **kw):
    fn = jax.jit(lambda state: xar.sample_tokens(nnx.merge(nnx.graphdef(model), state), jax.random.PRNGKey(5),
                                                 labels, **kw))
    return np.asarray(fn(nnx.state(model)))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_samplers_agree_with_and_without_cache(tiny, method):
    _, _, model = tiny
    labels = jnp.array([1, 2], jnp.int32)
    a = _sample(model, labels, num_steps=2, cfg_scale=1.5, method=method, use_cache=True)
    b = _sample(model, labels, num_steps=2, cfg_scale=1.5, method=method, use_cache=False)
    # float32 rounding of two summation orders, at the scale of the samples (|x| up to ~13 after Heun with
    # guidance; an element near 0 carries the rounding of the large ones it was computed with)
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()), rtol=1e-5)


def test_guidance_scale_one_equals_no_guidance(tiny):
    _, _, model = tiny
    labels = jnp.array([1, 2], jnp.int32)
    unguided = _sample(model, labels, num_steps=3, cfg_scale=1.0, guided=False)
    doubled = _sample(model, labels, num_steps=3, cfg_scale=1.0, guided=True)
    np.testing.assert_allclose(doubled, unguided, atol=1e-5, rtol=0)
    guided = _sample(model, labels, num_steps=3, cfg_scale=3.0)
    assert np.abs(guided - unguided).max() > 1e-3


def test_null_class_is_honoured(tiny):
    config, method, model = tiny
    null = jnp.full((2,), config.model.num_classes, jnp.int32)
    # Guiding the null class towards itself changes nothing: cond == uncond.
    plain = _sample(model, null, num_steps=3, cfg_scale=1.0, guided=True)
    guided = _sample(model, null, num_steps=3, cfg_scale=4.0)
    np.testing.assert_allclose(guided, plain, atol=1e-5, rtol=0)
    # The null row is a real embedding, distinct from every class.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))
    t = jnp.full((2, 4), 0.5)
    forward = jitted(lambda m, x, t, y: m(x, t, y), model)
    assert float(jnp.abs(forward(x, t, null) - forward(x, t, jnp.array([0, 0]))).max()) > 1e-4
    # Label dropout sends every label to the null class at p = 1.
    dropped = model.class_emb.drop_labels(jnp.arange(8) % 10, jax.random.PRNGKey(0))
    assert model.class_emb.dropout_prob == pytest.approx(0.1)
    model.class_emb.dropout_prob = 1.0
    try:
        assert (model.class_emb.drop_labels(jnp.arange(8) % 10, jax.random.PRNGKey(0)) == 10).all()
    finally:
        model.class_emb.dropout_prob = 0.1
    assert (dropped <= 10).all()


def test_noisy_context_learning_noises_each_entity_at_its_own_time(tiny):
    _, method, model = tiny
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))
    noise = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 4))
    t = jnp.array([[0.1, 0.4, 0.7, 0.9], [0.2, 0.3, 0.5, 0.6]])
    z, target, v, loss = jitted(xar.noisy_context_terms, model)(x, jnp.array([1, 2]), t, noise)
    for e in range(4):
        sl = slice(4 * e, 4 * e + 4)
        np.testing.assert_allclose(z[:, sl], (1 - t[:, e, None, None]) * x[:, sl] + t[:, e, None, None] * noise[:, sl],
                                   atol=1e-6)
    np.testing.assert_allclose(target, noise - x, atol=1e-6)
    assert float(loss) == pytest.approx(float(jnp.mean((v - target) ** 2)), rel=1e-6)
    # entity-causal: the prediction for cell 0 ignores later cells
    z2 = z.at[:, 4:].set(0.0)
    forward = jitted(lambda m, x, t, y: m(x, t, y), model)
    np.testing.assert_allclose(forward(z2, t, jnp.array([1, 2]))[:, :4], v[:, :4], atol=1e-5)


def test_dropout_is_training_only_and_random(tiny):
    """Upstream trains with attention/projection dropout 0.1; no rng (sampling, fixtures) means none."""
    _, _, model = tiny
    rates = model.attn_dropout, model.proj_dropout
    model.attn_dropout = model.proj_dropout = 0.3
    try:
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))
        t, y = jnp.full((2, 4), 0.5), jnp.array([1, 2])
        forward = jitted(lambda m, rng: m(x, t, y, dropout_rng=rng), model)
        plain = jitted(lambda m: m(x, t, y), model)()
        a, b = forward(jax.random.PRNGKey(1)), forward(jax.random.PRNGKey(2))
        assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(a - plain).max()) > 1e-3
    finally:
        model.attn_dropout, model.proj_dropout = rates
    model.attn_dropout = model.proj_dropout = 0.0
    try:
        without = jitted(lambda m: m(x, t, y, dropout_rng=jax.random.PRNGKey(1)), model)()
    finally:
        model.attn_dropout, model.proj_dropout = rates
    np.testing.assert_allclose(without, plain, atol=1e-6)


def test_dropout_mask_rate_scale_and_independence():
    """layers.dropout: 16-bit uniform integers, two per threefry word; drop rate and expectation exact to
    sampling error, neighbours (the two halves of one word) independent, any shape, any dtype."""
    x = jnp.ones((32, 64, 341))  # odd last dim: the last word's second half is unused
    n = x.size
    for rate in (0.1, 0.5):
        y = layers.dropout(x, rate, jax.random.PRNGKey(3))
        dropped = np.asarray(y == 0)
        assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
        assert abs(float(y.mean()) - 1.0) < 5 * np.sqrt(rate / (1 - rate) / n)
        both = (dropped[..., 0:340:2] & dropped[..., 1:341:2]).mean()  # halves of the same word
        assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / (n / 2))
    a = layers.dropout(x, 0.1, jax.random.PRNGKey(4))
    assert not np.array_equal(np.asarray(a), np.asarray(layers.dropout(x, 0.1, jax.random.PRNGKey(5))))
    assert layers.dropout(jnp.ones(()), 0.5, jax.random.PRNGKey(0)).shape == ()
    half = layers.dropout(jnp.ones((4, 7), jnp.bfloat16), 0.5, jax.random.PRNGKey(0))
    assert half.dtype == jnp.bfloat16 and set(np.unique(np.asarray(half, np.float32))) <= {0.0, 2.0}
    assert layers.dropout(x, 0.1, None) is x and layers.dropout(x, 0.0, jax.random.PRNGKey(0)) is x
    with pytest.raises(ValueError, match="dropout rate"):
        layers.dropout(x, 1.0, jax.random.PRNGKey(0))


def test_random_bits_are_jax_random_bits_unrolled():
    """layers.random_bits: jax.random.bits' uint32 words bit for bit (raw and typed threefry keys, derived
    keys, any shape, jitted or vmapped), lowered without the rolled loop jax uses on CPU; other keys fall
    back to jax.random.bits."""
    keys = [jax.random.PRNGKey(0), jax.random.PRNGKey(12345), jax.random.fold_in(jax.random.PRNGKey(1), 7),
            jax.random.split(jax.random.key(3))[1], jax.random.key(2**31 + 5)]
    for key in keys:
        for shape in [(1,), (7,), (3, 5), (2, 3, 4, 5), (2, 6, 257, 129)]:
            want = jax.random.bits(key, shape, jnp.uint32)
            np.testing.assert_array_equal(jax.jit(layers.random_bits, static_argnums=1)(key, shape), want)
    batch = jax.random.split(jax.random.PRNGKey(9), 3)
    np.testing.assert_array_equal(jax.vmap(lambda k: layers.random_bits(k, (4, 9)))(batch),
                                  jax.vmap(lambda k: jax.random.bits(k, (4, 9), jnp.uint32))(batch))
    hlo = jax.jit(layers.random_bits, static_argnums=1).lower(keys[0], (64, 128)).as_text()
    assert "while" not in hlo and "threefry" not in hlo.lower()
    if jax.default_backend() == "cpu":  # where jax's own lowering is the rolled loop
        assert "while" in jax.jit(lambda k: jax.random.bits(k, (64, 128), jnp.uint32)).lower(keys[0]).as_text()
    rbg = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(layers.random_bits(rbg, (5, 3)), jax.random.bits(rbg, (5, 3), jnp.uint32))


def test_dense_group_is_the_separate_layers():
    """layers.dense_group: the outputs and gradients of the separate nnx.Linear layers, with and without
    bias, in float32 and bfloat16; mismatched layers are refused."""
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    for use_bias, dtype, tol in ((True, jnp.float32, 1e-6), (False, jnp.float32, 1e-6), (True, jnp.bfloat16, 2e-2)):
        denses = [layers.dense(16, 24, ("embed", "mlp"), rngs=rngs, use_bias=use_bias, dtype=dtype,
                               bias_init=nnx.initializers.normal(1.0)) for _ in range(3)]
        for got, d in zip(layers.dense_group(x, *denses), denses, strict=True):
            assert got.dtype == dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(d(x), np.float32), atol=tol, rtol=tol)

        def loss(ds, grouped):
            outs = layers.dense_group(x, *ds) if grouped else [d(x) for d in ds]
            return sum(jnp.sum(jnp.sin(o.astype(jnp.float32)) * (i + 1)) for i, o in enumerate(outs))

        g1 = nnx.grad(lambda ds: loss(ds, True))(denses)
        g2 = nnx.grad(lambda ds: loss(ds, False))(denses)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(a, b, atol=10 * tol, rtol=10 * tol)
    with pytest.raises(ValueError, match="must agree"):
        layers.dense_group(x, layers.dense(16, 24, ("embed", "mlp"), rngs=rngs),
                           layers.dense(16, 24, ("embed", "mlp"), rngs=rngs, use_bias=False))


def test_rows_of_entities_equals_the_gather():
    """Static sorted maps become broadcasts (runs of equal-sized entities); others stay a gather; same values."""
    values = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 5))
    maps = [np.repeat(np.arange(4), 64), np.repeat(np.arange(4), [1, 4, 16, 16]), np.zeros(9, np.int32),
            np.array([2, 2, 3, 3, 4]), np.array([0, 2, 1]), np.array([0, 0, 2, 2]), np.repeat(np.arange(7), 3)]
    for row_entity in maps:
        want = jnp.take(values, jnp.asarray(row_entity), axis=1)
        np.testing.assert_array_equal(xar.rows_of_entities(values, row_entity), want)
        np.testing.assert_array_equal(xar.rows_of_entities(values[..., 0], row_entity), want[..., 0])
    traced = jax.jit(xar.rows_of_entities)(values, jnp.asarray(maps[1]))
    np.testing.assert_array_equal(traced, jnp.take(values, jnp.asarray(maps[1]), axis=1))


def test_remat_gives_the_same_loss_and_gradients(tiny):
    """config.model.remat recomputes every block in the backward pass (xAR-H's memory plan); the training
    loss, with dropout, and every gradient stay the same; sampling's cached path is untouched."""
    config, method, model = tiny
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(3), (4, 8, 8, 1), minval=-1, maxval=1),
             "label": jnp.arange(4)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(remat):
        model.remat = remat
        try:
            gdef = nnx.graphdef(model)
            return jax.jit(jax.value_and_grad(
                lambda p: method.loss(nnx.merge(gdef, p, rest), batch, jax.random.PRNGKey(4))[0]))(params)
        finally:
            model.remat = False

    (loss, g), (loss_r, g_r) = grads(False), grads(True)
    assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), g, g_r)
    assert not get_method(config).create_model(nnx.Rngs(0)).remat


def test_euler_maruyama_grid_and_cfg_ramp_follow_upstream():
    grid = xar.time_grid("euler_maruyama", 40)
    assert grid[0] == 1.0 and grid[-2] == pytest.approx(0.04) and grid[-1] == 0.0 and len(grid) == 41
    ramp = [float(xar.cfg_ramp(2.7, e, 4)) for e in range(4)]
    np.testing.assert_allclose(ramp, [1.0, 1.0 + 1.7 / 3, 1.0 + 3.4 / 3, 2.7], rtol=1e-6)
    # the implementation choice "constant" guides every entity, the first one too
    np.testing.assert_allclose([float(xar.cfg_ramp(2.7, e, 4, "constant")) for e in range(4)], [2.7] * 4)
    with pytest.raises(ValueError, match="cfg schedule"):
        xar.cfg_ramp(2.7, 0, 4, "cosine")


def test_constant_cfg_schedule_and_guidance_interval(tiny):
    """Upstream's ramp leaves the first cell unguided, "constant" guides it; outside the guidance interval
    (upstream guidance_low/high) a step takes the conditional drift."""
    _, _, model = tiny
    labels = jnp.array([1, 2], jnp.int32)
    linear = _sample(model, labels, num_steps=3, cfg_scale=3.0)
    constant = _sample(model, labels, num_steps=3, cfg_scale=3.0, cfg_schedule="constant")
    assert np.abs(linear[:, :4] - constant[:, :4]).max() > 1e-3  # cell 0: scale 1 vs 3
    # no solver time (1, 0.52, 0.04) lies in [0.9, 0.95]: every cell conditional, as cell 0 of the ramp
    never = _sample(model, labels, num_steps=3, cfg_scale=3.0, cfg_schedule="constant", guidance_interval=(0.9, 0.95))
    np.testing.assert_allclose(never[:, :4], linear[:, :4], atol=1e-5, rtol=0)
    assert np.abs(never[:, 4:] - linear[:, 4:]).max() > 1e-3


def test_x_prediction_is_the_velocity_of_the_predicted_clean_tokens(tiny):
    """config.model.prediction="x": the same network's output read as clean tokens, v = (z - x) / max(t, t_min)."""
    config, method, model = tiny
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))
    t = jnp.array([[0.01, 0.3, 0.6, 1.0], [0.2, 0.4, 0.5, 0.9]])
    y = jnp.array([1, 2])
    original = model.prediction
    try:
        model.prediction = "v"  # the raw output
        out = jitted(lambda m, z, t, y: m(z, t, y), model)(z, t, y)
        model.prediction = "x"  # the same weights, the output read as clean tokens
        v = jitted(lambda m, z, t, y: m(z, t, y), model)(z, t, y)
    finally:
        model.prediction = original
    t_tok = jnp.repeat(jnp.maximum(t, xar.PREDICTION_T_MIN), 4, axis=1)[..., None]
    np.testing.assert_allclose(v, (z - out) / t_tok, rtol=1e-5, atol=1e-5)
    bad = config.copy_and_resolve_references()
    bad.model.prediction = "eps"
    with pytest.raises(ValueError, match="config.model.prediction"):
        get_method(bad).validate_config(bad)


# ----------------------------------------------------------------------------- the demo trains end to end
@pytest.mark.slow
def test_demo_config_trains_on_the_embedded_data(tmp_path):
    """The README's first command, shortened: xAR-B demo through trainers.main on the embedded MNIST."""
    run_python(["-m", "trainers.main", "--config=configs/xar_b.py:demo", f"--workdir={tmp_path}",
                "--config.num_steps=4", "--config.batch_size=8", "--config.log_every=1",
                "--config.optim.warmup_steps=2", "--config.checkpoint_every=4", "--config.num_grid_samples=4",
                "--config.sample.num_steps=2", "--config.sample_batch_size=4"], timeout=900)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses)), records
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert list((tmp_path / "samples").glob("*.png"))

"""TokenBridge: golden parity through the converter, importer, sizes, objective, sampler (KV cache, argmax,
guidance), the demo through the loop, sharded == unsharded."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from configs import tokenbridge_b, tokenbridge_h, tokenbridge_l
from models import tokenbridge as tb
from tests.conftest import GOLDEN, run_python, tiny_tokenbridge_config
from trainers import config_validation, convert
from trainers.method import ModelDef, get_method


# ----------------------------------------------------------------------------- golden fixtures
@pytest.mark.parametrize("name", ["tokenbridge_backbone", "tokenbridge_head"])
def test_golden_fixture_through_converter(name):
    assert convert.check(GOLDEN / f"{name}.npz")


def _fixture_config(meta):
    """A config of the fixture's sizes (what a user writes to import such a checkpoint)."""
    a = meta["constructor_args"]
    config = tokenbridge_b.get_config()
    config.model.update(
        encoder_embed_dim=a["encoder_embed_dim"], encoder_depth=a["encoder_depth"],
        encoder_num_heads=a["encoder_num_heads"], decoder_embed_dim=a["decoder_embed_dim"],
        decoder_depth=a["decoder_depth"], decoder_num_heads=a["decoder_num_heads"],
        channel_embed_dim=a["channel_embed_dim"], channel_depth=a["channel_depth"], channel_heads=a["channel_heads"],
        num_classes=a["class_num"])
    config.data.num_classes = a["class_num"]
    config.compute_dtype = "float32"  # the fixtures are float32 (the ImageNet configs compute in bfloat16)
    return config


def test_importer_takes_the_ema_entry_and_checks_the_checkpoint():
    """``convert import tokenbridge checkpoint-last.pth``: the "model_ema" entry, upstream keys -> params."""
    meta, params, buffers, inputs, outputs = convert.load_fixture(GOLDEN / "tokenbridge_head.npz")
    sd = {**params, **buffers}
    wrapped = {**{f"model_ema.{k}": v for k, v in sd.items()}, **{f"model.{k}": v + 1.0 for k, v in params.items()}}
    config = _fixture_config(meta)
    imported = tb.IMPORTERS["tokenbridge"](wrapped, config)
    model = ModelDef(get_method(config)).merge(imported)
    logits = nnx.jit(lambda m, f, t: m.forward_channel_ar(f, t))(model, jnp.asarray(inputs["features"]),
                                                                  jnp.asarray(inputs["tokens"]))
    ok, line = convert.compare("logits", logits, outputs["logits"])
    assert ok, line
    config.model.channel_depth += 1
    with pytest.raises(ValueError, match="channel_blocks"):
        tb.IMPORTERS["tokenbridge"](wrapped, config)
    config.model.channel_depth -= 1
    config.model.quant_bits = 5
    with pytest.raises(ValueError, match="reconstruction_values"):
        tb.IMPORTERS["tokenbridge"](wrapped, config)


# ----------------------------------------------------------------------------- sizes and configs
UPSTREAM_PARAMS_M = {"B": 218.0, "L": 486.9, "H": 910.0}


@pytest.mark.parametrize("size,module", [("B", tokenbridge_b), ("L", tokenbridge_l), ("H", tokenbridge_h)])
def test_parameter_counts_match_upstream(size, module):
    config = module.get_config()
    model = nnx.eval_shape(lambda: get_method(config).create_model(nnx.Rngs(0)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / 1e6 - UPSTREAM_PARAMS_M[size]) / UPSTREAM_PARAMS_M[size] < 0.005, count


def test_configs_carry_upstream_settings_and_validation_names_fields():
    large, huge = tokenbridge_l.get_config(), tokenbridge_h.get_config()
    assert (large.sample.num_steps, large.sample.cfg_scale, large.sample.temperature) == (256, 3.1, 0.96)
    assert (huge.sample.num_steps, huge.sample.cfg_scale, huge.sample.temperature) == (256, 3.45, 0.91)
    assert (large.optim.b1, large.optim.b2, large.optim.weight_decay, large.optim.grad_clip) == (0.9, 0.95, 0.02, 3.0)
    assert large.optim.lr == pytest.approx(4e-4) and large.ema_rate == 0.9999
    assert large.tokenizer.kind == "kl16" and large.tokenizer.scale == 0.2325
    config = tokenbridge_b.get_config("demo")
    config_validation.validate(config, check_data=False)
    config.model.channel_order = (0, 1, 2)
    with pytest.raises(ValueError, match="config.model.channel_order"):
        get_method(config).validate_config(config)
    latent = tokenbridge_b.get_config("demo,latent")  # the demo KL-VAE's 8x8x4 latents, patch 2
    get_method(latent).validate_config(latent)
    assert latent.tokenizer.kind == "workdir" and latent.model.in_channels * latent.model.patch_size ** 2 == 16
    config = tokenbridge_b.get_config("demo")
    config.sample.cfg_schedule = "cosine"
    with pytest.raises(ValueError, match="config.sample.cfg_schedule"):
        get_method(config).validate_config(config)


# ----------------------------------------------------------------------------- schedules and masking
def test_mask_schedule_and_guidance_ramp_follow_upstream():
    before, after, lens = tb.mask_schedule(256, 64)
    assert before[0] == 256 and lens[0] == math.floor(256 * math.cos(math.pi / 2 / 64)) == 255
    np.testing.assert_array_equal(before[1:], after[:-1])
    assert after[-1] == 0 and (before - after).sum() == 256 and (before - after).min() >= 1
    assert lens[-1] == 1  # the last step's mask_len, used by the guidance ramp
    scales = tb.cfg_schedule_scales(3.1, "linear", 256, lens)
    assert scales[0] == pytest.approx(1 + 2.1 / 256) and scales[-1] == pytest.approx(1 + 2.1 * 255 / 256)
    before, after, _ = tb.mask_schedule(256, 256)
    np.testing.assert_array_equal(before - after, np.ones(256))  # README's 256 iterations: one token per step


def test_mask_ratio_is_mars_truncated_normal_and_masks_follow_the_orders():
    ratios = np.asarray(jax.vmap(lambda k: tb.sample_mask_ratio(k, 0.7))(jax.random.split(jax.random.PRNGKey(0),
                                                                                           20000)))
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    reference = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert ratios.mean() == pytest.approx(reference.mean(), abs=2e-3)
    assert ratios.std() == pytest.approx(reference.std(), abs=2e-3)
    orders = tb.random_orders(jax.random.PRNGKey(1), 3, 16)
    mask = np.asarray(tb.mask_from_orders(orders, 5))
    for row, order in zip(mask, np.asarray(orders)):
        assert sorted(order) == list(range(16))
        np.testing.assert_array_equal(np.flatnonzero(row), np.sort(order[:5]))


# ----------------------------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def tiny():
    """The tiny config's network with every parameter moved off its init (adaLN-Zero would hide the head)."""
    config = tiny_tokenbridge_config()
    method = get_method(config)
    method.validate_config(config)
    model_def = ModelDef(method)
    # random parameters straight from the shapes (no init graph to compile); norm scales around 1
    rng = np.random.default_rng(0)
    abstract = nnx.to_pure_dict(model_def.abstract_params)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                                    + 0.2 * rng.standard_normal(a.shape), jnp.float32), abstract)
    return config, method, model_def, params, None


def test_every_parameter_has_logical_axis_names(tiny):
    _, _, model_def, _, _ = tiny
    names = jax.tree.leaves(model_def.param_names(), is_leaf=lambda x: isinstance(x, tuple) or x is None)
    assert names and all(isinstance(n, tuple) for n in names)


def test_encoder_sees_only_visible_tokens_and_the_loss_only_masked_ones(tiny):
    config, _, model_def, params, rest = tiny
    model = model_def.merge(params, rest)
    n = model.seq_len
    tokens = jax.random.normal(jax.random.PRNGKey(2), (2, n, 16))
    mask = tb.mask_from_orders(tb.random_orders(jax.random.PRNGKey(3), 2, n), 12)
    labels, drop = jnp.array([1, 2]), jnp.array([False, True])
    other = jnp.where(mask[..., None], jax.random.normal(jax.random.PRNGKey(4), tokens.shape), tokens)

    @nnx.jit(static_argnums=(3,))
    def run(model, tokens, mask, num_visible):
        return tb.training_terms(model, tokens, labels, mask, drop, num_visible=num_visible)

    exact = model.buffer_size + n - 12
    z, logits, targets, loss = run(model, tokens, mask, exact)
    z_full, *_ = run(model, tokens, mask, None)  # padded rows hidden by the attention mask change nothing
    z_other, *_ = run(model, other, mask, exact)  # masked tokens' values never reach the encoder
    np.testing.assert_allclose(z_full, z, atol=1e-5)
    np.testing.assert_allclose(z_other, z, atol=1e-5)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    assert float(loss) == pytest.approx(float(ce[np.asarray(mask)].mean()), rel=1e-5)
    # a dropped label is the fake latent; the null label num_classes too
    emb = model.class_embedding(jnp.array([1, config.model.num_classes]), jnp.array([True, False]))
    np.testing.assert_array_equal(emb, jnp.broadcast_to(model.fake_latent[...], emb.shape))


def test_loss_falls_when_training_on_a_fixed_batch(tiny):
    config, method, model_def, params, rest = tiny
    images = jax.random.uniform(jax.random.PRNGKey(5), (8, 16, 16, 1), minval=-1, maxval=1)
    batch = {"image": jnp.round(images), "label": jnp.arange(8) % 10}
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(lambda p: method.loss(model_def.merge(p, rest), batch, rng)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = tx.init(params)
    losses, reached = [], None
    for i in range(20):
        params, opt_state, loss, grads = step(params, opt_state, jax.random.PRNGKey(i))
        # every parameter tensor gets a gradient at some step (z_proj none when all 16 tokens are masked,
        # fake_latent none when no label is dropped)
        hit = jax.tree.map(lambda g: bool(jnp.abs(g).max() > 0), grads)
        reached = hit if reached is None else jax.tree.map(lambda a, b: a or b, reached, hit)
        losses.append(float(loss))
    assert all(jax.tree.leaves(reached)), reached
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses


def test_remat_gives_the_same_loss_and_gradients(tiny):
    """config.model.remat recomputes every encoder, decoder and channel-AR block in the backward pass
    (TokenBridge-H's memory plan needs it); the loss and every gradient stay the same."""
    config, method, model_def, params, rest = tiny
    remat_config = tiny_tokenbridge_config(**{"model.remat": True})
    remat_method = get_method(remat_config)
    remat_def = ModelDef(remat_method)
    assert remat_def.merge(params).remat and not model_def.merge(params).remat
    images = jax.random.uniform(jax.random.PRNGKey(5), (8, 16, 16, 1), minval=-1, maxval=1)
    batch = {"image": jnp.round(images), "label": jnp.arange(8) % 10}

    def grads(m, d):
        return jax.jit(jax.value_and_grad(lambda p: m.loss(d.merge(p), batch, jax.random.PRNGKey(3))[0]))(params)

    (loss, g), (loss_r, g_r) = grads(method, model_def), grads(remat_method, remat_def)
    assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), g, g_r)


def test_channel_ar_cached_equals_uncached_and_temperature_zero_is_argmax(tiny):
    _, _, model_def, params, rest = tiny
    model = model_def.merge(params, rest)
    features = 2.0 * jax.random.normal(jax.random.PRNGKey(6), (64, model.decoder_norm.scale.shape[0]))

    @nnx.jit(static_argnums=(2, 3))
    def sample(model, features, temperature, use_cache):
        return model.sample_channel_ar(features, jax.random.PRNGKey(7), temperature=temperature, use_cache=use_cache)

    for temperature in (1.0, 0.0):
        cached, full = sample(model, features, temperature, True), sample(model, features, temperature, False)
        np.testing.assert_array_equal(cached, full)
    greedy = np.asarray(cached)
    assert len(np.unique(np.asarray(sample(model, features, 1.0, True)))) > 8  # sampling draws many levels

    @nnx.jit
    def logits_along(model, features, tokens):
        """Per-position logits of the inference sequence [cond + step emb 0, emb_i(t_i)] in one pass."""
        cond = model.condition_proj(features)
        c_seq = cond[:, None] + model.timesteps_embeddings[...]
        emb = [table(tokens[:, i]) for i, table in enumerate(model.token_embeddings)]
        x = jnp.stack([c_seq[:, 0]] + emb, axis=1) + model.channel_embed[...]
        h, _ = model._channel_transformer(x, c_seq, mask=jnp.tril(jnp.ones((16, 16), bool)))
        kernel, bias = model._head_weights()
        return jnp.einsum("mtc,tcv->mtv", h, kernel) + bias

    logits = np.asarray(logits_along(model, features, jnp.asarray(greedy)))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))


def test_guidance_scale_one_equals_no_guidance_and_every_token_is_sampled(tiny):
    _, method, model_def, params, rest = tiny
    labels = jnp.array([1, 2, 3])

    @jax.jit
    def run(params, scale):
        model = model_def.merge(params, rest)
        kw = dict(num_iter=3, temperature=1.0)
        plain = tb.sample_tokens(model, jax.random.PRNGKey(8), labels, cfg=1.0, guided=False, **kw)
        guided = tb.sample_tokens(model, jax.random.PRNGKey(8), labels, cfg=scale, guided=True, **kw)
        return plain, guided

    plain, same = run(params, 1.0)
    np.testing.assert_array_equal(plain, same)
    _, strong = run(params, 4.0)
    assert (np.asarray(strong) != np.asarray(plain)).mean() > 0.05
    # through the method: dequantised values on the quantizer's grid, in the data's layout
    images = jax.jit(lambda p: method.sample(model_def.merge(p, rest), jax.random.PRNGKey(9), labels, num_steps=3,
                                             cfg_scale=2.0))(params)
    assert images.shape == (3, 16, 16, 1)
    grid = tb.dimwise_quant.dequantization_values(model_def.merge(params, rest).quantizer.table, -1.23, 1.23, 3.0)
    assert np.isin(np.asarray(images), grid).all()


# ----------------------------------------------------------------------------- through the loop
@pytest.mark.slow
def test_demo_trains_through_the_loop_and_samples(tmp_path):
    """The demo (embedded digits) through trainers.main at a tiny width: the loss falls; trainers.sample."""
    workdir = tmp_path / "w"
    tiny = ["--config.model.input_size=16", "--config.data.image_size=16", "--config.model.encoder_embed_dim=32",
            "--config.model.decoder_embed_dim=32", "--config.model.channel_embed_dim=32",
            "--config.model.encoder_depth=1", "--config.model.decoder_depth=1", "--config.model.channel_depth=1",
            "--config.model.buffer_size=4"]
    run_python(["-m", "trainers.main", "--config=configs/tokenbridge_b.py:demo", f"--workdir={workdir}", *tiny,
                "--config.num_steps=40", "--config.batch_size=16", "--config.log_every=1",
                "--config.optim.warmup_steps=5", "--config.optim.lr=3e-3", "--config.checkpoint_every=40",
                "--config.num_grid_samples=4", "--config.sample.num_steps=4", "--config.sample_batch_size=4",
                "--config.eval.num_samples=0"], timeout=900)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for row in rows for loss in row.get("per_step_loss", [])]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    out = tmp_path / "s.npz"
    run_python(["-m", "trainers.sample", f"--workdir={workdir}", "--num_samples=4", f"--out={out}",
                "--set=sample.num_steps=3"])
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 16, 16, 1) and f["arr_0"].dtype == np.uint8


@pytest.mark.slow
def test_sharded_mesh_matches_one_device(tmp_path):
    """8 simulated devices, mesh (data=2, fsdp=2, tensor=2) vs one device: five train steps."""
    proc = run_python(["tests/sharded_equivalence.py", str(tmp_path), "tokenbridge"],
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    np.testing.assert_allclose(report["losses_sharded"], report["losses_single"], rtol=1e-5)
    assert len(report["losses_sharded"]) == 5
    assert report["tree_rel_diff"] <= 1e-5, report
    # The key part of a qkv bias has a zero gradient (softmax is shift-invariant per query): Adam turns its
    # reduction-order noise into steps of up to lr, so such a leaf is bounded by the learning rate instead.
    key_bias = report["worst_param"].endswith("['attn']['qkv']['bias']")
    assert report["max_param_rel_diff"] <= (5 * 1e-3 if key_bias else 1e-5), report
    assert report["wrong_specs"] == [], report
    assert "fsdp" in report["axes_used"] and "tensor" in report["axes_used"], report


@pytest.mark.slow
def test_upstream_checkpoint_imports_and_samples_images(tmp_path):
    """An upstream-layout checkpoint-last.pth ({"model", "model_ema", ...}; random weights of the fixture's
    sizes) -> ``convert import tokenbridge`` -> ``trainers.sample`` decoded through a published-layout KL-16."""
    torch = pytest.importorskip("torch")
    save = lambda obj, path: torch.save(jax.tree.map(lambda a: torch.from_numpy(np.ascontiguousarray(a)), obj),
                                        str(path))  # noqa: E731
    _, vae, _, _, _ = convert.load_fixture(GOLDEN / "kl16_vae.npz")
    save({"model": {**vae, "loss.logvar": np.zeros((), np.float32)}}, tmp_path / "kl16.ckpt")
    meta, params, buffers, _, _ = convert.load_fixture(GOLDEN / "tokenbridge_head.npz")
    ema = {**params, **buffers}
    raw = {k: v + np.float32(0.05) if k in params else v for k, v in ema.items()}  # not what is sampled
    save({"model": raw, "model_ema": ema, "epoch": np.zeros((), np.int64)}, tmp_path / "checkpoint-last.pth")
    config = _fixture_config(meta)
    config.sample_batch_size = 2
    config.tokenizer.weights = str(tmp_path / "kl16.ckpt")
    config.tokenizer.model.ch = json.loads((GOLDEN / "kl16_vae.json").read_text())["constructor"]["Encoder"]["ch"]
    workdir = tmp_path / "w"
    convert.import_checkpoint("tokenbridge", str(tmp_path / "checkpoint-last.pth"), str(workdir), config)
    out = tmp_path / "s.npz"
    run_python(["-m", "trainers.sample", f"--workdir={workdir}", "--num_samples=2", f"--out={out}", "--latents",
                "--set=sample.num_steps=2"], timeout=900)
    with np.load(out) as f:
        images, latents = f["arr_0"], f["latents"]
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8 and out.with_suffix(".png").exists()
    assert latents.shape == (2, 16, 16, 16)  # generator space (x 0.2325), on the quantizer's grid
    grid = tb.dimwise_quant.dequantization_values(np.asarray(buffers["reconstruction_values"]), -5.0, 5.0, 3.0)
    assert np.isin(latents, grid).all()

"""ReTok (tokenizers/retok.py): the golden fixture, Redundant Token Padding (N + M tokens, the first N
decode as the plain tokenizer, a k-prefix decode ignores the rest), the HSR weight schedules, the
nested-dropout length distribution, config errors, and (slow) both training phases + the LlamaGen GPT
on the cached codes in the one loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers import retok
from trainers import convert

TINY = dict(image_size=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=32, encoder_size=(32, 1, 4),
            decoder_size=(32, 2, 4), num_latent_tokens=16, num_padding=12, codebook_size=64, codebook_embed_dim=8,
            distill_depth=1, out_inner_dim=24, in_channels=1)


def test_golden_fixture(golden):
    assert convert.check(golden / "retok_tokenizer.npz", verbose=True)


@pytest.fixture(scope="module")
def tiny():
    model = retok.ReTok(**TINY, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
    return model, images


def test_padding_gives_n_plus_m_tokens_and_the_first_n_decode_as_the_plain_tokenizer(tiny):
    model, images = tiny
    z_q, info, _ = jax.jit(model.encode)(images)
    assert info["indices"].shape == (2, 16 + 12)
    # The redundant queries are copies of queries N - M .. N - 1 (here 4 .. 15) before global_proj.
    memory = model.s2to1encoder.encoder_embed(model.s2to1encoder.ln_pre(model.encoder(images).reshape(2, 64, 32)))
    q = model.s2to1encoder.queries(memory)
    np.testing.assert_allclose(np.asarray(q[:, 16:]), np.asarray(q[:, 4:16]), rtol=1e-6)
    codes = info["indices"][:, :16]
    default = jax.jit(lambda z: model.decode(z))(z_q)  # upstream default: the first N
    first_n = jax.jit(model.decode_codes)(codes)
    masked = jax.jit(lambda z: model.decode(z, jnp.array([16, 16])))(z_q)  # the training (key-mask) path
    np.testing.assert_allclose(np.asarray(first_n), np.asarray(default), atol=1e-4)
    np.testing.assert_allclose(np.asarray(masked), np.asarray(default), atol=1e-4)
    # A tokenizer without padding holding the same weights decodes those N codes identically.
    plain = retok.ReTok(**{**TINY, "num_padding": 0}, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for part in ("s2to1encoder", "s1to2decoder"):
        del params[part]["latent_token_positional_embedding_comp"]
    nnx.update(plain, params)
    np.testing.assert_allclose(np.asarray(jax.jit(plain.decode_codes)(codes)), np.asarray(first_n), atol=1e-4)


def test_decoding_from_k_ignores_the_rest(tiny):
    model, images = tiny
    z_q, _, _ = jax.jit(model.encode)(images)
    k = 7
    other = z_q.at[:, k:].set(jnp.roll(z_q[:, k:], 3, axis=1) * -1.0)
    sliced = jax.jit(lambda z: model.decode(z, k))
    np.testing.assert_allclose(np.asarray(sliced(other)), np.asarray(sliced(z_q)), atol=1e-6)
    # Per-example k through the key mask equals each example's slice, also beyond N (into the padding).
    masked = np.asarray(jax.jit(lambda z: model.decode(z, jnp.array([k, 20])))(other))
    np.testing.assert_allclose(masked[0], np.asarray(sliced(z_q))[0], atol=1e-4)
    np.testing.assert_allclose(masked[1], np.asarray(jax.jit(lambda z: model.decode(z, 20))(other))[1], atol=1e-4)


def test_semantic_weight_follows_the_schedule():
    k = jnp.arange(32, 481)
    lin = np.asarray(retok.hsr_weight(k, schedule="linear", weight=0.5, total=480, min_tokens=32))
    assert lin[0] == pytest.approx(0.5) and lin[-1] == 0.0 and np.all(np.diff(lin) < 0)
    np.testing.assert_allclose(lin, 0.5 * (480 - np.arange(32, 481)) / 448, rtol=1e-6)
    geo = np.asarray(retok.hsr_weight(k, schedule="level_geometric", weight=0.5, total=480, min_tokens=32, gamma=0.7))
    assert np.all(np.diff(geo) <= 0) and geo[0] == pytest.approx(0.5 * 0.7 ** 5)
    assert geo[256 - 32] == pytest.approx(0.5 * 0.7 ** 8) and geo[257 - 32] == pytest.approx(0.5 * 0.7 ** 9)
    const = np.asarray(retok.hsr_weight(k, schedule="const", weight=0.5, total=480, min_tokens=32))
    assert np.all(const == 0.5)
    with pytest.raises(ValueError, match="hsr.schedule"):
        retok.hsr_weight(k, schedule="cosine", weight=0.5, total=480, min_tokens=32)


def _config(variant="demo"):
    from configs import retok_ss

    c = retok_ss.get_config(variant)
    m = c.model
    c.data.image_size = 16
    m.ch_mult = (1, 1)
    m.encoder.update(width=32, depth=1, heads=4)
    m.decoder.update(width=32, depth=2, heads=4)
    m.num_latent_tokens, m.num_padding, m.min_tokens = 16, 12, 4
    m.codebook_size, m.distill_depth = 64, 1
    return c


def test_nested_dropout_covers_the_padded_range_uniformly():
    from trainers.method import get_method

    method = get_method(_config())
    k = np.asarray(method.prefix_lengths(jax.random.PRNGKey(0), 20000))
    assert k.min() == 4 and k.max() == 28
    # The tail of the N real tokens is kept whenever k >= N: (M + 1) / (N + M - min + 1) of the draws.
    assert abs(np.mean(k >= 16) - 13 / 25) < 0.015
    c = _config()
    c.model.prefix_sampling = "batch"
    assert len(set(np.asarray(get_method(c).prefix_lengths(jax.random.PRNGKey(0), 8)).tolist())) == 1


def test_config_errors_name_the_field():
    from trainers.method import get_method

    for field, value, match in (("num_padding", 16, "num_padding"), ("num_latent_tokens", 24, "power of two"),
                                ("min_tokens", 0, "min_tokens"), ("prefix_sampling", "token", "prefix_sampling"),
                                ("entropy_loss_ratio", -0.1, "entropy_loss_ratio")):
        c = _config()
        c.model[field] = value
        with pytest.raises(ValueError, match=match):
            get_method(c).validate_config(c)
    c = _config()
    c.model.hsr.weight = 0.5
    c.model.out_inner_dim = c.model.hsr.teacher_width
    with pytest.raises(FileNotFoundError, match="config.model.hsr.teacher_path"):
        get_method(c).validate_config(c)


def test_parameter_counts_match_the_paper():
    from configs import retok_sb, retok_ss

    counts = {}
    for name, mod in (("S-S", retok_ss), ("S-B", retok_sb)):
        p = retok.abstract_params(retok.model_kwargs(mod.get_config("released")))
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) / 1e6
    assert int(counts["S-S"]) == 136 and int(counts["S-B"]) == 232  # paper: 136M, 232M (136.30M, 232.69M)


def _tiny_teacher(path):
    """A random DINOv2 (width 24, 1 block) in the hub's key layout, as a safetensors file."""
    from safetensors.numpy import save_file

    from models.pretrained import dinov2

    model = dinov2.DINOv2(width=24, depth=1, heads=2, grid=8, rngs=nnx.Rngs(3))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = p["blocks"][0]
    conv = lambda k: np.asarray(k).transpose(3, 2, 0, 1)  # noqa: E731
    sd = {"cls_token": np.asarray(p["cls_token"])[None], "pos_embed": np.asarray(p["pos_embed"])[None],
          "mask_token": np.zeros((1, 24), np.float32),
          "patch_embed.proj.weight": conv(p["patch_embed"]["proj"]["kernel"]),
          "patch_embed.proj.bias": np.asarray(p["patch_embed"]["proj"]["bias"]),
          "norm.weight": np.asarray(p["norm"]["scale"]), "norm.bias": np.asarray(p["norm"]["bias"])}
    for name, leaf in (("norm1", "scale"), ("norm2", "scale")):
        sd[f"blocks.0.{name}.weight"], sd[f"blocks.0.{name}.bias"] = np.asarray(b[name][leaf]), np.asarray(b[name]["bias"])
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        a, c = name.split(".")
        sd[f"blocks.0.{name}.weight"] = np.asarray(b[a][c]["kernel"]).T
        sd[f"blocks.0.{name}.bias"] = np.asarray(b[a][c]["bias"])
    sd["blocks.0.ls1.gamma"], sd["blocks.0.ls2.gamma"] = np.asarray(b["ls1"]), np.asarray(b["ls2"])
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, str(path))


@pytest.mark.slow
def test_tokenizer_phases_and_the_gpt_on_its_cached_codes_train_in_the_one_loop(tmp_path):
    from configs import llamagen_gpt
    from trainers import cache_latents, config_validation, sharding, train

    def metrics(workdir):
        return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]

    _tiny_teacher(tmp_path / "dino.safetensors")
    c = _config()
    c.data.cache_dir = str(tmp_path / "data")
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 4, 3, 1, 1  # steps 1, 2, 3 kept
    c.optim.warmup_steps = 1
    c.num_grid_samples, c.sample_batch_size = 0, 4  # (the GPT's grid below decodes through the tokenizer)
    c.model.hsr.update(weight=0.5, teacher_path=str(tmp_path / "dino.safetensors"), teacher_width=24,
                       teacher_depth=1, teacher_heads=2)
    c.model.out_inner_dim = 24
    c.model.loss.update(disc_start=1, aux_loss_end=2, disc_ndf=8, disc_layers=1)
    c.model.decoder_finetune_start = 2
    config_validation.validate(c)
    state = train.train_and_evaluate(c, str(tmp_path / "tok"))
    m = metrics(tmp_path / "tok")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["semantic_loss"]) for r in m)
    assert all(np.isfinite(r["entropy_loss"]) for r in m)  # the demo's VQ entropy term (entropy_loss_ratio)
    assert [r["gan_factor"] for r in m] == [0.0, 1.0, 1.0] and [r["decoder_finetune"] for r in m] == [0, 0, 1]
    assert m[2]["hsr_weight"] == 0.0 and all(4 <= r["kept_tokens"] <= 28 for r in m)

    # The decoder-only step (the third, step >= decoder_finetune_start) moved the CNN pixel decoder and
    # nothing else: the loop's step-2 checkpoint against its final state (one compiled train step).
    import shutil

    from trainers import decode
    from trainers.method import ModelDef, get_method

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shutil.rmtree(tmp_path / "tok" / "checkpoints" / "3")
    step, before, _ = decode.restore_params(str(tmp_path / "tok"), ModelDef(get_method(c)), mesh, use_ema=False)
    assert step == 2
    for key in before:
        same = [np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(state["params"][key]))]
        assert (not all(same)) if key == "decoder" else all(same), key

    rng = np.random.RandomState(0)
    tok_config, params, rest = cache_latents.load_workdir_tokenizer(str(tmp_path / "tok"), mesh, use_ema=False)
    assert tok_config.model.name == "retok"
    npz = tmp_path / "images.npz"
    np.savez(npz, images=rng.randint(0, 255, (8, 16, 16, 1)).astype(np.uint8), labels=rng.randint(0, 10, 8))
    meta = cache_latents.write_cache(tok_config, params, str(tmp_path / "codes"), npz=str(npz), batch_size=4,
                                     progress=False, rest=rest)
    assert meta["latent_type"] == "codes" and meta["latent_shape"][-1] == 16  # the first N codes only

    g = llamagen_gpt.get_config("demo")
    g.model.update(vocab_size=64, block_size=16, dim=32, n_layer=1, n_head=2)
    g.data.latents = str(tmp_path / "codes")
    g.data.image_size = 16
    g.tokenizer.workdir = str(tmp_path / "tok")
    g.batch_size, g.num_steps, g.log_every, g.checkpoint_every = 4, 2, 1, 2
    g.optim.warmup_steps = 1
    g.num_grid_samples, g.sample_batch_size, g.eval.num_samples = 4, 4, 0
    config_validation.validate(g)
    train.train_and_evaluate(g, str(tmp_path / "gpt"))
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "gpt"))
    assert list((tmp_path / "gpt" / "samples").glob("*.png"))  # GPT codes decoded through the tokenizer


def test_importer_builds_from_the_run_config(golden):
    from configs import retok_ss

    meta, params, buffers, _, _ = convert.load_fixture(golden / "retok_tokenizer.npz")
    kw = retok.fixture_kwargs(meta)
    c = retok_ss.get_config("released")
    m = c.model
    c.data.image_size, c.data.channels = kw["image_size"], 3
    m.ch, m.ch_mult, m.num_res_blocks, m.z_channels = kw["ch"], kw["ch_mult"], kw["num_res_blocks"], kw["z_channels"]
    for part, size in (("encoder", kw["encoder_size"]), ("decoder", kw["decoder_size"])):
        m[part].update(width=size[0], depth=size[1], heads=size[2])
    m.codebook_size, m.distill_depth, m.out_inner_dim = kw["codebook_size"], kw["distill_depth"], kw["out_inner_dim"]
    imported = retok.IMPORTERS["retok"]({"ema": {**params, **buffers}}, c)
    np.testing.assert_array_equal(imported["s2to1encoder"]["latent_token_positional_embedding_comp"],
                                  params["s2to1encoder.latent_token_positional_embedding_comp"][:, 0])
    m.num_padding = 0  # a checkpoint with padding does not fit a tokenizer without it
    with pytest.raises(ValueError, match="does not fit"):
        retok.IMPORTERS["retok"](params, c)

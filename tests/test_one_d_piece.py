"""One-D-Piece (tokenizers/one_d_piece.py), the MaskGIT VQGAN, the shared ViT blocks (tokenizers/vit.py),
ConvNeXt (models/pretrained/convnext.py) and the MaskGIT-style discriminator.

Golden parity through the converter; Tail Token Drop (a prefix decode uses only its tokens, k = N is
the plain decode, one k per step); the blocks against torch; both training stages and the MaskGIT
generator in the one loop on the embedded digits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.conftest import GOLDEN
from tokenizers import one_d_piece, vit
from trainers import convert

TINY = dict(image_size=16, enc_patch_size=4, dec_patch_size=4, encoder_size=(32, 1, 2), decoder_size=(32, 2, 2),
            num_latent_tokens=8, token_size=6, codebook_size=32, target_codebook_size=64)


@pytest.mark.parametrize("name", ["one_d_piece", "maskgit_vqgan"])
def test_golden_fixture(name, golden):
    assert convert.check(golden / f"{name}.npz", verbose=True)


@pytest.fixture(scope="module")
def tiny():
    model = one_d_piece.OneDPiece(**TINY, rngs=nnx.Rngs(0))
    z_q, info = jax.jit(model.encode)(jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3)))
    return model, z_q, info


def test_tail_token_drop_uses_only_the_kept_prefix(tiny):
    model, z_q, _ = tiny
    n = TINY["num_latent_tokens"]
    ks = (1, 3, n - 1)

    @jax.jit
    def outputs(z_q):
        out = {"full": model.decoder(z_q), "keep_all": model.decoder(z_q, vit.prefix_mask(n, n)),
               "traced": model.decode(z_q, length=jnp.int32(3))}
        for k in ks:
            keep = vit.prefix_mask(k, n)
            changed = z_q.at[:, k:].set(jax.random.normal(jax.random.PRNGKey(k), z_q[:, k:].shape))
            out[f"k{k}"] = {"masked": model.decoder(z_q, keep), "changed_tail": model.decoder(changed, keep),
                      "sliced": model.decode(z_q, length=k),  # upstream's literal z[..., :k]
                      "changed_kept": model.decoder(z_q.at[:, k - 1].add(1.0), keep)}
        return out

    out = jax.tree.map(np.asarray, outputs(z_q))
    for k in ks:
        o = out[f"k{k}"]
        np.testing.assert_array_equal(o["changed_tail"], o["masked"])  # tokens after the k-th change nothing
        np.testing.assert_allclose(o["sliced"], o["masked"], atol=2e-5)  # static shapes == upstream's slice
        assert np.abs(o["changed_kept"] - o["masked"]).max() > 1e-4  # a kept token does matter
    np.testing.assert_allclose(out["keep_all"], out["full"], atol=1e-6)  # k = N is the plain decode
    np.testing.assert_allclose(out["traced"], out["k3"]["masked"], atol=2e-5)  # a traced length


def test_prefix_lengths_one_per_step_uniform_over_1_to_n():
    n = 5
    ks = np.asarray(jax.vmap(lambda r: vit.sample_prefix_length(r, n))(jax.random.split(jax.random.PRNGKey(0), 2000)))
    assert ks.shape == (2000,) and set(ks.tolist()) == set(range(1, n + 1))
    assert np.abs(np.bincount(ks, minlength=n + 1)[1:] / 2000 - 1 / n).max() < 0.04
    assert vit.sample_prefix_length(jax.random.PRNGKey(0), n).shape == ()  # one k for the whole batch
    assert vit.sample_prefix_length(jax.random.PRNGKey(0), n, shape=(3,)).shape == (3,)  # nested dropout
    assert int(vit.sample_prefix_length(jax.random.PRNGKey(0), n, high=n - 1, low=n - 1)) == n - 1
    with pytest.raises(ValueError, match="prefix lengths"):
        vit.sample_prefix_length(jax.random.PRNGKey(0), n, high=n + 1)


def test_variable_length_codes_decode_at_any_length(tiny):
    model, _, info = tiny
    codes = info["indices"]
    n = TINY["num_latent_tokens"]

    @jax.jit
    def both(codes):
        return [(model.decode_tokens(codes[:, :k]), model.decode_tokens(codes, length=jnp.int32(k))) for k in (1, n)]

    for prefix, masked in both(codes):
        np.testing.assert_allclose(np.asarray(prefix), np.asarray(masked), atol=2e-5)


def _torch_to_nnx_mha(ours: vit.MultiheadAttention, theirs: torch.nn.MultiheadAttention):
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    ours.in_proj.kernel[...] = jnp.asarray(sd["in_proj_weight"].T)
    ours.in_proj.bias[...] = jnp.asarray(sd["in_proj_bias"])
    ours.out_proj.kernel[...] = jnp.asarray(sd["out_proj.weight"].T)
    ours.out_proj.bias[...] = jnp.asarray(sd["out_proj.bias"])


def test_qformer_layer_matches_torch_pre_norm_decoder_layer():
    torch.manual_seed(0)
    w, heads = 32, 4
    ref = torch.nn.TransformerDecoderLayer(w, heads, 64, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True).eval()
    ours = vit.QFormerLayer(w, heads, 64, rngs=nnx.Rngs(0))
    _torch_to_nnx_mha(ours.self_attn, ref.self_attn)
    _torch_to_nnx_mha(ours.multihead_attn, ref.multihead_attn)
    for name in ("linear1", "linear2"):
        t = getattr(ref, name)
        getattr(ours, name).kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
        getattr(ours, name).bias[...] = jnp.asarray(t.bias.detach().numpy())
    for name in ("norm1", "norm2", "norm3"):
        t = getattr(ref, name)
        with torch.no_grad():
            t.weight.add_(torch.randn_like(t.weight) * 0.1)
            t.bias.add_(torch.randn_like(t.bias) * 0.1)
        getattr(ours, name).scale[...] = jnp.asarray(t.weight.detach().numpy())
        getattr(ours, name).bias[...] = jnp.asarray(t.bias.detach().numpy())
    tgt, mem = np.random.RandomState(0).randn(2, 5, w), np.random.RandomState(1).randn(2, 7, w)
    tgt, mem = tgt.astype(np.float32), mem.astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.tensor(tgt), torch.tensor(mem)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tgt), jnp.asarray(mem))), expected, atol=2e-5)
    # Position embeddings: on q and k of the self-attention, on the cross-attention's q and its memory keys.
    qpos = np.random.RandomState(2).randn(1, 5, w).astype(np.float32)
    moved = ours(jnp.asarray(tgt), jnp.asarray(mem), query_pos=jnp.asarray(qpos))
    assert np.abs(np.asarray(moved) - expected).max() > 1e-3


def test_convnext_small_matches_torchvision_with_random_weights():
    import torchvision

    from models.pretrained import convnext

    torch.manual_seed(0)
    ref = torchvision.models.convnext_small(weights=None).eval()
    with torch.no_grad():  # non-trivial layer scales, norms and biases
        for name, p in ref.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = convnext.merge(convnext.params_from_torchvision({k: v.numpy() for k, v in ref.state_dict().items()}))
    x = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy()
    ours = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert np.abs(ours - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    # The perceptual loss's resize is torch's antialiased bilinear resize.
    img = np.random.RandomState(1).rand(1, 3, 48, 48).astype(np.float32)
    t = torch.nn.functional.interpolate(torch.tensor(img), size=224, mode="bilinear", align_corners=False,
                                        antialias=True).numpy()
    j = jax.image.resize(jnp.asarray(img.transpose(0, 2, 3, 1)), (1, 224, 224, 3), "linear", antialias=True)
    np.testing.assert_allclose(np.asarray(j).transpose(0, 3, 1, 2), t, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="download.pytorch.org"):
        convnext.load_params("/nonexistent/convnext_small.pth")


def test_maskgit_discriminator_pool_matches_torch_and_shapes():
    from tokenizers import losses

    for size, out in ((4, 16), (32, 16), (6, 4)):
        x = np.random.RandomState(size).randn(2, size, size + 2, 3).astype(np.float32)
        expected = torch.nn.functional.adaptive_max_pool2d(torch.tensor(x).permute(0, 3, 1, 2), (out, out))
        ours = jax.jit(lambda x: losses.adaptive_max_pool(x, (out, out)))(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(ours), expected.permute(0, 2, 3, 1).numpy())
    disc = losses.MaskGITDiscriminator(1, 32, 2, rngs=nnx.Rngs(0))
    assert jax.eval_shape(disc, jnp.zeros((2, 16, 16, 1))).shape == (2, 16, 16, 1)


def test_config_errors_name_the_field(tmp_path):
    from configs import one_d_piece_s256
    from trainers import config_validation

    c = one_d_piece_s256.get_config("stage1,demo")
    with pytest.raises(ValueError, match="config.model.vqgan_weights"):
        config_validation.validate(c, check_data=False)
    c.model.vqgan_weights = str(tmp_path)
    c.model.dec_patch_size = 4
    with pytest.raises(ValueError, match="dec_patch_size"):
        config_validation.validate(c, check_data=False)
    with pytest.raises(ValueError, match="unknown|variants"):
        one_d_piece_s256.get_config("stage3")
    from tokenizers import maskgit_vqgan

    with pytest.raises(FileNotFoundError, match="fun-research/TiTok"):
        maskgit_vqgan.load_vqgan_params("/nonexistent.bin", {}, "config.model.vqgan_weights")


def _tiny(config, steps: int, cache):
    config.data.cache_dir = str(cache)
    config.data.image_size = 16
    config.batch_size = 8
    config.num_steps = steps
    config.log_every = 1
    config.checkpoint_every = steps
    config.optim.warmup_steps = 1
    config.num_grid_samples = 4
    config.sample_batch_size = 8
    return config


@pytest.mark.slow
def test_both_stages_and_the_generator_train_in_the_one_loop(tmp_path):
    import json

    from configs import maskgit_one_d_piece_s256, maskgit_vqgan as vq_cfg, one_d_piece_s256
    from trainers import config_validation, train

    cache = tmp_path / "data"

    def metrics(workdir):
        return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]

    vq = _tiny(vq_cfg.get_config("demo"), 2, cache)
    train.train_and_evaluate(vq, str(tmp_path / "vq"))

    def odp(stage):
        c = _tiny(one_d_piece_s256.get_config(f"stage{stage},demo"), 3, cache)
        c.model.encoder.update(width=32, depth=1, heads=2)
        c.model.decoder.update(width=32, depth=1, heads=2)
        c.model.num_latent_tokens = c.model.tail_drop_max = 4
        c.model.vqgan_weights = str(tmp_path / "vq")
        c.model.loss.discriminator_start = 1
        c.model.loss.disc_hidden = 32
        if stage == 2:
            c.model.init_from = str(tmp_path / "s1")
        return c

    s1 = odp(1)
    config_validation.validate(s1)
    state1 = train.train_and_evaluate(s1, str(tmp_path / "s1"))
    m1 = metrics(tmp_path / "s1")
    assert all(np.isfinite(m["loss"]) and 1 <= m["kept_tokens"] <= 4 for m in m1)
    # The teacher inside the stage-1 model stays frozen at the teacher's weights.
    from tokenizers import maskgit_vqgan

    teacher = maskgit_vqgan.workdir_params(tmp_path / "vq")
    np.testing.assert_array_equal(np.asarray(state1["params"]["pixel_encoder"]["conv_in"]["kernel"]),
                                  teacher["encoder"]["conv_in"]["kernel"])

    s2 = odp(2)
    config_validation.validate(s2)
    state2 = train.train_and_evaluate(s2, str(tmp_path / "s2"))
    m2 = metrics(tmp_path / "s2")
    assert [m["discriminator_factor"] for m in m2] == [0.0, 1.0, 1.0]  # the GAN starts at discriminator_start
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["d_loss"]) for m in m2)
    # Stage 2 starts from stage 1 and keeps its encoder, quantizer and latent tokens frozen.
    for key in ("encoder", "quantize", "latent_tokens"):
        for a, b in zip(jax.tree.leaves(state1["ema_params"][key]), jax.tree.leaves(state2["params"][key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    gen = _tiny(maskgit_one_d_piece_s256.get_config("demo"), 3, cache)
    gen.model.update(seq_len=4, hidden=32, depth=1, heads=2, intermediate=64)
    gen.tokenizer.workdir = str(tmp_path / "s2")
    gen.sample.num_steps = 2
    config_validation.validate(gen)
    train.train_and_evaluate(gen, str(tmp_path / "gen"))
    assert all(np.isfinite(m["loss"]) for m in metrics(tmp_path / "gen"))
    assert list((tmp_path / "gen" / "samples").glob("*.png"))  # samples decoded through the tokenizer


def test_stage2_checkpoint_converts_and_decodes_softly_through_the_vqgan(golden):
    """A stage-2 state_dict (TiTok keys + the VQGAN's under pixel_*) converts; the stage-2 decode is
    the VQGAN's soft decode of the ViT decoder's logits."""
    from tokenizers import maskgit_vqgan

    meta, params, _, inputs, outputs = convert.load_fixture(golden / "one_d_piece.npz")
    vq_meta, vq_params, _, _, _ = convert.load_fixture(golden / "maskgit_vqgan.npz")
    conf, quant = vq_meta["constructor"]["conf"], vq_meta["constructor"]["quant"]
    vqgan = {**conf, "z_channels": quant["embedding_dim"], "num_embeddings": quant["num_embeddings"]}
    kwargs = {**one_d_piece.fixture_kwargs(meta), "stage": 2, "vqgan": vqgan}
    sd = {**params, **{"pixel_" + k: v for k, v in vq_params.items() if not k.startswith("encoder.")}}
    model = one_d_piece._merge(kwargs, one_d_piece.params_from_torch(sd, kwargs))
    with pytest.raises(ValueError, match="missing"):
        one_d_piece.params_from_torch(params, kwargs)  # the pixel decoder is required in stage 2
    vq_kwargs = maskgit_vqgan.vqgan_kwargs(vqgan)
    vq = maskgit_vqgan.merge(vq_kwargs, maskgit_vqgan.params_from_torch(vq_params, vq_kwargs))

    @jax.jit
    def both(x):
        z_q, _ = model.encode(x)
        return model.decode(z_q), vq.decode_soft(model.decoder(z_q))

    x = jnp.asarray(inputs["pixel_values"]).transpose(0, 2, 3, 1)
    ours, expected = both(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5)
    logits = np.asarray(jax.jit(lambda x: model.decoder(model.encode(x)[0]))(x)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(logits, outputs["logits_full"], atol=1e-4 * max(1, np.abs(outputs["logits_full"]).max()))

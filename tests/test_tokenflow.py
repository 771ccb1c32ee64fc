"""TokenFlow (tokenizers/tokenflow.py): the golden fixtures, the shared index (w = 0 -> the semantic
argmin, huge w -> the pixel argmin), decode_code(encode(x).indices) = the forward decode, the random
scale drop, config errors, and the tokenizer stages in the one loop on the embedded digits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers import quantizers, tokenflow
from trainers import convert

TINY = dict(image_size=16, in_channels=1, patch_size=4, sem_width=32, sem_depth=1, sem_heads=2, ch=32,
            ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, dec_ch=32, dec_num_res_blocks=1, codebook_size=64,
            scales=(1, 2, 4), vqkd_width=32, vqkd_depth=1, vqkd_heads=2, teacher_dim=32)


@pytest.mark.parametrize("name", ["tokenflow_vq", "tokenflow_pixel"])
def test_golden_fixture(golden, name):
    assert convert.check(golden / f"{name}.npz", verbose=True)


@pytest.fixture(scope="module")
def tiny():
    model = tokenflow.TokenFlow(**TINY, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
    return model, images


def test_shared_index_interpolates_between_the_two_argmins():
    z = jax.random.normal(jax.random.PRNGKey(0), (64, 40))
    for w, part in ((0.0, "semantic"), (1e6, "pixel")):
        q = quantizers.SharedIndexQuantizer(128, (32, 8), distance_weight=w, rngs=nnx.Rngs(3))
        want = getattr(q, part).nearest(z[..., :32] if part == "semantic" else z[..., 32:])
        np.testing.assert_array_equal(np.asarray(q.nearest(z)), np.asarray(want))
        z_q, info = q(z)
        np.testing.assert_array_equal(np.asarray(info["indices"]), np.asarray(want))
        # each half of a code is unit-norm
        np.testing.assert_allclose(np.linalg.norm(np.asarray(z_q)[:, :32], axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(z_q)[:, 32:], axis=-1), 1.0, atol=1e-5)
    # the two argmins disagree somewhere, so the two checks above are not the same check
    q = quantizers.SharedIndexQuantizer(128, (32, 8), rngs=nnx.Rngs(3))
    assert np.any(np.asarray(q.semantic.nearest(z[:, :32])) != np.asarray(q.pixel.nearest(z[:, 32:])))


def test_decode_code_of_the_indices_equals_the_forward_decode(tiny):
    model, images = tiny
    enc = jax.jit(lambda x: model.encode(x))(images)
    assert enc["indices"].shape == (2, 1 + 4 + 16) and enc["semantic_codes"].shape == (2, 4, 4, 32)
    assert enc["semantic_features"].shape == (2, 16, 32)
    sem, img = jax.jit(model.decode)(enc["quant"])
    sem2, img2 = jax.jit(model.decode_code)(enc["indices"])
    assert img.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(np.asarray(img2), np.asarray(img), atol=1e-4)
    np.testing.assert_allclose(np.asarray(sem2), np.asarray(sem), atol=1e-4)


def test_dropping_a_scale_equals_removing_it(tiny):
    model, images = tiny
    h = model.features(images)
    from eval.resize import torch_area, torch_bicubic

    f_keep, _, loss_keep, _ = quantizers.multiscale_residual_quantize(
        model.quantize, h, (1, 2, 4), down=torch_area, up=torch_bicubic, keep=jnp.array([1.0, 0.0, 1.0]))
    f_rm, _, loss_rm, _ = quantizers.multiscale_residual_quantize(model.quantize, h, (1, 4), down=torch_area,
                                                                   up=torch_bicubic)
    np.testing.assert_allclose(np.asarray(f_keep), np.asarray(f_rm), atol=1e-5)
    np.testing.assert_allclose(float(loss_keep["codebook_loss"]), float(loss_rm["codebook_loss"]), rtol=1e-5)
    keeps = np.stack([np.asarray(tokenflow.scale_keep(jax.random.PRNGKey(i), 4, 0.5)) for i in range(200)])
    assert np.all(keeps[:, 0] == 1) and set(np.unique(keeps.sum(1))) == {3.0, 4.0}
    assert 0.3 < np.mean(keeps.sum(1) == 3) < 0.7


def test_config_errors_name_the_field():
    from configs import tokenflow_clipb
    from trainers import config_validation

    c = tokenflow_clipb.get_config("demo")
    c.model.scales = (1, 2, 3)
    with pytest.raises(ValueError, match="config.model.scales"):
        config_validation.validate(c)
    c = tokenflow_clipb.get_config("demo")
    c.model.stage = "pixels"
    with pytest.raises(ValueError, match="config.model.stage"):
        config_validation.validate(c)


@pytest.mark.slow
def test_tokenizer_stages_train_in_the_one_loop(tmp_path):
    from configs import tokenflow_clipb
    from trainers import cache_latents, config_validation, sharding, train

    c = tokenflow_clipb.get_config("demo")
    c.data.cache_dir = str(tmp_path / "data")
    c.data.image_size = 16
    c.model.update(patch_size=4, ch_mult=(1, 1, 1), scales=(1, 2, 4), codebook_size=64, decoder_finetune_start=2,
                   scale_drop_prob=0.5)
    c.model.semantic.update(width=32, depth=1, heads=2)
    c.model.teacher_dim = 32
    c.model.vqkd.update(width=32, depth=1, heads=2)
    c.model.loss.update(disc_start=1, disc_ndf=8, disc_layers=1)
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 4, 3, 1, 3
    c.num_grid_samples, c.sample_batch_size = 4, 4
    config_validation.validate(c)
    state = train.train_and_evaluate(c, str(tmp_path / "tok"))
    m = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["semantic_loss"]) for r in m)
    assert [r["gan_factor"] for r in m] == [0.0, 1.0, 1.0] and [r["decoder_finetune"] for r in m] == [0, 0, 1]
    assert state["step"] == 3
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tok_config, params, rest = cache_latents.load_workdir_tokenizer(str(tmp_path / "tok"), mesh, use_ema=False)
    assert tok_config.model.name == "tokenflow"
    rng = np.random.RandomState(0)
    npz = tmp_path / "images.npz"
    np.savez(npz, images=rng.randint(0, 255, (8, 16, 16, 1)).astype(np.uint8), labels=rng.randint(0, 10, 8))
    meta = cache_latents.write_cache(tok_config, params, str(tmp_path / "codes"), npz=str(npz), batch_size=4,
                                     progress=False, rest=rest)
    assert meta["latent_type"] == "codes" and meta["latent_shape"][-1] == 21

    from configs import next_scale_tokenflow

    g = next_scale_tokenflow.get_config("demo")
    g.model.update(scales=(1, 2, 4), codebook_size=64, dim=32, n_layer=1, n_head=2)
    g.data.latents = str(tmp_path / "codes")
    g.data.image_size = 16
    g.tokenizer.workdir = str(tmp_path / "tok")
    g.batch_size, g.num_steps, g.log_every, g.checkpoint_every = 4, 2, 1, 2
    g.optim.warmup_steps = 1
    g.num_grid_samples, g.sample_batch_size, g.eval.num_samples = 4, 4, 0
    config_validation.validate(g)
    train.train_and_evaluate(g, str(tmp_path / "gen"))
    assert all(np.isfinite(json.loads(r)["loss"]) for r in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines())
    assert list((tmp_path / "gen" / "samples").glob("*.png"))  # indices decoded through the TokenFlow pairing


def test_next_scale_mask_inputs_and_sampling():
    from models import next_scale

    mask = next_scale.block_causal_mask((1, 2))
    assert mask.tolist() == [[True, False, False, False, False]] + [[True] * 5] * 4
    model = next_scale.NextScaleGPT(scales=(1, 2, 3), codebook_size=16, code_dim=40, dim=32, n_layer=1, n_head=2,
                                    num_classes=10, rngs=nnx.Rngs(0))
    table = quantizers.l2_normalize(jax.random.normal(jax.random.PRNGKey(0), (16, 40)))
    z = jax.random.randint(jax.random.PRNGKey(1), (2, 14), 0, 16)
    labels = jnp.array([1, 2])
    fwd = jax.jit(lambda z: model(model.teacher_inputs(table, z), labels))
    logits = fwd(z)
    assert logits.shape == (2, 14, 16)
    # Changing the last scale's codes changes no logits (they are never inputs); changing scale 1
    # changes only scale 2's, never scales 0-1 (block-causal).
    np.testing.assert_allclose(np.asarray(fwd(z.at[:, 5:].set(0))), np.asarray(logits), atol=1e-6)
    other = fwd(z.at[:, 1:5].set((z[:, 1:5] + 1) % 16))
    np.testing.assert_allclose(np.asarray(other[:, :5]), np.asarray(logits[:, :5]), atol=1e-6)
    assert np.abs(np.asarray(other[:, 5:]) - np.asarray(logits[:, 5:])).max() > 1e-4
    out = jax.jit(lambda r: next_scale.generate(model, table, r, labels, cfg_scale=2.0, top_k=4, top_p=0.9))(
        jax.random.PRNGKey(2))
    assert out.shape == (2, 14) and out.dtype == jnp.int32 and int(out.max()) < 16


HF_CLIP = r"""
import sys, numpy as np, torch
from transformers import CLIPVisionConfig, CLIPVisionModel
torch.manual_seed(0)
cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       image_size=16, patch_size=4, num_channels=3, hidden_act="quick_gelu")
m = CLIPVisionModel(cfg).eval()
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in m.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    h = m(pixel_values=x).last_hidden_state
    vision = getattr(m, "vision_model", m)  # transformers 5 flattens CLIPVisionModel
    out = vision.post_layernorm(h)[:, 1:]
np.savez(sys.argv[1], x=x.numpy(), out=out.numpy(), **{"sd/" + k: v.numpy() for k, v in m.state_dict().items()})
"""


def test_clip_student_matches_transformers_clip_vision(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "clip.npz"
    # The repo's `tokenizers` package shadows Hugging Face's: run transformers outside the repo root.
    subprocess.run([sys.executable, "-c", HF_CLIP, str(path)], cwd=tmp_path, check=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"})
    ref = np.load(path)
    hf = {k[3:]: ref[k] for k in ref.files if k.startswith("sd/")}
    params = tokenflow.semantic_encoder_params(tokenflow.openai_clip_from_hf(hf), in_channels=3, width=32, depth=2,
                                               heads=2, patch_size=4, grid=4)
    enc = tokenflow._merge(lambda: tokenflow.SemanticEncoder(in_channels=3, width=32, depth=2, heads=2, patch_size=4,
                                                             grid=4, rngs=nnx.Rngs(0)), params)
    ours = np.asarray(enc(jnp.asarray(ref["x"]).transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(ours, ref["out"], atol=1e-4 * max(1.0, np.abs(ref["out"]).max()))


def test_released_checkpoint_layout_imports_completely(golden):
    # Upstream names: the pixel fixture's CNN / decoder_vqkd / task-layer keys, plus a CLIP visual
    # ``encoder_vqkd`` (with ``proj``, dropped), ``encode_task_layer``, both codebooks and the usage
    # buffer, wrapped as a checkpoint {"model": ..., "ema": ...} (the EMA is preferred).
    _, params, _, _, _ = convert.load_fixture(golden / "tokenflow_pixel.npz")
    r = np.random.RandomState(0)

    class rng:  # float32 draws, as a checkpoint stores them
        randn = staticmethod(lambda *shape: r.randn(*shape).astype(np.float32))

    w, sem = 32, {}
    sem["conv1.weight"] = rng.randn(w, 3, 16, 16)
    sem["class_embedding"], sem["positional_embedding"] = rng.randn(w), rng.randn(17, w)
    for ln in ("ln_pre", "ln_post", "transformer.resblocks.0.ln_1", "transformer.resblocks.0.ln_2"):
        sem[f"{ln}.weight"], sem[f"{ln}.bias"] = rng.randn(w), rng.randn(w)
    b = "transformer.resblocks.0."
    sem.update({b + "attn.in_proj_weight": rng.randn(3 * w, w), b + "attn.in_proj_bias": rng.randn(3 * w),
                b + "attn.out_proj.weight": rng.randn(w, w), b + "attn.out_proj.bias": rng.randn(w),
                b + "mlp.c_fc.weight": rng.randn(4 * w, w), b + "mlp.c_fc.bias": rng.randn(4 * w),
                b + "mlp.c_proj.weight": rng.randn(w, 4 * w), b + "mlp.c_proj.bias": rng.randn(w),
                "proj": rng.randn(w, 48)})
    sd = {**params, **{f"encoder_vqkd.{k}": v for k, v in sem.items()},
          "encode_task_layer.0.weight": rng.randn(w, w), "encode_task_layer.0.bias": rng.randn(w),
          "encode_task_layer.2.weight": rng.randn(32, w), "encode_task_layer.2.bias": rng.randn(32),
          "quantize.embedding_vqkd.weight": rng.randn(16, 32), "quantize.embedding_vqgan.weight": rng.randn(16, 8),
          "quantize.codebook_used": np.zeros(131072)}
    kwargs = dict(image_size=64, in_channels=3, patch_size=16, sem_width=w, sem_depth=1, sem_heads=2, ch=32,
                  ch_mult=(1, 2, 1, 1, 1), num_res_blocks=1, z_channels=32, dec_ch=32, dec_num_res_blocks=1,
                  codebook_size=16, scales=(1, 2, 4), vqkd_width=64, vqkd_depth=3, vqkd_heads=4, teacher_dim=48)
    out = tokenflow.params_from_torch({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd}, kwargs)
    np.testing.assert_array_equal(out["encoder_vqkd"]["class_embedding"].reshape(-1), sem["class_embedding"])
    np.testing.assert_array_equal(out["quantize"]["pixel"]["embedding"], sd["quantize.embedding_vqgan.weight"])
    bias = out["decoder_vqkd"]["blocks"][0]["attn"]["qkv"]["bias"]
    np.testing.assert_array_equal(bias[64:128], 0.0)
    np.testing.assert_array_equal(bias[:64], params["decoder_vqkd.blocks.0.attn.q_bias"])
    model = tokenflow._merge(lambda: tokenflow.TokenFlow(**kwargs, rngs=nnx.Rngs(0)), out)
    assert model.encode(jnp.zeros((1, 64, 64, 3)))["indices"].shape == (1, 21)

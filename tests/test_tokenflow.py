"""TokenFlow (tokenizers/tokenflow.py): the golden fixtures, the shared index (w = 0 -> the semantic
argmin, huge w -> the pixel argmin), decode_code(encode(x).indices) = the forward decode, the random
scale drop, config errors, the tokenizer stages in the one loop on the embedded digits, the real
teachers (CLIP / ViTamin / SigLIP, tiny random-weight checkpoints in their published layouts) as
frozen targets and student initialisations, stage chaining (init_from), the released layouts, clipb at
256 px (position tables interpolated as torch), and the next-scale generator's guided top-k/top-p sampler."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizers import losses, quantizers, tokenflow
from trainers import convert

TINY = dict(image_size=16, in_channels=1, patch_size=4, sem_width=32, sem_depth=1, sem_heads=2, ch=32,
            ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, dec_ch=32, dec_num_res_blocks=1, codebook_size=64,
            scales=(1, 2, 4), vqkd_width=32, vqkd_depth=1, vqkd_heads=2, teacher_dim=32)


@pytest.mark.parametrize("name", ["tokenflow_vq", "tokenflow_pixel"])
def test_golden_fixture(golden, name):
    assert convert.check(golden / f"{name}.npz", verbose=True)


def random_model(kwargs, seed=0):
    """A TokenFlow with N(0, 0.1) numpy weights (an eager nnx init compiles one XLA program per
    parameter shape) and its pure params."""
    rng = np.random.RandomState(seed)
    abstract = nnx.eval_shape(lambda: tokenflow.TokenFlow(**kwargs, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda a: (0.1 * rng.randn(*a.shape)).astype(np.float32),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return tokenflow.merge_module(abstract, params), params


@pytest.fixture(scope="module")
def tiny():
    model, _ = random_model(TINY)
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


def test_demo_train_step_traces_with_the_student_init_teacher():
    # the demo's teacher: a frozen copy of the semantic encoder's initialisation (no checkpoint)
    from configs import tokenflow_clipb
    from trainers.method import get_method

    c = tokenflow_clipb.get_config("demo")
    c.data.image_size = 16
    c.model.update(patch_size=4, ch_mult=(1, 1, 1), scales=(1, 2, 4), codebook_size=64)
    c.model.semantic.update(width=32, depth=1, heads=2)
    c.model.teacher_dim = 32
    c.model.vqkd.update(width=32, depth=1, heads=2)
    c.data.channels, c.model.loss.perceptual_weight = 3, 1.0  # with the LPIPS term (RGB)
    method = get_method(c)
    lpips = nnx.to_pure_dict(nnx.state(losses.lpips_abstract(), nnx.Param))
    method._frozen["lpips"] = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), lpips)  # (no VGG16 file here)
    method.validate_config(c)
    state = traced_train_step(method, 4)
    assert jax.tree.structure(state["teacher"]) == jax.tree.structure(state["params"]["encoder_vqkd"])
    assert jax.tree.structure(state["lpips"]) == jax.tree.structure(lpips)


def test_clipb_at_256_interpolates_the_trained_position_tables():
    # upstream --infer_interpolate: the 224-px tokenizer (14 x 14 position tables of the CLIP student and
    # of decoder_vqkd, as trained and released) run at 256 px, the tables resized in every forward by
    # torch's bicubic with DINO's scale factor (16 + 0.1) / 14; the scale list gains 16.
    import torch

    from configs import tokenflow_clipb
    from trainers.method import get_method

    c = tokenflow_clipb.get_config("enhanced,released,256")
    kw = tokenflow.model_kwargs(c)
    assert (kw["image_size"], kw["position_grid"], kw["scales"]) == (256, 14, (1, 2, 4, 6, 8, 10, 12, 14, 16))
    assert tokenflow.teacher_kwargs(kw)["grid"] == 14  # the frozen teacher loads ViT-B-16.pt's 197-row table
    with pytest.raises(ValueError, match="'256'"):
        tokenflow_clipb.get_config("demo,256")
    # the same variant at a tiny size: 64 px, patch 4 -> the 16 x 16 grid, tables kept at 14 x 14
    c.data.image_size = 64
    c.model.update(patch_size=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, enhanced_ch=32,
                   enhanced_num_res_blocks=1, codebook_size=64, teacher_dim=24)
    c.model.semantic.update(width=32, depth=1, heads=2)
    c.model.vqkd.update(width=32, depth=1, heads=2)
    get_method(c).validate_config(c)  # (the model's checks; ImageNet itself is not here)
    kw = tokenflow.model_kwargs(c)
    model, params = random_model(kw)
    tables = {"encoder_vqkd": ("positional_embedding",), "decoder_vqkd": ("pos_embed",)}
    ref = jax.tree.map(np.asarray, params)
    for part, (name,) in tables.items():
        table = np.asarray(params[part][name])
        assert table.shape == (1, 1 + 14 * 14, 32)
        patch = torch.tensor(table[0, 1:]).reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
        patch = torch.nn.functional.interpolate(patch, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic")
        ref[part][name] = np.concatenate([table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 256, 32).numpy()], 1)
    # the reference: the same weights with torch's interpolated 16 x 16 tables stored
    reference = tokenflow._merge(lambda rngs: tokenflow.TokenFlow(**{**kw, "position_grid": 16}, rngs=rngs), ref)
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 3), minval=-1.0, maxval=1.0)

    @jax.jit
    def run(x):
        enc = model.encode(x)
        sem_ref = reference.encoder_vqkd(x)
        q = enc["quant"][..., :32]
        return (enc, model.decode_code(enc["indices"]), model.encoder_vqkd(x), sem_ref, model.decoder_vqkd(q),
                reference.decoder_vqkd(q))

    enc, (sem_feat, image), tokens, tokens_ref, dec, dec_ref = run(x)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(tokens_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(dec_ref), atol=1e-5)
    assert enc["indices"].shape == (1, 817) and image.shape == (1, 64, 64, 3) and sem_feat.shape == (1, 256, 24)


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
    # top-k 1 is greedy on the guided logits (1 + t) cond - t uncond, t = cfg * k / (n - 1) at scale k:
    # rerun the model on the sampled indices (block-causal: scale k's logits see only scales < k)
    greedy = jax.jit(lambda r: next_scale.generate(model, table, r, labels, cfg_scale=2.0, top_k=1))
    out = greedy(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(greedy(jax.random.PRNGKey(4))), np.asarray(out))
    both = jnp.concatenate([labels, jnp.full_like(labels, 10)])
    logits = jax.jit(lambda z: model(model.teacher_inputs(table, z), both))(jnp.concatenate([out, out]))
    t = np.repeat(2.0 * np.arange(3) / 2, [1, 4, 9])[None, :, None]
    guided = (1 + t) * np.asarray(logits[:2]) - t * np.asarray(logits[2:])
    np.testing.assert_array_equal(guided.argmax(-1), np.asarray(out))
    assert np.any(guided.argmax(-1) != np.asarray(logits[:2]).argmax(-1))  # the guidance changed a choice


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
                  codebook_size=16, scales=(1, 2, 4), vqkd_width=64, vqkd_depth=3, vqkd_heads=4, teacher_dim=48,
                  teacher="clipb_224")
    out = tokenflow.params_from_torch({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd}, kwargs)
    np.testing.assert_array_equal(out["encoder_vqkd"]["class_embedding"].reshape(-1), sem["class_embedding"])
    np.testing.assert_array_equal(out["quantize"]["pixel"]["embedding"], sd["quantize.embedding_vqgan.weight"])
    bias = out["decoder_vqkd"]["blocks"][0]["attn"]["qkv"]["bias"]
    np.testing.assert_array_equal(bias[64:128], 0.0)
    np.testing.assert_array_equal(bias[:64], params["decoder_vqkd.blocks.0.attn.q_bias"])
    model = tokenflow._merge(lambda rngs: tokenflow.TokenFlow(**kwargs, rngs=rngs), out)
    assert jax.eval_shape(model.encode, jnp.zeros((1, 64, 64, 3)))["indices"].shape == (1, 21)


# ----------------------------------------------------------------------------
# Real teachers: tiny random-weight checkpoints in the published layouts
# ----------------------------------------------------------------------------


def _randn(rng, *shape):
    return (0.2 * rng.randn(*shape)).astype(np.float32)


def _ln(sd, rng, name, w):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = 1.0 + _randn(rng, w), _randn(rng, w)


def clip_state_dict(rng, w, depth, patch, grid, out_dim, prefix=""):
    """OpenAI CLIP visual names (``visual.`` of ``ViT-B-16.pt``; TokenFlow's ``encoder_vqkd.``)."""
    sd = {"conv1.weight": _randn(rng, w, 3, patch, patch), "class_embedding": _randn(rng, w),
          "positional_embedding": _randn(rng, grid * grid + 1, w), "proj": _randn(rng, w, out_dim)}
    _ln(sd, rng, "ln_pre", w)
    _ln(sd, rng, "ln_post", w)
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        _ln(sd, rng, b + "ln_1", w)
        _ln(sd, rng, b + "ln_2", w)
        sd.update({b + "attn.in_proj_weight": _randn(rng, 3 * w, w), b + "attn.in_proj_bias": _randn(rng, 3 * w),
                   b + "attn.out_proj.weight": _randn(rng, w, w), b + "attn.out_proj.bias": _randn(rng, w),
                   b + "mlp.c_fc.weight": _randn(rng, 4 * w, w), b + "mlp.c_fc.bias": _randn(rng, 4 * w),
                   b + "mlp.c_proj.weight": _randn(rng, w, 4 * w), b + "mlp.c_proj.bias": _randn(rng, w)})
    return {prefix + k: v for k, v in sd.items()}


def siglip_state_dict(rng, w, depth, mlp, patch, grid, prefix="vision_model."):
    """transformers ``SiglipVisionModel`` names (4.x ``vision_model.``), with the pooling head."""
    sd = {"embeddings.patch_embedding.weight": _randn(rng, w, 3, patch, patch),
          "embeddings.patch_embedding.bias": _randn(rng, w),
          "embeddings.position_embedding.weight": _randn(rng, grid * grid, w),
          "head.probe": _randn(rng, 1, 1, w), "head.attention.in_proj_weight": _randn(rng, 3 * w, w),
          "head.attention.in_proj_bias": _randn(rng, 3 * w), "head.attention.out_proj.weight": _randn(rng, w, w),
          "head.attention.out_proj.bias": _randn(rng, w), "head.mlp.fc1.weight": _randn(rng, mlp, w),
          "head.mlp.fc1.bias": _randn(rng, mlp), "head.mlp.fc2.weight": _randn(rng, w, mlp),
          "head.mlp.fc2.bias": _randn(rng, w)}
    _ln(sd, rng, "post_layernorm", w)
    _ln(sd, rng, "head.layernorm", w)
    for i in range(depth):
        b = f"encoder.layers.{i}."
        _ln(sd, rng, b + "layer_norm1", w)
        _ln(sd, rng, b + "layer_norm2", w)
        for x in "qkv":
            sd[b + f"self_attn.{x}_proj.weight"], sd[b + f"self_attn.{x}_proj.bias"] = _randn(rng, w, w), _randn(rng, w)
        sd.update({b + "self_attn.out_proj.weight": _randn(rng, w, w), b + "self_attn.out_proj.bias": _randn(rng, w),
                   b + "mlp.fc1.weight": _randn(rng, mlp, w), b + "mlp.fc1.bias": _randn(rng, mlp),
                   b + "mlp.fc2.weight": _randn(rng, w, mlp), b + "mlp.fc2.bias": _randn(rng, w)})
    return {prefix + k: v for k, v in sd.items()}


def vitamin_state_dict(tmp_path, width, depth, heads):
    """timm 1.0.31 ``vitamin_xlarge_256`` names, built by timm at a tiny size (random weights)."""
    from tests.test_vitamin import timm_reference

    return timm_reference(tmp_path, width=width, depth=depth, heads=heads, size=32, classes=width)[3]


def teacher_config(teacher, path, tmp_path):
    """A tiny real-teacher config on the embedded digits (grey, repeated to the teacher's RGB)."""
    from configs import tokenflow_clipb, tokenflow_siglip, tokenflow_vitamin

    mod = {"clipb_224": tokenflow_clipb, "vitamin_xlarge_256": tokenflow_vitamin, "siglip_384": tokenflow_siglip}
    c = mod[teacher].get_config("demo")
    c.model.teacher, c.model.teacher_path = teacher, str(path)
    c.data.cache_dir = str(tmp_path / "data")
    m = c.model
    m.update(ch=32, num_res_blocks=1, z_channels=32, codebook_size=32, scale_drop_prob=0.0)
    m.vqkd.update(width=32, depth=1, heads=2)
    m.loss.update(disc_start=0, disc_ndf=8, disc_layers=1)
    if teacher == "clipb_224":  # 16 px, patch 4: a 4 x 4 grid; teacher target = tokens @ proj (24-d)
        c.data.image_size, m.patch_size, m.ch_mult, m.scales, m.teacher_dim = 16, 4, (1, 1, 1), (1, 2, 4), 24
        m.semantic = dict(width=32, depth=2, heads=2)
    elif teacher == "vitamin_xlarge_256":  # 32 px, stride 16: a 2 x 2 grid
        c.data.image_size, m.patch_size, m.ch_mult, m.scales, m.teacher_dim = 32, 16, (1, 1, 1, 1, 1), (1, 2), 32
        m.semantic = dict(width=32, depth=1, heads=2, stem_width=16, stage_widths=(16, 32), stage_depths=(2, 2))
    else:  # 12 px, patch 3: a 4 x 4 grid; the pixel branch at 8 px (as 432 for 384), resized back to 12
        c.data.image_size, m.patch_size, m.ch_mult, m.scales, m.teacher_dim = 12, 3, (1, 1), (1, 2, 4), 32
        m.semantic = dict(width=32, depth=2, heads=2, mlp_dim=40)
    c.batch_size, c.num_steps, c.log_every, c.checkpoint_every = 4, 2, 1, 2
    c.num_grid_samples, c.sample_batch_size, c.eval.num_samples = 4, 4, 0
    return c


def write_teacher(teacher, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.RandomState(0)
    if teacher == "clipb_224":
        import torch

        path = tmp_path / "ViT-B-16.pt"
        sd = clip_state_dict(rng, 32, 2, 4, 4, 24, prefix="visual.")
        sd["text_projection"] = _randn(rng, 8, 24)
        torch.save({k: torch.tensor(v) for k, v in sd.items()}, path)
        return path, sd
    if teacher == "vitamin_xlarge_256":
        sd = vitamin_state_dict(tmp_path, 32, 1, 2)
    else:
        sd = siglip_state_dict(rng, 32, 2, 40, 3, 4)
        sd["logit_scale"] = np.zeros(1, np.float32)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """teacher -> (checkpoint path, its state_dict), written once per module."""
    files = {}

    def get(teacher):
        if teacher not in files:
            files[teacher] = write_teacher(teacher, tmp_path_factory.mktemp(teacher))
        return files[teacher]

    return get


def traced_train_step(method, batch_size):
    """The train state, its shardings and one train step, traced (jax.eval_shape, nothing compiled):
    the state trees, the teacher's shardings and the step's outputs fit together."""
    from trainers import sharding

    rng = jax.random.PRNGKey(0)
    state = jax.eval_shape(method.init_train_state, rng)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = method.train_state_shardings(state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    size, ch = method.kwargs["image_size"], method.kwargs["in_channels"]
    batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, ch), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    new, aux = jax.eval_shape(method.train_step, state, batch, rng)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert all(aux[k].shape == () for k in ("loss", "semantic_loss", "l2_loss", "g_loss", "kept_scales"))
    assert ("perceptual_loss" in aux) == (float(method.config.model.loss.perceptual_weight) > 0)
    return state


@pytest.mark.parametrize("teacher", ["clipb_224", "vitamin_xlarge_256", "siglip_384"])
def test_real_teacher_is_the_target_and_the_student_init(teacher, teacher_file, tmp_path):
    # (the whole train step with a real teacher in the one loop: test_stages_chain_in_the_one_loop, SigLIP)
    from trainers import config_validation
    from trainers.method import get_method

    path, sd = teacher_file(teacher)
    c = teacher_config(teacher, path, tmp_path)
    config_validation.validate(c)
    method = get_method(c)
    teacher_params, student = method.pretrained()["teacher"], method.pretrained()["student"]
    state = traced_train_step(method, c.batch_size)
    assert jax.tree.structure(state["teacher"]) == jax.tree.structure(teacher_params)
    # the student starts from the teacher's weights (only that part of the init compiled)
    init = jax.jit(lambda r: method.initial_params(r)[0]["encoder_vqkd"])(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(student)):
        np.testing.assert_array_equal(np.asarray(a), b)
    _, params = random_model(method.kwargs)
    params["encoder_vqkd"] = init
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, c.data.image_size, c.data.image_size, 1), minval=-1, maxval=1)
    model = method.model_def.merge(params)
    student_only = nnx.eval_shape(lambda: tokenflow.semantic_encoder(
        teacher, **{**tokenflow.teacher_kwargs(method.kwargs), "output_dim": None}, rngs=nnx.Rngs(0)))

    @jax.jit
    def run(x, teacher_params, student):
        target = tokenflow.teacher_target(teacher, tokenflow.merge_module(method.teacher_module(), teacher_params), x)
        enc = model.encode(x)
        student_model = tokenflow.merge_module(student_only, student)
        tokens = student_model(tokenflow.semantic_input(teacher, x))
        sem = tokenflow.semantic_loss(enc["semantic_features"], target)
        return target, enc["semantic_features"], model.decode(enc["quant"])[1], tokens, sem, student_model(
            tokenflow.clip.preprocess(x))

    target, sem_feat, image, tokens, sem, clip_in = run(x, teacher_params, student)
    grid = c.data.image_size // c.model.patch_size
    assert target.shape == sem_feat.shape == (2, grid * grid, c.model.teacher_dim) and image.shape == x.shape
    assert 0.0 < float(sem) < 2.0  # 1 - cos, averaged over the tokens
    if teacher == "clipb_224":  # the target: CLIP-normalised input, patch tokens @ visual.proj; the student: raw
        assert "proj" in teacher_params and "proj" not in student
        np.testing.assert_allclose(np.asarray(target), np.asarray(clip_in) @ sd["visual.proj"], atol=1e-4)
        assert np.abs(np.asarray(clip_in) - np.asarray(tokens)).max() > 1e-3
    else:  # ViTamin / SigLIP: the target is the teacher tower itself on the normalised input
        np.testing.assert_allclose(np.asarray(target), np.asarray(tokens), atol=1e-4)
    if teacher == "siglip_384":  # hidden_states[-2]: the last layer and the head are not loaded
        assert len(teacher_params["blocks"]) == 1 and "head" not in teacher_params


@pytest.mark.slow
def test_stages_in_the_one_loop_chain_and_a_generator_trains_on_the_codes(teacher_file, tmp_path):
    # The joint stage with a real (tiny, random) SigLIP teacher in the one loop: the GAN on from step 2,
    # decoder-only from step 3 (everything but the pixel decoder stays at its step-2 value), a scale
    # dropped with p = 0.5. The enhanced-decoder stage starts from its workdir. Its codes are cached and a
    # next-scale generator trains on them, sampled to images through the pairing.
    import shutil

    from configs import next_scale_tokenflow
    from trainers import cache_latents, config_validation, sharding, train
    from trainers.method import get_method

    path, _ = teacher_file("siglip_384")
    c = teacher_config("siglip_384", path, tmp_path)
    c.model.update(decoder_finetune_start=2, scale_drop_prob=0.5)
    c.model.loss.disc_start = 1
    c.num_steps, c.checkpoint_every, c.num_grid_samples = 3, 2, 0
    config_validation.validate(c)
    joint_dir = tmp_path / "joint"
    joint = train.train_and_evaluate(c, str(joint_dir))
    m = [json.loads(line) for line in (joint_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and 0.0 < r["semantic_loss"] < 2.0 for r in m)
    assert [r["gan_factor"] for r in m] == [0.0, 1.0, 1.0] and [r["decoder_finetune"] for r in m] == [0, 0, 1]
    assert int(joint["step"]) == 3
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shutil.copytree(joint_dir, tmp_path / "step2")
    shutil.rmtree(tmp_path / "step2" / "checkpoints" / "3")
    _, step2, _ = cache_latents.load_workdir_tokenizer(str(tmp_path / "step2"), mesh, use_ema=False)
    for key in joint["params"]:
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(joint["params"][key]), jax.tree.leaves(step2[key]))]
        assert all(same) if key != "decoder" else not all(same), key

    # the enhanced-decoder stage (upstream drops the plain decoder's keys): its init, as the loop traces
    # it, carries over every other part of the joint workdir; its 64-channel decoder starts fresh
    e = teacher_config("siglip_384", path, tmp_path)
    e.model.update(stage="decoder", enhanced_decoder=True, enhanced_ch=64, init_from=str(joint_dir))
    config_validation.validate(e)
    method = get_method(e)
    init = jax.jit(lambda r: method.initial_params(r)[0])(jax.random.PRNGKey(0))
    for key in joint["params"]:
        if key != "decoder":
            for a, b in zip(jax.tree.leaves(init[key]), jax.tree.leaves(joint["params"][key])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert init["decoder"]["conv_in"]["kernel"].shape[-1] == 64 != joint["params"]["decoder"]["conv_in"]["kernel"].shape[-1]

    tok_config, params, rest = cache_latents.load_workdir_tokenizer(str(joint_dir), mesh, use_ema=False)
    assert tok_config.model.name == "tokenflow"
    rng = np.random.RandomState(0)
    npz = tmp_path / "images.npz"
    np.savez(npz, images=rng.randint(0, 255, (8, 12, 12, 1)).astype(np.uint8), labels=rng.randint(0, 10, 8))
    meta = cache_latents.write_cache(tok_config, params, str(tmp_path / "codes"), npz=str(npz), batch_size=4,
                                     progress=False, rest=rest)
    assert meta["latent_type"] == "codes" and meta["latent_shape"][-1] == 21

    g = next_scale_tokenflow.get_config("demo")
    g.model.update(scales=(1, 2, 4), codebook_size=32, dim=32, n_layer=1, n_head=2)
    g.data.latents = str(tmp_path / "codes")
    g.data.image_size = 12
    g.tokenizer.workdir = str(joint_dir)
    g.batch_size, g.num_steps, g.log_every, g.checkpoint_every = 4, 2, 1, 2
    g.optim.warmup_steps = 1
    g.num_grid_samples, g.sample_batch_size, g.eval.num_samples = 4, 4, 0
    config_validation.validate(g)
    train.train_and_evaluate(g, str(tmp_path / "gen"))
    assert all(np.isfinite(json.loads(r)["loss"]) for r in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines())
    assert list((tmp_path / "gen" / "samples").glob("*.png"))  # indices decoded through the TokenFlow pairing


def test_teacher_config_errors_name_the_field(tmp_path):
    from trainers import config_validation

    c = teacher_config("siglip_384", tmp_path / "missing.safetensors", tmp_path)
    with pytest.raises(ValueError, match="config.model.teacher_path"):
        config_validation.validate(c)
    c.model.teacher_path = ""
    with pytest.raises(ValueError, match="config.model.teacher_path is empty.*siglip-so400m-patch14-384"):
        config_validation.validate(c)
    c = teacher_config("vitamin_xlarge_256", "", tmp_path)
    c.model.loss.semantic_weight = 0.0
    c.model.patch_size = 8
    with pytest.raises(ValueError, match="config.model.patch_size"):
        config_validation.validate(c)
    from configs import tokenflow_clipb

    c = tokenflow_clipb.get_config("demo,decoder")
    with pytest.raises(ValueError, match="config.model.init_from"):
        config_validation.validate(c)


def test_siglip_released_layout_imports_completely(golden):
    # tokenflow_siglip_32k.pt: encoder_vqkd is a transformers 4 SiglipVisionModel (vision_model., all 27
    # layers, post_layernorm, head); only the hidden_states[-2] tower is kept.
    _, params, _, _, _ = convert.load_fixture(golden / "tokenflow_pixel.npz")
    rng = np.random.RandomState(0)
    sd = {**params, **siglip_state_dict(rng, 32, 3, 40, 16, 4, prefix="encoder_vqkd.vision_model."),
          "encode_task_layer.0.weight": _randn(rng, 32, 32), "encode_task_layer.0.bias": _randn(rng, 32),
          "encode_task_layer.2.weight": _randn(rng, 32, 32), "encode_task_layer.2.bias": _randn(rng, 32),
          "quantize.embedding_vqkd.weight": _randn(rng, 16, 32), "quantize.embedding_vqgan.weight": _randn(rng, 16, 8),
          "quantize.codebook_used": np.zeros(131072)}
    kwargs = dict(image_size=64, in_channels=3, patch_size=16, sem_width=32, sem_depth=3, sem_heads=2, ch=32,
                  ch_mult=(1, 2, 1, 1, 1), num_res_blocks=1, z_channels=32, dec_ch=32, dec_num_res_blocks=1,
                  codebook_size=16, scales=(1, 2, 4), vqkd_width=64, vqkd_depth=3, vqkd_heads=4,
                  teacher_dim=48, teacher="siglip_384", semantic_extra={"mlp_dim": 40})
    out = tokenflow.params_from_torch({"ema": sd, "model": {}}, kwargs)
    assert len(out["encoder_vqkd"]["blocks"]) == 2
    np.testing.assert_array_equal(out["encoder_vqkd"]["position_embedding"],
                                  sd["encoder_vqkd.vision_model.embeddings.position_embedding.weight"])
    model = tokenflow._merge(lambda rngs: tokenflow.TokenFlow(**kwargs, rngs=rngs), out)
    image = jax.eval_shape(lambda x: model.decode_code(model.encode(x)["indices"])[1], jnp.zeros((1, 64, 64, 3)))
    assert image.shape == (1, 64, 64, 3)

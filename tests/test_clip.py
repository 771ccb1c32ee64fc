"""OpenAI CLIP visual tower (models/pretrained/clip.py): parity with transformers'
CLIPVisionModelWithProjection on random weights (run outside the repo root: the zoo's ``tokenizers``
package shadows Hugging Face's): patch tokens, the teacher target (CLIP-normalised input, patch tokens
@ visual.proj), the pooled embedding; the position interpolation against upstream's torch formula; the
missing-file error."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.pretrained import clip

CFG = dict(width=32, depth=2, heads=2, patch_size=4, grid=4, output_dim=24)
REFERENCE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, num_channels=3, hidden_act="quick_gelu", projection_dim=24)
    m = CLIPVisionModelWithProjection(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0.0))
        x = torch.rand(2, 3, 16, 16, generator=g) * 2.4 - 1.2  # a little outside [-1, 1]: the clamp matters
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        norm = (((x + 1.0) * 127.5).clamp(0, 255.0) / 255.0 - mean) / std  # TokenFlow's ScalingLayerForClip
        vision = getattr(m, "vision_model", m)
        tokens = vision.post_layernorm(m(pixel_values=x).last_hidden_state)[:, 1:]
        out = m(pixel_values=norm)
        target = m.visual_projection(vision.post_layernorm(out.last_hidden_state)[:, 1:])
    np.savez(sys.argv[1], x=x.numpy(), tokens=tokens.numpy(), target=target.numpy(),
             image_embeds=out.image_embeds.numpy(), **{"sd/" + k: v.numpy() for k, v in m.state_dict().items()})
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    (tmp / "ref.py").write_text(REFERENCE)
    subprocess.run([sys.executable, str(tmp / "ref.py"), str(tmp / "ref.npz")], cwd=tmp, check=True, timeout=300,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "PYTHONNOUSERSITE": "1"})
    ref = np.load(tmp / "ref.npz")
    return ref, clip.openai_from_hf({k[3:]: ref[k] for k in ref.files if k.startswith("sd/")})


def _close(ours, want):
    assert np.abs(np.asarray(ours) - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_matches_transformers_clip_with_projection(reference):
    ref, sd = reference
    model = clip.merge(clip.params_from_torch({f"visual.{k}": v for k, v in sd.items()}, **CFG), **CFG)
    x = jnp.asarray(ref["x"]).transpose(0, 2, 3, 1)
    tokens, target, pooled = jax.jit(lambda x: (model(x), model.project(model(clip.preprocess(x))),
                                                model.image_features(clip.preprocess(x))))(x)
    _close(tokens, ref["tokens"])  # the clipb student: raw pixels, no proj
    _close(target, ref["target"])  # the clipb teacher target (512-d for ViT-B/16)
    _close(pooled, ref["image_embeds"])


def test_student_layout_drops_proj(reference):
    ref, sd = reference
    kw = dict(CFG, output_dim=None)
    params = clip.params_from_torch({f"encoder_vqkd.{k}": v for k, v in sd.items()}, prefix="encoder_vqkd.", **kw)
    assert "proj" not in params
    _close(jax.jit(clip.merge(params, **kw))(jnp.asarray(ref["x"]).transpose(0, 2, 3, 1)), ref["tokens"])


def test_position_interpolation_is_upstreams_scale_factor_bicubic():
    # tokenflow/tokenizer/clip/model.py interpolate_pos_encoding (clipb at 256: 14 x 14 -> 16 x 16)
    pos = np.random.RandomState(0).randn(1, 1 + 14 * 14, 8).astype(np.float32)
    patch = torch.tensor(pos[0, 1:]).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(patch, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic")
    want = want.permute(0, 2, 3, 1).reshape(1, 256, 8).numpy()
    ours = np.asarray(clip.interpolate_pos_embed(jnp.asarray(pos), 16))
    np.testing.assert_array_equal(ours[:, 0], pos[:, 0])
    np.testing.assert_allclose(ours[:, 1:], want, atol=1e-5)
    # the plain size-based resize differs: the +0.1 is not a no-op
    from eval.resize import torch_bicubic

    plain = np.asarray(torch_bicubic(jnp.asarray(pos[:, 1:]).reshape(1, 14, 14, 8), (16, 16))).reshape(1, 256, 8)
    assert np.abs(plain - want).max() > 1e-3


def test_missing_weights_name_the_field_and_the_source():
    with pytest.raises(FileNotFoundError, match="ViT-B-16.pt.*"):
        clip.load_state_dict("/nonexistent/ViT-B-16.pt", "config.model.teacher_path")

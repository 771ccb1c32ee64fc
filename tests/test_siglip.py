"""SigLIP vision tower (models/pretrained/siglip.py): parity with transformers' SiglipVisionModel on random
weights (run outside the repo root: the zoo's ``tokenizers`` package shadows Hugging Face's), including
TokenFlow's ``hidden_states[-2]`` tower and position-table interpolation; the missing-file error."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.pretrained import siglip

CFG = dict(width=32, depth=3, heads=2, mlp_dim=72, patch_size=4, grid=4)
REFERENCE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=2,
                             image_size=16, patch_size=4, num_channels=3, layer_norm_eps=1e-6)
    model = SiglipVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0.0))
        x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        out = model(pixel_values=x, output_hidden_states=True)
        x24 = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
        big = model(pixel_values=x24, interpolate_pos_encoding=True).last_hidden_state
    sd = {"sd/vision_model." + k: v.numpy() for k, v in model.state_dict().items()}
    np.savez(sys.argv[1], x=x.numpy(), last=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
             penultimate=out.hidden_states[-2].numpy(), x24=x24.numpy(), big=big.numpy(), **sd)
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("siglip")
    (tmp / "ref.py").write_text(REFERENCE)
    subprocess.run([sys.executable, str(tmp / "ref.py"), str(tmp / "ref.npz")], cwd=tmp, check=True, timeout=300,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "PYTHONNOUSERSITE": "1"})
    ref = np.load(tmp / "ref.npz")
    # a SiglipModel-style checkpoint: vision_model. keys beside a text tower and logit scale
    sd = {k[3:]: ref[k] for k in ref.files if k.startswith("sd/")}
    sd.update({"text_model.embeddings.token_embedding.weight": np.zeros((4, 4), np.float32),
               "logit_scale": np.zeros(1, np.float32)})
    return ref, sd


def _close(ours, want):
    assert np.abs(np.asarray(ours) - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_matches_transformers_siglip_vision(reference):
    ref, sd = reference
    model = siglip.merge(siglip.params_from_torch(sd, **CFG), **CFG)
    nhwc = lambda a: jnp.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
    last, pooled = jax.jit(lambda x: (model(x), model.pooled(x)))(nhwc(ref["x"]))
    _close(last, ref["last"])
    _close(pooled, ref["pooled"])
    _close(jax.jit(model)(nhwc(ref["x24"])), ref["big"])  # bicubic position table for 6 x 6 patches


def test_tokenflow_tower_is_hidden_states_minus_two(reference):
    ref, sd = reference
    kw = siglip.tokenflow_kwargs(**CFG)
    assert kw["depth"] == 2 and not kw["head"] and not kw["post_layernorm"]
    params = siglip.params_from_torch(sd, **kw)  # the last layer, post_layernorm and head are dropped
    assert "head" not in params and len(params["blocks"]) == 2
    model = siglip.merge(params, **kw)
    _close(jax.jit(model)(jnp.asarray(ref["x"]).transpose(0, 2, 3, 1)), ref["penultimate"])


def test_preprocess_is_the_siglip_scaling_layer():
    x = jnp.array([-1.5, -1.0, 0.0, 1.0]).reshape(1, 1, 4, 1)
    np.testing.assert_allclose(np.asarray(siglip.preprocess(x))[0, 0, :, 0], [-1.0, -1.0, 0.0, 1.0], atol=1e-6)


def test_missing_weights_name_the_field_and_the_source():
    with pytest.raises(FileNotFoundError, match="siglip-so400m-patch14-384.*"):
        siglip.load_state_dict("/nonexistent/model.safetensors", "config.model.teacher_path")

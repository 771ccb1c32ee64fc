"""DINOv2 (models/pretrained/dinov2.py): parity with transformers' Dinov2Model on random weights (run
in a subprocess outside the repo root: the zoo's ``tokenizers`` package shadows Hugging Face's), the
position-table resampling against torch's antialiased bicubic, and the missing-file error."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.pretrained import dinov2

REFERENCE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                       image_size=56, patch_size=14, layerscale_value=0.5, layer_norm_eps=1e-6, hidden_act="gelu")
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and "weight" in name else 0.0))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    sd = {"param/" + k: v.numpy() for k, v in model.state_dict().items()}
    np.savez(sys.argv[1], x=x.numpy(), out=out.numpy(), **sd)
""")


def test_matches_transformers_dinov2_with_random_weights(tmp_path):
    script = tmp_path / "ref.py"
    script.write_text(REFERENCE)
    out = tmp_path / "ref.npz"
    subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, check=True, timeout=300,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    ref = np.load(out)
    sd = {k.removeprefix("param/"): ref[k] for k in ref.files if k.startswith("param/")}
    params = dinov2.params_from_torch(sd, width=48, depth=2, heads=4, grid=4)
    model = dinov2.merge(params, width=48, depth=2, heads=4, grid=4)
    tokens, cls = jax.jit(lambda x: model(x, with_cls=True))(jnp.asarray(ref["x"]).transpose(0, 2, 3, 1))
    want = ref["out"]
    bound = 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(np.asarray(tokens) - want[:, 1:]).max() <= bound
    assert np.abs(np.asarray(cls) - want[:, 0]).max() <= bound


def test_position_table_resampling_matches_torch_antialiased_bicubic():
    rng = np.random.RandomState(0)
    table = rng.randn(1 + 37 * 37, 8).astype(np.float32)
    ours = dinov2.resample_pos_embed(table, 16)
    grid = torch.tensor(table[1:].reshape(1, 37, 37, 8)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(256, 8).numpy()
    np.testing.assert_array_equal(ours[0], table[0])
    np.testing.assert_allclose(ours[1:], ref, atol=2e-5)


def test_missing_weights_name_the_field_and_the_source():
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth.*|config.model.hsr.teacher_path"):
        dinov2.load_params("/nonexistent/dinov2.pth")

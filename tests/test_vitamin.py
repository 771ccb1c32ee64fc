"""ViTamin (models/pretrained/vitamin.py): parity with timm 1.0.31's ``vitamin_xlarge_256`` architecture built
at a tiny size through its own model function (random weights): ``forward_features`` (TokenFlow's teacher
target) and the pooled head; the student layout without fc_norm/head; the missing-file error."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.pretrained import vitamin

TINY = dict(stem_width=16, stage_widths=(16, 32), stage_depths=(2, 2), width=64, depth=2, heads=2)


REFERENCE = textwrap.dedent("""
    import sys
    import numpy as np
    import timm
    import torch
    from timm.models.vitamin import VitCfg, VitConvCfg
    width, depth, heads, size, classes = (int(a) for a in sys.argv[2:7])
    torch.manual_seed(0)
    cfg = VitCfg(embed_dim=(16, 32, width), depths=(2, 2, 1), stem_width=16,
                 conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    model = timm.create_model("vitamin_xlarge_256", pretrained=False, embed_cfg=cfg, img_size=size, embed_dim=width,
                              depth=depth, num_heads=heads, num_classes=classes).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_weight else 0.0))
        x = torch.randn(2, 3, size, size, generator=g)
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    np.savez(sys.argv[1], x=x.numpy().transpose(0, 2, 3, 1), feats=feats.numpy(), logits=logits.numpy(),
             **{"sd/" + k: v.numpy() for k, v in model.state_dict().items()})
""")


def timm_reference(tmp, width=64, depth=2, heads=2, size=64, classes=8):
    """A tiny timm ``vitamin_xlarge_256`` (random weights) in a subprocess (timm imports torchvision and
    triton, which should not load into a process that runs JAX): its input, features, logits, state_dict."""
    (tmp / "vitamin_ref.py").write_text(REFERENCE)
    out = tmp / "vitamin_ref.npz"
    subprocess.run([sys.executable, str(tmp / "vitamin_ref.py"), str(out), str(width), str(depth), str(heads),
                    str(size), str(classes)], cwd=tmp, check=True, timeout=300,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "PYTHONNOUSERSITE": "1"})
    ref = np.load(out)
    return ref["x"], ref["feats"], ref["logits"], {k[3:]: ref[k] for k in ref.files if k.startswith("sd/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return timm_reference(tmp_path_factory.mktemp("vitamin"))


def _close(ours, want):
    assert np.abs(np.asarray(ours) - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_matches_timm_vitamin(reference):
    x, feats, logits, sd = reference
    kw = dict(TINY, num_classes=8)
    model = vitamin.merge(vitamin.params_from_torch(sd, **kw), **kw)
    ours_feats, ours_logits = jax.jit(lambda x: (model(x), model.logits(x)))(jnp.asarray(x))
    assert ours_feats.shape == (2, 16, 64)
    _close(ours_feats, feats)
    _close(ours_logits, logits)


def test_tokenflow_layout_drops_fc_norm_and_head(reference):
    x, feats, _, sd = reference
    params = vitamin.params_from_torch({f"encoder_vqkd.{k}": v for k, v in sd.items()}, prefix="encoder_vqkd.",
                                       **TINY)
    assert "head" not in params and "fc_norm" not in params
    _close(jax.jit(vitamin.merge(params, **TINY))(jnp.asarray(x)), feats)


def test_missing_weights_name_the_field_and_the_source():
    with pytest.raises(FileNotFoundError, match="ViTamin-XL-256px"):
        vitamin.load_state_dict("/nonexistent/model.safetensors", "config.model.teacher_path")

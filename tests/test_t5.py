"""T5 encoder: parity with transformers' PyTorch T5EncoderModel (random weights, both feed-forward kinds,
padding masks, a length past the exact buckets), the converter's file formats and missing-file errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import importlib.util  # noqa: E402

# Looked up, not imported: in this process the zoo's `tokenizers` shadows the one transformers imports.
needs_reference = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers (the test extra) are needed for the T5 reference")

from models.pretrained import t5  # noqa: E402

# Run in a fresh interpreter whose cwd and sys.path exclude the repo root: the zoo's top-level
# `tokenizers` package would shadow Hugging Face's, which transformers imports.
REFERENCE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from transformers import T5Config, T5EncoderModel
    spec = json.loads(sys.argv[1])
    torch.manual_seed(spec["seed"])
    model = T5EncoderModel(T5Config(**spec["config"])).eval()
    with torch.no_grad():  # non-trivial norms and position bias, so a wrong mapping cannot pass
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    ids = torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["length"]))
    mask = torch.ones_like(ids)
    for b, n in enumerate(spec["valid"]):
        mask[b, n:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if spec["format"] == "safetensors":
        from safetensors.torch import save_file
        sd.pop("encoder.embed_tokens.weight")  # tied to shared.weight, as published files store it
        save_file(sd, spec["dir"] + "/model.safetensors")
    else:
        torch.save(sd, spec["dir"] + "/pytorch_model.bin")
    model.config.to_json_file(spec["dir"] + "/config.json")
    np.savez(spec["dir"] + "/ref.npz", ids=ids.numpy(), mask=mask.numpy(), out=out.numpy())
""")


def _reference(tmp_path, config, *, batch, length, valid, fmt, seed=0):
    spec = dict(config=config, batch=batch, length=length, valid=valid, format=fmt, seed=seed, dir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-I", "-c", REFERENCE, json.dumps(spec)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-4000:]
    return np.load(tmp_path / "ref.npz")


TINY = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0)


@needs_reference
@pytest.mark.parametrize("ff,fmt", [("gated-gelu", "safetensors"), ("relu", "bin")])
def test_t5_encoder_matches_transformers(tmp_path, ff, fmt):
    ref = _reference(tmp_path, {**TINY, "feed_forward_proj": ff}, batch=3, length=40, valid=[40, 23, 5], fmt=fmt)
    encoder, cfg = t5.load_pretrained(tmp_path)
    assert cfg.feed_forward_proj == ff and cfg.num_layers == 2
    ours = np.asarray(jax.jit(lambda i, m: encoder(i, m))(ref["ids"], ref["mask"]))
    valid = ref["mask"].astype(bool)
    err = np.max(np.abs(ours[valid] - ref["out"][valid]))
    assert err <= 1e-4 * max(1.0, np.abs(ref["out"]).max()), err
    # Padded positions are computed as transformers computes them too.
    assert np.max(np.abs(ours - ref["out"])) <= 1e-4 * max(1.0, np.abs(ref["out"]).max())


def test_relative_position_buckets_match_mesh_tf_edges():
    rel = np.arange(-300, 301)
    buckets = t5.relative_position_bucket(rel, 32, 128)
    assert buckets[rel == 0] == 0 and buckets[rel == 1] == 17 and buckets[rel == -1] == 1
    assert buckets.max() == 31 and buckets.min() == 0
    assert np.all(buckets[rel >= 128] == 31) and np.all(buckets[rel <= -128] == 15)
    assert np.all(np.diff(buckets[rel > 0]) >= 0)  # monotone in distance


def test_presets_and_config_errors():
    cfg = t5.T5Config.from_preset("t5-v1_1-xl", vocab_size=11)
    assert (cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.is_gated) == (2048, 32, 24, True)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config(feed_forward_proj="swish-x-y")
    with pytest.raises(ValueError, match="unknown T5 preset"):
        t5.T5Config.from_preset("t5-huge")


def test_missing_files_name_the_file_and_where_it_is_published(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*huggingface\.co/google/t5-v1_1-xl"):
        t5.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*huggingface\.co"):
        t5.load_pretrained(tmp_path)
    with pytest.raises(KeyError, match="shared.weight"):
        t5.params_from_hf({}, t5.T5Config.from_dict(TINY))


def test_safetensors_reader_reads_bfloat16_and_float32(tmp_path):
    values = np.array([[1.5, -2.25], [0.125, 1024.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # exact in bfloat16
    f32 = values.astype("<f4").tobytes()
    header = {"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(bf16)]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [len(bf16), len(bf16) + len(f32)]},
              "__metadata__": {"format": "pt"}}
    blob = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bf16 + f32)
    sd = t5.read_safetensors(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(sd["a"], values)
    np.testing.assert_array_equal(sd["b"], values)

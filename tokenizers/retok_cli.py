"""ReTok: reconstruction quality against the number of kept tokens k, for one or more tokenizer runs.

    python -m tokenizers.retok_cli evaluate --workdir=RETOK [--workdir=BASELINE ...] --ks=1,2,4,8,16,32,64 \
        --out=OUT [--num_images=1000] [--batch_size=32] [--folder=IMAGES] [--inception_weights=pt_inception.pth]

Each ``--workdir`` is a ReTok run (``trainers.main --config=configs/retok_*.py`` or ``trainers.convert
import retok``). Every image is encoded once (N + M tokens), the first k kept and decoded (the
released decode of a prefix; k <= N + M, "all" = N, the inference length). Per run and k: PSNR (dB,
uint8 images) and MSE (images in [-1, 1]); with ``--inception_weights`` the Inception rFID, and on the
embedded digits the MNIST-feature rFID (eval/domain.py) of the reconstructions against the originals.
The paper's claim is about the tail: with Redundant Token Padding (and HSR) the tokens after the
first few still improve the reconstruction, where plain nested dropout packs everything into the
head. Compare ``configs/retok_ss.py:demo`` with ``configs/retok_ss.py:demo,baseline`` trained for
equal steps (README, "ReTok").

Prints one table (a row per k, columns per run) and writes ``OUT/quality_vs_k.json`` and
``OUT/reconstructions_<run>.png`` (originals first, then one row per k).

    python -m tokenizers.retok_cli probe --config=configs/retok_ss.py:demo --steps=90 [--one_batch] \
        [--config.model.norm_groups=32 ...]

A short diagnostic run of the tokenizer's train step (no loop, no checkpoint): every ``steps / 6``
steps, on one fixed batch, the reconstruction MSE from the first ``min_tokens`` and from all N tokens,
the MSE of the batch's mean image (what a decoder that ignores its codes reaches) and the variance of
the reconstructions across images (0 = the same output whatever the codes). ``--one_batch`` trains on
that batch only (can the tokenizer overfit 16 digits?). The demo's norm_groups / pos_init_std
choices (configs/retok_common.py) were found this way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tokenizers.one_d_piece_cli import folder_images, psnr, reconstruction_fids


def parse_ks(text: str, num_latent_tokens: int) -> list[int]:
    """"1,2,4,all" -> [1, 2, 4, N]; empty -> 1, 2, 4, ..., N."""
    if not text:
        return [2 ** i for i in range(num_latent_tokens.bit_length()) if 2 ** i <= num_latent_tokens]
    ks = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            ks.append(num_latent_tokens)
        elif part.isdigit():
            ks.append(int(part))
        else:
            raise SystemExit(f"--ks: {part!r} is neither a token count nor 'all'")
    return ks


def run_label(workdir: str, config) -> str:
    m = config.model
    return f"{Path(workdir).name} (M={int(m.num_padding)}, hsr {m.hsr.schedule} x{float(m.hsr.weight):g})"


def evaluate_workdir(workdir: str, ks_text: str, images: np.ndarray | None, *, num_images: int, batch_size: int,
                     inception_weights: str | None, folder: str = "") -> dict:
    """{workdir, label, step, num_padding, num_latent_tokens, results: [{k, psnr, mse[, rfid][, mnist_rfid]}]}
    plus ``images``/``reconstructions`` (uint8) for the picture."""
    import jax

    from trainers import checkpoint, decode, sharding, train
    from trainers.method import ModelDef, get_method

    config = checkpoint.read_config(workdir)
    if config.model.name != "retok":
        raise SystemExit(f"--workdir={workdir} holds a {config.model.name!r} run, not retok")
    method = get_method(config)
    model_def = ModelDef(method)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    step, params, rest = decode.restore_params(workdir, model_def, mesh)
    n, pad = int(config.model.num_latent_tokens), int(config.model.num_padding)
    ks = parse_ks(ks_text, n)
    if any(k < 1 for k in ks):
        raise SystemExit(f"--ks: {[k for k in ks if k < 1]}: at least 1 token is kept")
    beyond = [k for k in ks if k > n + pad]
    if beyond:  # only a run with padding decodes beyond N
        print(f"{workdir}: skipping k = {beyond} > num_latent_tokens + num_padding = {n + pad}", flush=True)
    ks = list(dict.fromkeys(k for k in ks if k <= n + pad))
    if images is None:
        size, channels = int(config.data.image_size), int(config.data.channels)
        images = (folder_images(folder, size, channels, num_images) if folder
                  else train.dataset_images(config, num_images, seed=config.seed + 17))
    domain = config.data.name == "mnist_embedded" and not folder
    rows, recons = measure(model_def, params, rest, images, ks, batch_size=batch_size,
                           inception_weights=inception_weights, domain=domain)
    return {"workdir": str(workdir), "label": run_label(workdir, config), "step": int(step),
            "num_latent_tokens": n, "num_padding": pad, "results": rows,
            "images": images, "reconstructions": recons}


def measure(model_def, params, rest, images: np.ndarray, ks, *, batch_size: int = 32,
            inception_weights: str | None = None, domain: bool = False) -> tuple[list[dict], dict]:
    """Per k: {k, psnr, mse[, rfid][, mnist_rfid]}, and the reconstructions (uint8) per k.

    Each batch is encoded once; the decode from the first k tokens uses the decoder's key mask
    (static shapes: one compilation for every k, the same values as slicing the first k).
    """
    import jax
    import jax.numpy as jnp

    from trainers.sample import images_to_uint8

    enc = jax.jit(lambda p, r, x: model_def.merge(p, r).encode(x)[0])
    dec = jax.jit(lambda p, r, z, k: jnp.clip(model_def.merge(p, r).decode(z, k), -1.0, 1.0))
    latents = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
        pad = batch_size - len(x)
        latents.append((enc(params, rest, np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])), pad))
    x = images.astype(np.float64) / 127.5 - 1.0
    rows, recons = [], {}
    for k in ks:
        rec = np.concatenate([images_to_uint8(dec(params, rest, z, jnp.full((batch_size,), k, jnp.int32)))[
            :batch_size - pad] for z, pad in latents])
        recons[k] = rec
        row = {"k": int(k), "psnr": psnr(images, rec),
               "mse": float(np.mean((x - (rec.astype(np.float64) / 127.5 - 1.0)) ** 2))}
        row.update(reconstruction_fids(rec, images, inception_weights, domain))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, recons


def table(runs: list[dict]) -> str:
    """One row per k; for every run its PSNR / MSE / rFIDs ('-' where the run has no such k)."""
    metrics = [m for m in ("psnr", "mse", "mnist_rfid", "rfid") if any(m in r for run in runs for r in run["results"])]
    ks = sorted({r["k"] for run in runs for r in run["results"]})
    head = ["k"] + [f"{m} [{i}]" for i in range(len(runs)) for m in metrics]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for k in ks:
        cells = [str(k)]
        for run in runs:
            row = next((r for r in run["results"] if r["k"] == k), {})
            cells += [f"{row[m]:.4f}" if m == "mse" and m in row else f"{row[m]:.2f}" if m in row else "-"
                      for m in metrics]
        lines.append(" | ".join(cells))
    legend = [f"[{i}] {run['label']}, step {run['step']}" for i, run in enumerate(runs)]
    return "\n".join(legend + lines)


def evaluate(workdirs: list[str], ks_text: str, out: str, *, num_images: int = 1000, batch_size: int = 32,
             inception_weights: str | None = None, folder: str = "") -> list[dict]:
    """Measure every run on the same images (those of the first run's dataset or ``folder``); write the json."""
    from trainers.sample import make_grid, save_png

    runs, images = [], None
    for wd in workdirs:
        run = evaluate_workdir(wd, ks_text, images, num_images=num_images, batch_size=batch_size,
                               inception_weights=inception_weights, folder=folder)
        images = run["images"]
        runs.append(run)
    wanted = {k for run in runs for k in parse_ks(ks_text, run["num_latent_tokens"])}
    unmeasured = sorted(wanted - {r["k"] for run in runs for r in run["results"]})
    if unmeasured:
        raise SystemExit(f"--ks: {unmeasured} exceed num_latent_tokens + num_padding of every run")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = min(8, len(images))
    for i, run in enumerate(runs):
        grid = [images[:shown]] + [run["reconstructions"][r["k"]][:shown] for r in run["results"]]
        save_png(out_dir / f"reconstructions_{i}.png", make_grid(np.concatenate(grid), columns=shown))
    plain = [{k: v for k, v in run.items() if k not in ("images", "reconstructions")} for run in runs]
    (out_dir / "quality_vs_k.json").write_text(json.dumps({"num_images": int(len(images)), "runs": plain}, indent=2))
    print(table(plain), flush=True)
    print(f"wrote {out_dir / 'quality_vs_k.json'} and reconstructions_*.png", flush=True)
    return plain


def probe(config, steps: int, *, one_batch: bool = False, seed: int = 0, every: int = 0) -> list[dict]:
    """Rows {step, l2_loss, code_perplexity, mse_min, mse_all, mean_image_mse, recon_var} (see the module
    docstring); printed as json lines."""
    import jax
    import jax.numpy as jnp

    from trainers import data
    from trainers.method import get_method

    config.num_steps = steps  # the lr schedule spans the probe
    method = get_method(config)
    m = config.model
    small, n = int(m.min_tokens), int(m.num_latent_tokens)
    state = method.init_train_state(jax.random.PRNGKey(seed))
    it = data.create_iterator(config, seed=seed, global_batch_size=config.batch_size)
    fixed = next(it)
    fixed = {"image": jnp.asarray(fixed["image"]), "label": jnp.asarray(fixed["label"])}
    step_fn = jax.jit(method.train_step, donate_argnums=0)

    @jax.jit
    def measure(params, rest, x):
        model = method.model_def.merge(params, rest)
        z_q = model.encode(x)[0]
        out = {}
        for name, k in (("min", small), ("all", n)):
            rec = jnp.clip(model.decode(z_q, k), -1.0, 1.0)
            out[f"mse_{name}"] = jnp.mean(jnp.square(rec - x))
            if name == "all":
                out["recon_var"] = jnp.mean(jnp.var(rec, axis=0))
        out["mean_image_mse"] = jnp.mean(jnp.square(x - x.mean(0)))
        return out

    every = every or max(steps // 6, 1)
    rows = []
    for i in range(steps):
        batch = fixed
        if not one_batch:
            b = next(it)
            batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"])}
        state, aux = step_fn(state, batch, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        if (i + 1) % every == 0 or i + 1 == steps:
            row = {"step": i + 1, "l2_loss": float(aux["l2_loss"]), "code_perplexity": float(aux["code_perplexity"])}
            row.update({k: float(v) for k, v in measure(state["params"], state["rest"], fixed["image"]).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv):
    """python -m tokenizers.retok_cli evaluate --workdir=RUN [--workdir=RUN2 ...] --ks=1,2,4,all --out=OUT
    [--num_images=1000] [--batch_size=32] [--folder=IMAGES] [--inception_weights=FILE]
    python -m tokenizers.retok_cli probe --config=configs/retok_ss.py:demo --steps=90 [--one_batch]
    [--config.FIELD=VALUE ...]"""
    from absl import flags

    if len(argv) < 2 or argv[1] not in ("evaluate", "probe"):
        print(main.__doc__)
        return 2
    if argv[1] == "probe":
        from ml_collections import config_flags

        config_flags.DEFINE_config_file("config", None, "a configs/retok_*.py config", lock_config=False)
        flags.DEFINE_integer("steps", 90, "train steps")
        flags.DEFINE_bool("one_batch", False, "train on the fixed measurement batch only")
        flags.DEFINE_integer("seed", 0, "init and data seed")
        f = flags.FLAGS
        f([argv[0]] + argv[2:])
        if f.config is None or f.config.model.name != "retok":
            raise SystemExit("--config: a ReTok config (configs/retok_ss.py:demo, ...)")
        probe(f.config, f.steps, one_batch=f.one_batch, seed=f.seed)
        return 0
    flags.DEFINE_multi_string("workdir", None, "ReTok run(s); repeat the flag to compare runs", required=True)
    flags.DEFINE_string("out", None, "output directory", required=True)
    flags.DEFINE_string("ks", "", "comma-separated kept-token counts k, 'all' = N (default 1, 2, 4, ..., N)")
    flags.DEFINE_integer("num_images", 1000, "images to measure")
    flags.DEFINE_integer("batch_size", 32, "images per batch")
    flags.DEFINE_string("folder", "", "a folder of images (default: the first run's dataset)")
    flags.DEFINE_string("inception_weights", "", "FID-Inception weights for rFID (pt_inception-2015-12-05 .pth/.pt)")
    f = flags.FLAGS
    f([argv[0]] + argv[2:])
    evaluate(f.workdir, f.ks, f.out, num_images=f.num_images, batch_size=f.batch_size,
             inception_weights=f.inception_weights or None, folder=f.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

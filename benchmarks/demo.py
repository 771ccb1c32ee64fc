"""Score a finished demo run under sampling variants: EMA vs raw params, solver, steps, guidance.

    python benchmarks/demo.py --workdir=workdirs/demo                       # the run's own settings
    python benchmarks/demo.py --workdir=workdirs/demo --variant=sample.use_ema=false \
        --variant=sample.method=euler,sample.num_steps=50 --variant=sample.cfg_scale=4

Each ``--variant`` is a comma-separated list of config overrides (``--set`` syntax of trainers.sample)
applied to the workdir's config.json; an empty variant (the default) is the run's own sampling. Every
variant is scored exactly as the loop's final evaluation (trainers/train.py ``evaluate``): the same
``config.eval.num_samples`` samples (classes in turn, seed config.seed + 1) against the same training
images (seed config.seed + 17), with the MNIST-feature FID, MNIST-classifier IS and class-conditional
accuracy of eval/domain.py. One line per variant: its scores and its sampling seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score_variant(config, workdir: str, overrides: list[str]) -> dict:
    import jax

    from eval import harness
    from trainers import checkpoint, config_validation, sharding
    from trainers.sample import Sampler, generate, load_params
    from trainers.train import dataset_images

    config = config.copy_and_resolve_references()
    for override in overrides:
        key, _, value = override.partition("=")
        config_validation.set_override(config, key, value)
    config_validation.validate(config, check_data=False)
    checkpoint.check_params_fit(workdir, config)
    mesh = sharding.make_mesh(config.mesh)
    method, model_def, step, params, rest = load_params(config, workdir, mesh)
    n = int(config.eval.num_samples) or 500
    reference = dataset_images(config, n, seed=config.seed + 17)
    sampler = Sampler(method, model_def, mesh)
    start = time.perf_counter()
    images, labels, _ = generate(config, sampler, params, rest, mesh, n, seed=config.seed + 1)
    seconds = time.perf_counter() - start
    jax.clear_caches()
    scores = harness.evaluate(images, dataset_images=reference, domain=True, labels=labels)
    return {"step": step, "sample_s": seconds, **scores}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variant", action="append", default=None,
                        help="comma-separated config overrides, e.g. sample.use_ema=false,sample.num_steps=50")
    args = parser.parse_args(argv)
    from trainers import checkpoint

    config = checkpoint.read_config(args.workdir)
    for variant in args.variant or [""]:
        overrides = [v for v in variant.split(",") if v]
        result = score_variant(config, args.workdir, overrides)
        name = variant or "(run's own sampling)"
        print(f"{name:<60} step {result['step']}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in result.items() if k != "step"), flush=True)


if __name__ == "__main__":
    main()

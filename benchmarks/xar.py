"""xAR-B at its real sequence (16x16 tokens of 16 channels, 4 cells of 8x8): train-step time, samples/s,
and the KV-cache speedup (uncached / cached sampling time), measured side by side in one run.

    python benchmarks/xar.py                    # reduced width (default 128, 2 heads), xAR-B depth 8+8
    python benchmarks/xar.py --width=768 --heads=12 --batch=32   # the real xAR-B (an accelerator)

Uncached sampling runs the whole 256-token sequence at every solver step (finished cells at t = 0);
cached sampling runs the 64 tokens of the current cell against stored keys/values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import xar_b  # noqa: E402
from trainers.method import ModelDef, get_method  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402


def _time(fn, *args, repeats=3):
    """(compile + first call seconds, best of ``repeats`` seconds)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return first, best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--sample_batch", type=int, default=4)
    parser.add_argument("--num_steps", type=int, default=40, help="solver steps per cell (xAR-B: 40)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = xar_b.get_config()
    config.model.update(hidden_size=args.width, num_heads=args.heads)
    config.sample.num_steps = args.num_steps
    method = get_method(config)
    model_def = ModelDef(method)
    params, rest = jax.jit(model_def.init)(jax.random.PRNGKey(0))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx, _ = make_optimizer(config)
    opt_state = jax.jit(tx.init)(params)
    print(f"xAR-B depth {config.model.encoder_depth}+{config.model.decoder_depth}, width {args.width}, "
          f"{args.heads} heads: {num_params / 1e6:.1f}M params; 256 tokens x 16 channels; "
          f"{jax.devices()[0].platform}")

    @jax.jit
    def train_step(params, opt_state, batch, rng):
        def loss_fn(p):
            return method.loss(model_def.merge(p, rest), batch, rng)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    batch = {"latent": jax.random.normal(jax.random.PRNGKey(1), (args.batch, 16, 16, 16)),
             "label": jnp.arange(args.batch, dtype=jnp.int32) % 1000}
    first, step = _time(train_step, params, opt_state, batch, jax.random.PRNGKey(2), repeats=args.repeats)
    print(f"train step (batch {args.batch}): {step * 1e3:.0f} ms  ({args.batch / step:.1f} images/s; "
          f"compile+first {first:.1f} s)")

    labels = jnp.arange(args.sample_batch, dtype=jnp.int32)
    times = {}
    samples = {}
    for use_cache in (True, False):
        fn = jax.jit(lambda p, rng, use_cache=use_cache: method.sample(
            model_def.merge(p, rest), rng, labels, use_cache=use_cache))
        first, best = _time(fn, params, jax.random.PRNGKey(3), repeats=args.repeats)
        times[use_cache] = best
        samples[use_cache] = np.asarray(fn(params, jax.random.PRNGKey(3)))
        print(f"sampling {'with' if use_cache else 'without'} KV cache ({args.num_steps} Euler-Maruyama steps x "
              f"4 cells, cfg {config.sample.cfg_scale}, batch {args.sample_batch}): "
              f"{args.sample_batch / best:.2f} samples/s  ({best:.2f} s; compile+first {first:.1f} s)")
    diff = float(np.abs(samples[True] - samples[False]).max())
    print(f"KV-cache speedup (uncached / cached time): {times[False] / times[True]:.2f}x; "
          f"max |cached - uncached| = {diff:.1e}")


if __name__ == "__main__":
    main()

"""TokenBridge at its real sequence (16x16 tokens of 16 dimensions, 64 quantisation levels): train-step time,
samples/s, and the channel-AR KV-cache speedup, measured side by side in one run.

    python benchmarks/tokenbridge.py              # reduced width (default 128, 2 heads), depths 4+4, head 128/4
    python benchmarks/tokenbridge.py --size=L --batch=64 --num_iter=64 --sample_batch=64   # TokenBridge-L (GPU)

The channel AR is timed on its own (``sample_channel_ar`` over ``--head_rows`` tokens: uncached reruns the
whole causally masked 16-position sequence at each of the 16 steps; cached runs one position against stored
keys/values), and inside the whole MAR sampler (``--num_iter`` iterations, guidance on, so two backbone
passes per iteration).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import tokenbridge_b, tokenbridge_h, tokenbridge_l  # noqa: E402
from trainers.method import ModelDef, get_method  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402

CONFIGS = {"B": tokenbridge_b, "L": tokenbridge_l, "H": tokenbridge_h}


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
    parser.add_argument("--size", choices=["", "B", "L", "H"], default="", help="a real size ('' = reduced)")
    parser.add_argument("--width", type=int, default=128, help="reduced: encoder/decoder/channel-AR width")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4, help="reduced: encoder = decoder depth")
    parser.add_argument("--channel_depth", type=int, default=4, help="reduced: channel-AR depth (L: 4)")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--sample_batch", type=int, default=4)
    parser.add_argument("--num_iter", type=int, default=16, help="MAR iterations (upstream README: 256)")
    parser.add_argument("--head_rows", type=int, default=256, help="tokens in the channel-AR timing")
    parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on an accelerator)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = CONFIGS[args.size or "B"].get_config()
    if not args.size:
        w, h = args.width, args.heads
        config.model.update(encoder_embed_dim=w, encoder_depth=args.depth, encoder_num_heads=h,
                            decoder_embed_dim=w, decoder_depth=args.depth, decoder_num_heads=h,
                            channel_embed_dim=w, channel_depth=args.channel_depth, channel_heads=h)
    config.compute_dtype = args.dtype
    method = get_method(config)
    model_def = ModelDef(method)
    params, rest = jax.jit(model_def.init)(jax.random.PRNGKey(0))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx, _ = make_optimizer(config)
    opt_state = jax.jit(tx.init)(params)
    m = config.model
    name = f"TokenBridge-{args.size}" if args.size else "TokenBridge (reduced)"
    print(f"{name}: encoder {m.encoder_embed_dim}x{m.encoder_depth}, decoder {m.decoder_embed_dim}x{m.decoder_depth}, "
          f"channel AR {m.channel_embed_dim}x{m.channel_depth} ({m.channel_heads} heads): {num_params / 1e6:.1f}M "
          f"params; 256 tokens x 16 dims, 64 levels; {args.dtype}; {jax.devices()[0].platform}")

    @jax.jit
    def train_step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(lambda p: method.loss(model_def.merge(p, rest), batch, rng)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    batch = {"latent": 0.2325 * 4 * jax.random.normal(jax.random.PRNGKey(1), (args.batch, 16, 16, 16)),
             "label": jnp.arange(args.batch, dtype=jnp.int32) % 1000}
    first, step = _time(train_step, params, opt_state, batch, jax.random.PRNGKey(2), repeats=args.repeats)
    print(f"train step (batch {args.batch}): {step * 1e3:.0f} ms  ({args.batch / step:.1f} images/s; "
          f"compile+first {first:.1f} s)")

    # the channel AR alone
    features = jax.random.normal(jax.random.PRNGKey(3), (args.head_rows, m.decoder_embed_dim))
    head_times, head_tokens = {}, {}
    for use_cache in (True, False):
        fn = jax.jit(lambda p, f, use_cache=use_cache: model_def.merge(p, rest).sample_channel_ar(
            f, jax.random.PRNGKey(4), temperature=1.0, use_cache=use_cache))
        first, best = _time(fn, params, features, repeats=args.repeats)
        head_times[use_cache], head_tokens[use_cache] = best, np.asarray(fn(params, features))
        print(f"channel AR {'with' if use_cache else 'without'} KV cache ({args.head_rows} tokens x 16 dims): "
              f"{best * 1e3:.1f} ms  (compile+first {first:.1f} s)")
    same = np.mean(head_tokens[True] == head_tokens[False])
    print(f"channel-AR KV-cache speedup (uncached / cached time): {head_times[False] / head_times[True]:.2f}x; "
          f"identical tokens: {same * 100:.2f}%")

    # the whole sampler
    labels = jnp.arange(args.sample_batch, dtype=jnp.int32)
    times = {}
    for use_cache in (True, False):
        fn = jax.jit(lambda p, rng, use_cache=use_cache: method.sample(
            model_def.merge(p, rest), rng, labels, num_steps=args.num_iter, use_cache=use_cache))
        first, best = _time(fn, params, jax.random.PRNGKey(5), repeats=args.repeats)
        times[use_cache] = best
        print(f"sampling {'with' if use_cache else 'without'} channel-AR KV cache ({args.num_iter} MAR iterations, "
              f"cfg {config.sample.cfg_scale}, batch {args.sample_batch}): {args.sample_batch / best:.2f} samples/s "
              f"({best:.2f} s; compile+first {first:.1f} s)")
    print(f"sampler KV-cache speedup (uncached / cached time): {times[False] / times[True]:.2f}x")


if __name__ == "__main__":
    main()

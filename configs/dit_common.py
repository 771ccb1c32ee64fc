"""DiT sizes (DiT paper Table 1) and the settings shared by configs/dit_{s,b,l,xl}.py."""

from __future__ import annotations

import ml_collections

from configs import common

# width, depth, heads (Peebles & Xie, Table 1)
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """``arg``: "p2" | "p4" | "p8" (patch size, default p2), or "demo" (pixel-space MNIST on a laptop CPU);
    variants combine with commas, e.g. "p4,demo"."""
    variants = [a for a in (arg or "").split(",") if a]
    patch = 2
    demo = False
    for v in variants:
        if v in ("p2", "p4", "p8"):
            patch = int(v[1])
        elif v == "demo":
            demo = True
        else:
            raise ValueError(f"unknown DiT config variant {v!r}; use p2, p4, p8 and/or demo")
    width, depth, heads = SIZES[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="dit", input_size=32, patch_size=patch, in_channels=4, hidden_size=width, depth=depth,
        num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
        remat=False))  # remat: recompute each block's activations in the backward pass
    # ImageNet 256 on SD-VAE latents (32x32x4, scale 0.18215), as DiT/SiT; the cache is built with
    # `python -m trainers.cache_latents` and named here; samples are decoded by the same SD-VAE
    # (config.tokenizer.weights = sd-vae-ft-ema, as DiT's training and sample_ddp.py --vae=ema).
    common.imagenet256_latents(c, "data_cache/imagenet2012_256_sd_vae", 0.18215, tokenizer="sd_vae")
    # DiT paper: AdamW, lr 1e-4 constant, no weight decay, batch 256, EMA 0.9999, 400K steps.
    c.batch_size = 256
    c.num_steps = 400_000
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0
    c.optim.schedule = "constant"
    c.ema_rate = 0.9999
    c.checkpoint_every = 50_000
    c.keep_every = 100_000
    c.sample.method = "heun"  # SiT's ODE sampler
    c.sample.num_steps = 50
    c.sample.cfg_scale = 4.0
    if demo:
        # Pixel space on the embedded MNIST digits: 32x32x1, 64 tokens at patch 4.
        c.model.update(input_size=32, patch_size=4, in_channels=1, num_classes=10, learn_sigma=False,
                       hidden_size=min(width, 96), depth=4, num_heads=4)
        common.embedded_demo_data(c, image_size=32)
        c.batch_size = 64
        c.num_steps = 1200
        c.optim.lr = 1e-3
        c.optim.schedule = "warmup_cosine"
        c.optim.warmup_steps = 100
        c.optim.grad_clip = 1.0
        c.checkpoint_every = 400
    return c

"""DiT sizes (DiT paper Table 1) and the settings shared by configs/dit_{s,b,l,xl}.py (and LiT / DyDi-LiT)."""

from __future__ import annotations

import ml_collections

from configs import common

# width, depth, heads (Peebles & Xie, Table 1)
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """``arg``: "p2" | "p4" | "p8" (patch size, default p2); "ddpm" (DiT's Gaussian diffusion, default)
    or "sit" (SiT's flow matching on the same network); "512" (512x512 images: 64x64 latents); "demo"
    (pixel-space MNIST on a laptop CPU). Variants combine with commas, e.g. "p4,sit,demo"."""
    variants = [a for a in (arg or "").split(",") if a]
    patch = 2
    demo = False
    objective = "ddpm"
    resolution = 256
    for v in variants:
        if v in ("p2", "p4", "p8"):
            patch = int(v[1])
        elif v == "demo":
            demo = True
        elif v in ("ddpm", "sit"):
            objective = "ddpm" if v == "ddpm" else "flow"
        elif v in ("256", "512"):
            resolution = int(v)
        else:
            raise ValueError(f"unknown DiT config variant {v!r}; use p2, p4, p8, ddpm, sit, 256, 512 and/or demo")
    width, depth, heads = SIZES[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="dit", input_size=32, patch_size=patch, in_channels=4, hidden_size=width, depth=depth,
        num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
        objective=objective,  # "ddpm" (DiT) | "flow" (SiT); `convert import dit` needs ddpm, `sit` flow
        # softmax attention: "auto" = cuDNN flash on GPU (bf16), Pallas splash on TPU, else "xla" (reference)
        attention_impl="auto",
        remat=False))  # remat: recompute each block's activations in the backward pass
    # DiT's diffusion/__init__.py create_diffusion: linear betas over 1000 steps (objective "ddpm").
    c.diffusion = ml_collections.ConfigDict(dict(noise_schedule="linear", diffusion_steps=1000))
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
    set_sampler(c, objective)
    if resolution == 512:  # DiT/SiT 512: 64x64x4 SD-VAE latents
        c.model.input_size = 64
        c.data.image_size = 512
        c.data.latents = "data_cache/imagenet2012_512_sd_vae"
    if demo:
        # Pixel space on the embedded MNIST digits: 32x32x1, 64 tokens at patch 4.
        c.model.update(input_size=32, patch_size=4, in_channels=1, num_classes=10,
                       learn_sigma=objective == "ddpm", hidden_size=min(width, 96), depth=4, num_heads=4)
        common.embedded_demo_data(c, image_size=32)
        common.short_demo_run(c)
        c.sample.cfg_channels = 1
        if objective == "ddpm":  # pixel space: clip x_0 to [-1, 1] as ADM's pixel models (DiT's latents: no clip)
            c.sample.clip_denoised = True
    return c


def set_sampler(c: ml_collections.ConfigDict, objective: str) -> None:
    """The papers' FID protocol: DiT 250-step ancestral DDPM, SiT 250-step Euler-Maruyama SDE, cfg 1.5 for
    both (cfg 4.0 in upstream sample.py is the visualisation setting), 3 of 4 latent channels guided."""
    c.sample.cfg_scale = 1.5
    c.sample.cfg_channels = 3  # forward_with_cfg guides channels 0..2 only; 0 guides every channel
    c.sample.num_steps = 250
    if objective == "ddpm":
        c.sample.method = "ddpm"  # "ddpm" (p_sample loop) | "ddim"
        c.sample.timestep_respacing = ""  # "" = str(num_steps) (ddpm) or f"ddim{num_steps}" (ddim)
        c.sample.clip_denoised = False  # DiT's sample.py
        c.sample.ddim_eta = 0.0
    else:
        c.sample.method = "sde"  # "sde" | "dopri5" | "euler" | "heun" (SiT sample.py SDE / ODE)
        c.sample.sde_diffusion_form = "sigma"
        c.sample.sde_diffusion_norm = 1.0
        c.sample.sde_last_step = "Mean"  # "Mean" | "Euler" | "none"
        c.sample.sde_last_step_size = 0.04
        c.sample.atol = 1e-6  # dopri5
        c.sample.rtol = 1e-3

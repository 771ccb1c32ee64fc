"""xAR sizes and the settings shared by configs/xar_{b,l,h}.py (upstream OliverRensu/xAR).

Variants (comma-separated): "demo" (pixel-space MNIST on a laptop CPU), "latent" (with demo: the
same digits in the latent space of the zoo's own demo KL-VAE, configs/kl_vae_f16.py:demo, read from
its latent cache and decoded by it) and the prediction entity X: "cell" (default, upstream's 4
cells of 8x8), "token", "subsample", "scale", "image"; e.g. ``--config=configs/xar_b.py:demo,scale``.

The embedded latent pipeline (tokenizer -> latent cache -> xAR -> images -> score)::

    python -m trainers.main --config=configs/kl_vae_f16.py:demo --workdir=workdirs/kl_vae_demo
    python -m trainers.cache_latents --tokenizer_workdir=workdirs/kl_vae_demo --out=data_cache/mnist_kl_vae_demo
    python -m trainers.main --config=configs/xar_b.py:demo,latent --workdir=workdirs/xar_latent_demo
"""

from __future__ import annotations

import ml_collections

from configs import common

# width, encoder depth = decoder depth, heads (upstream models/xar.py xar_base/large/huge)
SIZES = {"B": (768, 8, 12), "L": (1024, 16, 16), "H": (1280, 20, 16)}
# sampling steps and guidance scale of the paper's results (upstream README)
SAMPLING = {"B": (40, 2.7), "L": (50, 2.3), "H": (50, 2.2)}
ENTITIES = ("token", "cell", "subsample", "scale", "image")

# The demo KL-VAE's workdir and latent cache (the paths of the pipeline above).
DEMO_TOKENIZER_WORKDIR = "workdirs/kl_vae_demo"
DEMO_LATENTS = "data_cache/mnist_kl_vae_demo"
# 1 / std of the demo KL-VAE's posterior samples on the digits (LDM's scale_by_std: trainers.cache_latents
# measured latent_std 2.206 for configs/kl_vae_f16.py:demo), so the flow sees unit-variance latents.
DEMO_LATENT_SCALE = 0.45

IMAGENET_TRAIN_IMAGES = 1_281_167

# The pixel demo's length and guidance (measured in the demo block of get_config).
DEMO_STEPS = 1500
DEMO_CFG = 2.0
DEMO_GUIDANCE_HIGH = 0.7  # guide only at times t <= 0.7 (t = 1 the noise)


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    demo = "demo" in variants
    latent = "latent" in variants
    if latent and not demo:
        raise ValueError("xAR config variant 'latent' goes with 'demo' (the embedded digits' latent pipeline); "
                         "ImageNet configs are latent already")
    entity = "cell"
    for v in variants:
        if v in ENTITIES:
            entity = v
        elif v not in ("demo", "latent"):
            raise ValueError(f"unknown xAR config variant {v!r}; use demo, latent and/or one of {ENTITIES}")
    width, depth, heads = SIZES[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="xar",
        input_size=16, patch_size=1, in_channels=16,  # MAR KL-16 latent of a 256px image: 16x16x16
        hidden_size=width, encoder_depth=depth, decoder_depth=depth, num_heads=heads, mlp_ratio=4.0,
        num_classes=1000, class_dropout_prob=0.1,
        attn_dropout=0.1, proj_dropout=0.1,  # upstream main_mar.py defaults, which train.sh keeps
        entity=entity,  # the prediction entity X
        cell_size=8,  # X = cell: k x k tokens (upstream: 8x8 cells, 4 of them on the 16x16 grid)
        subsample_stride=2,  # X = subsample: entity (a, b) = tokens (a + 2i, b + 2j), 4 entities of 64
        scales=(1, 2, 4, 8, 16),  # X = scale: coarse-to-fine resolutions, the last = the grid
        # softmax-attention kernel (models/layers.py ATTENTION_IMPLS): auto = cuDNN flash on GPU with
        # bfloat16 compute, Pallas splash on TPU, the XLA reference otherwise
        attention_impl="auto",
        # the network's output (models/xar.py PREDICTIONS): "v" the velocity (upstream), "x" the clean tokens
        prediction="v",
        # training times t = sigmoid(N(mean, std)) per entity, t = 1 the noise (upstream: logit-normal(0, 1))
        time_logit_mean=0.0, time_logit_std=1.0,
        remat=False,  # recompute every block in the backward pass (xAR-H on 64 devices: benchmarks/pod_plan.py)
    ))
    c.compute_dtype = "bfloat16"  # accelerator runs: bf16 compute; params, AdamW state and norms stay f32
    # ImageNet 256 on cached MAR KL-16 latents: posterior sample x 0.2325 (upstream engine_xar.py), flips cached;
    # samples are decoded by the same KL-16 (config.tokenizer.weights = MAR's kl16.ckpt).
    common.imagenet256_latents(c, "data_cache/imagenet2012_256_mar_kl16", 0.2325, tokenizer="kl16")
    # Upstream main_mar.py / train.sh: batch 2048, blr 5e-5 -> lr 5e-5 * 2048 / 256, AdamW (0.9, 0.96),
    # wd 0.02 (not on biases / 1-D), clip 1.0, EMA 0.9999; util/lr_sched.py: warmup 100 epochs,
    # constant to 600, cosine to min_lr 1e-5 at 800.
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // 2048
    c.batch_size = 2048
    c.num_steps = 800 * steps_per_epoch
    c.optim.lr = 5e-5 * c.batch_size / 256
    c.optim.b1, c.optim.b2 = 0.9, 0.96
    c.optim.weight_decay = 0.02
    c.optim.grad_clip = 1.0
    c.optim.schedule = "warmup_constant_cosine"
    c.optim.warmup_steps = 100 * steps_per_epoch
    c.optim.constant_steps = 500 * steps_per_epoch
    c.optim.min_lr = 1e-5
    c.ema_rate = 0.9999
    c.checkpoint_every = 10_000
    c.keep_every = 100_000
    c.sample.method = "euler_maruyama"  # "euler_maruyama" | "euler" | "heun"
    c.sample.num_steps, c.sample.cfg_scale = SAMPLING[size]
    c.sample.use_cache = True  # KV cache of finished entities (same samples as without, faster)
    c.sample.cfg_schedule = "linear"  # guidance 1 -> cfg over the entities (upstream); "constant": cfg for all
    c.sample.guidance_low, c.sample.guidance_high = 0.0, 1.0  # guide at times low <= t <= high (upstream: always)
    if demo:
        # Pixel space on the embedded MNIST digits: 32x32x1, patch 8 -> a 4x4 grid of 64-channel tokens,
        # 4 cells of 2x2 tokens (upstream's 4-cell structure; each cell is a 16x16-pixel quadrant).
        # Sized for under 5 minutes on 2 CPU cores (benchmarks/demo.py scores the run's variants):
        # patch 4 / 4 cells of 4x4 / width 64 / 2+2 blocks / 1,500 steps drew MNIST-FID 148 (EMA 0.995),
        # this size 120 with the EMA and 95 with the raw weights (cfg 2).
        # Pixel tokens: the network predicts the clean tokens (prediction "x", JiT) and trains at noisier
        # times (logit-normal mean 0.8, median t = 0.69). Measured at 1,000 steps, upstream ramped cfg 3:
        # v-prediction, mean 0: MNIST-FID 93.4 / class accuracy 0.40; x: 74.4 / 0.48; x, mean 0.8: 51.8 / 0.87.
        c.model.update(input_size=32, patch_size=8, in_channels=1, num_classes=10, hidden_size=128,
                       encoder_depth=3, decoder_depth=3, num_heads=4, cell_size=2, subsample_stride=2,
                       scales=(1, 2, 4), attn_dropout=0.0, proj_dropout=0.0, prediction="x",
                       time_logit_mean=0.8)
        common.embedded_demo_data(c, image_size=32)
        c.compute_dtype = "float32"  # CPU: float32 is the fast path there
        c.batch_size = 64
        c.num_steps = DEMO_STEPS
        c.optim.lr = 2e-3
        c.optim.weight_decay = 0.02
        c.optim.schedule = "warmup_cosine"
        c.optim.warmup_steps = 100
        c.optim.constant_steps = 0
        c.optim.min_lr = 1e-5
        c.checkpoint_every = 500
        # Samples from the raw weights: the loop's EMA starts at the init with no warm-up, and at rate 0.995
        # (horizon 200 steps) it still lags a 1,000-step run (step 500: EMA FID 328 / class accuracy 0.12,
        # raw 197 / 0.23; step 1000: 120 / 0.28 vs 95 / 0.33); the cosine schedule's last steps at ~1e-5
        # already average the weights. Guidance DEMO_CFG at every cell ("constant"; upstream's ramp leaves the
        # first cell unguided) and only at t <= DEMO_GUIDANCE_HIGH (upstream's guidance_high): guidance at the
        # noisiest times buys class accuracy with FID. The 1,000-step x / mean-0.8 run re-scored
        # (benchmarks/demo.py): ramped cfg 3 FID 51.8 / accuracy 0.87, ramped cfg 4 65.9 / 0.89, constant cfg 2
        # 59.4 / 0.92, constant cfg 2.5 at t <= 0.7 44.6 / 0.85, constant cfg 3 at t <= 0.7 50.7 / 0.89.
        # At 1,300 steps, constant cfg at t <= 0.7: cfg 3 FID 55.4 / accuracy 0.94 (IS 8.65), 2.5 48.0 / 0.93,
        # 2 41.6 / 0.91 (IS 8.11), 1.75 39.9 / 0.88; cfg 2 at t <= 0.65 41.9 / 0.88, at every t 67.5 / 0.97.
        # This demo (1,500 steps, cfg 2 at t <= 0.7), the README command on the quiet 2-core machine: 4 min 39 s
        # wall (387 s user + 112 s sys CPU), MNIST-FID 38.2, IS 8.36, class accuracy 0.93.
        c.sample.use_ema = False
        c.sample.cfg_scale = DEMO_CFG
        c.sample.cfg_schedule = "constant"
        c.sample.guidance_high = DEMO_GUIDANCE_HIGH
        if latent:
            # The demo KL-VAE (f4, 4 channels) maps 32x32x1 digits to 8x8x4 latents: patch 1 -> an 8x8 grid
            # of 4-channel tokens, 4 cells of 4x4 tokens, width 64, 2+2 blocks, 1,500 steps, EMA samples
            # (the settings of the README's latent-demo measurement).
            c.model.update(input_size=8, patch_size=1, in_channels=4, hidden_size=64, encoder_depth=2,
                           decoder_depth=2, cell_size=4, scales=(1, 2, 4, 8))
            c.num_steps = 1500
            c.optim.lr = 1e-3
            c.model.update(prediction="v", time_logit_mean=0.0)  # the latent demo as measured (v, upstream times)
            c.sample.use_ema = True
            c.sample.cfg_scale = 2.0
            c.sample.cfg_schedule, c.sample.guidance_high = "linear", 1.0
            c.data.latents = DEMO_LATENTS
            common.paired_tokenizer(c, "workdir", DEMO_LATENT_SCALE, workdir=DEMO_TOKENIZER_WORKDIR)
            c.tokenizer.use_ema = False  # the demo KL-VAE's raw params, as its own grids and cache use
    return c

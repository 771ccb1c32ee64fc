"""TokenBridge sizes and the settings shared by configs/tokenbridge_{b,l,h}.py (upstream YuqingWang1029/TokenBridge).

Variants (comma-separated):

* "" (default): ImageNet 256 on cached MAR KL-16 latents (posterior sample x 0.2325), decoded by the same
  KL-16 (``--config.tokenizer.weights=kl16.ckpt``);
* "demo": pixel space on the embedded MNIST digits on a laptop CPU: 32x32x1, patch 4 -> an 8x8 grid of
  16-dimensional tokens (the channel AR runs over the 16 pixels of a patch);
* "demo,latent": the same digits in the latent space of the zoo's demo KL-VAE (configs/kl_vae_f16.py:demo,
  8x8x4 latents, patch 2 -> a 4x4 grid of 16-dimensional tokens), read from its latent cache and decoded by
  it; the pipeline of configs/xar_common.py (train the VAE, cache its latents), then
  ``python -m trainers.main --config=configs/tokenbridge_b.py:demo,latent --workdir=workdirs/tokenbridge_latent``.
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs.xar_common import DEMO_LATENT_SCALE, DEMO_LATENTS, DEMO_TOKENIZER_WORKDIR

# encoder / decoder (width, depth, heads) and channel AR (width, depth, heads): upstream
# tokenbridge_base / tokenbridge_large / tokenbridge_huge.
SIZES = {
    "B": ((768, 12, 12), (768, 12, 12), (768, 4, 8)),
    "L": ((1024, 16, 16), (1024, 16, 16), (1024, 4, 8)),
    "H": ((1280, 20, 16), (1280, 20, 16), (1024, 6, 8)),
}
# README evaluation settings (num_iter, cfg, temperature); B has no released weights or results: L's
# settings (an implementation choice).
SAMPLING = {"B": (256, 3.1, 0.96), "L": (256, 3.1, 0.96), "H": (256, 3.45, 0.91)}
# training epochs: L 400 (README command), H 800 (README evaluation note); B: L's (choice)
EPOCHS = {"B": 400, "L": 400, "H": 800}
CHANNEL_ORDER = (8, 1, 10, 9, 6, 12, 4, 0, 3, 11, 7, 14, 2, 15, 13, 5)  # models/tokenbridge.py CHANNEL_ORDER

IMAGENET_TRAIN_IMAGES = 1_281_167
VARIANTS = ("demo", "latent")


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown TokenBridge config variant {v!r}; use demo and optionally latent")
    if "latent" in variants and "demo" not in variants:
        raise ValueError("TokenBridge config variant 'latent' goes with 'demo' (the embedded digits' latent "
                         "pipeline); ImageNet configs are latent already")
    (enc, enc_depth, enc_heads), (dec, dec_depth, dec_heads), (ch, ch_depth, ch_heads) = SIZES[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="tokenbridge",
        input_size=16, patch_size=1, in_channels=16,  # MAR KL-16 latent of a 256px image: 16x16x16
        encoder_embed_dim=enc, encoder_depth=enc_depth, encoder_num_heads=enc_heads,
        decoder_embed_dim=dec, decoder_depth=dec_depth, decoder_num_heads=dec_heads,
        channel_embed_dim=ch, channel_depth=ch_depth, channel_heads=ch_heads,
        mlp_ratio=4.0, num_classes=1000, buffer_size=64,
        label_drop_prob=0.1, mask_ratio_min=0.7,
        attn_dropout=0.1, proj_dropout=0.1,  # upstream defaults (encoder/decoder and channel blocks)
        # the post-training quantizer: 2^quant_bits levels on [quant_min, quant_max] -> [-std_range, std_range]
        quant_bits=6, quant_min=-5.0, quant_max=5.0, std_range=3.0,
        quant_scheme="gaussian",  # "gaussian" (TokenBridge) | "uniform" (the paper's baseline)
        quant_impl="auto",  # "auto" (Pallas kernel on GPU/TPU, jnp on CPU) | "pallas" | "xla"
        channel_order=CHANNEL_ORDER,  # fixed per-dimension AR order, specific to MAR's KL-16
        attention_impl="auto",  # encoder/decoder attention: cuDNN on GPU (bf16), splash on TPU, else xla
        remat=False,  # recompute every block in the backward pass (TokenBridge-H on 64 devices: benchmarks/pod_plan.py)
    ))
    c.compute_dtype = "bfloat16"  # upstream trains and samples under fp16 autocast; params and norms stay f32
    # ImageNet 256 on cached MAR KL-16 latents: posterior sample x 0.2325 (upstream engine_tokenbridge.py),
    # flips cached (main_cache.py); samples are decoded by the same KL-16.
    common.imagenet256_latents(c, "data_cache/imagenet2012_256_mar_kl16", 0.2325, tokenizer="kl16")
    # Upstream README command / main_tokenbridge.py: batch 64 x 32 GPUs, blr 5e-5 -> lr 5e-5 * 2048 / 256,
    # AdamW (0.9, 0.95), wd 0.02 (not on biases / 1-D), clip 3.0, EMA 0.9999 from step 0; util/lr_sched.py:
    # linear warmup 100 epochs, then half-cosine to min_lr 0 at the last epoch.
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // 2048
    c.batch_size = 2048
    c.num_steps = EPOCHS[size] * steps_per_epoch
    c.optim.lr = 5e-5 * c.batch_size / 256
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.02
    c.optim.grad_clip = 3.0
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100 * steps_per_epoch
    c.optim.min_lr = 0.0
    c.ema_rate = 0.9999
    c.checkpoint_every = 10_000
    c.keep_every = 100_000
    # sample.num_steps = MAR iterations (num_iter); guidance on the decoder features
    c.sample.num_steps, c.sample.cfg_scale, c.sample.temperature = SAMPLING[size]
    c.sample.cfg_schedule = "linear"  # "linear" (upstream, on the next step's masked count) | "constant"
    c.sample.use_cache = True  # KV cache in the 16-step channel AR (same samples as without, faster)
    c.sample_batch_size = 256  # upstream eval_bsz
    if "demo" in variants:
        c.compute_dtype = "float32"  # CPU: float32 is the fast path there
    if "demo" in variants and "latent" not in variants:
        c.model.update(input_size=32, patch_size=4, in_channels=1, num_classes=10,
                       encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                       decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                       channel_embed_dim=64, channel_depth=2, channel_heads=4, buffer_size=16,
                       attn_dropout=0.0, proj_dropout=0.0,
                       # pixels in [-1, 1]: a range whose outermost levels sit at -1 and 1 (implementation choice)
                       quant_min=-1.23, quant_max=1.23,
                       channel_order=tuple(range(16)))  # the 4x4 pixels of a patch, row-major
        common.embedded_demo_data(c, image_size=32)
        _demo_training(c)
    elif "demo" in variants:
        c.model.update(input_size=8, patch_size=2, in_channels=4, num_classes=10,
                       encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                       decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                       channel_embed_dim=64, channel_depth=2, channel_heads=4, buffer_size=16,
                       attn_dropout=0.0, proj_dropout=0.0, channel_order=tuple(range(16)))
        common.embedded_demo_data(c, image_size=32)
        c.data.latents = DEMO_LATENTS  # trainers/cache_latents.py output of the demo KL-VAE
        common.paired_tokenizer(c, "workdir", DEMO_LATENT_SCALE, workdir=DEMO_TOKENIZER_WORKDIR)
        _demo_training(c)
    return c


def _demo_training(c: ml_collections.ConfigDict) -> None:
    c.batch_size = 64
    c.num_steps = 2000
    c.optim.lr = 1e-3
    c.optim.grad_clip = 3.0
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.min_lr = 1e-5
    c.checkpoint_every = 500
    c.sample.num_steps = 16  # MAR iterations over the demo's tokens
    c.sample.cfg_scale = 2.0
    c.sample.temperature = 1.0
    c.sample_batch_size = 64

"""TexTok tokenizers (TexTok-{32,64,128,256} at 256 and 512 px) and the DiT-L/XL generators on their tokens.

Sizes from the paper (``shared/methods/textok_paper.md``): ViT-B tokenizer and ViT-B detokenizer
(width 768, 12 layers, 12 heads: ~176M together), d = 8 channels per token, frozen T5-XL (256 px) /
T5-XXL (512 px) caption embeddings. Implementation choices (the paper does not say; see
tokenizers/textok.py): patch 8 at 256 / 16 at 512, N_t = 128 text tokens, KL head with weight 1e-6,
MAGVIT-v2 loss weights (LPIPS 0.1, GAN 0.1 from step 20K, LeCAM 1e-3), Adam (0, 0.99), lr 1e-4 with
warm-up + cosine, batch 256, EMA 0.999.

Tokenizer variants (``get_config`` argument, comma-separated): ``256`` (default) | ``512`` | ``demo``
(embedded digits at 32 px with measured captions and a random frozen T5, laptop-sized);
``notext`` (the text-free baseline), ``encoder`` / ``decoder`` (text in one half only, the paper's
ablation); ``ae`` (deterministic tokens instead of the KL head); ``gan`` (demo: turn the StyleGAN
discriminator on); ``tK`` (K tokens instead of the file's N, e.g. ``t8``); ``quick`` (demo: the
few-minute measurement size of the text-vs-no-text table: patch 8, width 64, depth 2, batch 32, 600
steps at a constant lr 3e-3 after 20 warm-up steps, log-variance bias -6 at init).

Implementation choices of ``quick`` (none is the paper's; they make a CPU run of minutes leave the
mean image): a ViT pair on the digits first converges to the mean image (MSE ~0.21) and stays there
while its decoder ignores its tokens; at lr 1e-3 with a cosine decay to 1e-4 over 400 steps it never
left (MSE 0.227 at 8, 16 and 32 tokens, with and without text); at a constant 3e-3 it leaves after
~250 steps and reaches MSE ~0.06 by 600 (tokenizers/textok.py, "The plateau").

The text-vs-no-text measurement (README; one job at a time), for K in 8, 16, 32:

    python -m trainers.main --config=configs/textok_32.py:demo,quick,tK --workdir=W/tK
    python -m trainers.main --config=configs/textok_32.py:demo,quick,tK,notext --workdir=W/tK_notext
    python -m tokenizers.textok evaluate --workdir=W/t8,W/t8_notext,W/t16,W/t16_notext,W/t32,W/t32_notext

longer runs: the same trainers.main command with ``--config.num_steps=1800`` (on a copy of a 600-step
workdir it resumes there; the lr is constant, so a resumed run equals a longer one), then evaluate;

and the generator on each 8-token tokenizer (V = t8 or t8_notext; S = 1 / the printed latent std):

    python -m trainers.cache_latents --tokenizer_workdir=W/V --out=W/tokens_V
    python -m trainers.main --config=configs/textok_dit_l.py:demo,t8 --workdir=W/dit_V \
        --config.data.latents=W/tokens_V --config.tokenizer.workdir=W/V --config.tokenizer.scale=S \
        --config.num_steps=600 --config.checkpoint_every=600 --config.eval.every=0 --config.sample_every=0
"""

from __future__ import annotations

import ml_collections

from configs import common

VIT_B = dict(width=768, depth=12, num_heads=12)
DIT_SIZES = {"L": (1024, 24, 16), "XL": (1152, 28, 16)}  # DiT paper Table 1


def text_config(t5_path: str) -> ml_collections.ConfigDict:
    """config.text: the frozen T5 that embeds the captions once (trainers/captions.py)."""
    return ml_collections.ConfigDict(dict(
        t5_path=t5_path,  # Hugging Face T5 folder (config.json, weights, spiece.model); "" = random demo T5
        random_t5=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),  # used when t5_path == ""
        seed=0, max_length=128, dtype="float32"))


def tokenizer_config(num_tokens: int, arg: str | None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    resolution, demo, inject, latent, gan, quick = 256, False, "both", "kl", None, False
    for v in variants:
        if v in ("256", "512"):
            resolution = int(v)
        elif v == "demo":
            demo = True
        elif v in ("notext", "encoder", "decoder"):
            inject = {"notext": "none"}.get(v, v)
        elif v == "ae":
            latent = "ae"
        elif v == "gan":
            gan = True
        elif v == "quick":
            quick = True
        elif v.startswith("t") and v[1:].isdigit():
            num_tokens = int(v[1:])
        else:
            raise ValueError(f"unknown TexTok variant {v!r}; use 256, 512, demo, notext, encoder, decoder, ae, gan, quick, tK")
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="textok", patch_size=8 if resolution == 256 else 16, **VIT_B, mlp_ratio=4.0,
        decoder_width=0, decoder_depth=0, decoder_num_heads=0,  # 0 = as the tokenizer (ViT-B both)
        num_tokens=num_tokens, token_channels=8, latent=latent, text_inject=inject,
        logvar_init=0.0,  # choice: the KL head's log-variance bias at init (0 = unit posterior noise, as LDM)
        text_length=128,  # N_t; must match the caption cache (config.text.max_length when embedded)
        scale_factor=1.0,  # generator space = tokens x scale_factor (set by config.tokenizer.scale of a DiT)
        loss=ml_collections.ConfigDict(dict(
            kl_weight=1e-6, perceptual_weight=0.1, gan_weight=0.1, lecam_weight=1e-3, lecam_decay=0.999,
            disc_start=20_000, discriminator="stylegan", disc_filters=128,
            disc_channel_multipliers=(2, 4, 4, 4, 4, 4) if resolution == 256 else (2, 4, 4, 4, 4, 4, 4),
            disc_downsample="blur", disc_layers=3, disc_loss="hinge", gen_loss="hinge",
            vgg_path="checkpoints/vgg16-397923af.pth", lpips_lin_path=""))))
    c.data.name = "imagenet2012"
    c.data.image_size = resolution
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.captions = f"data_cache/imagenet2012_{resolution}_captions_t5"  # `python -m trainers.captions embed`
    c.text = text_config("checkpoints/t5-v1_1-xl" if resolution == 256 else "checkpoints/t5-v1_1-xxl")
    c.text.dtype = "float16"
    c.sample.caption_pool_size = 16  # captions per class for class-conditional decoding
    c.sample.caption_seed = 0
    c.batch_size = 256
    c.num_steps = 1_000_000
    c.optim.update(lr=1e-4, b1=0.0, b2=0.99, weight_decay=0.0, grad_clip=1.0, schedule="warmup_cosine",
                   warmup_steps=10_000, min_lr=1e-5)
    c.ema_rate = 0.999
    c.checkpoint_every = 20_000
    c.keep_every = 100_000
    # The loop's reconstruction grid and evaluation feed images only; a captioned tokenizer is scored
    # with `python -m tokenizers.textok evaluate --workdir=...` (reconstructions under their captions).
    c.num_grid_samples = 0
    c.eval.num_samples = 0
    if quick and not demo:
        raise ValueError("the TexTok variant 'quick' shrinks the demo: use it with 'demo' (e.g. demo,quick,t8)")
    if demo:
        demo_tokenizer(c, gan)
    if quick:
        # The measurement size (README's text-vs-no-text table): a few minutes per run on a loaded CPU.
        c.model.update(patch_size=8, width=64, depth=2, num_heads=2,
                       logvar_init=-6.0)  # near-deterministic tokens from the first step (short runs)
        c.batch_size = 32
        c.num_steps = 600
        # A constant 3e-3 after a short warm-up: the ViT pair sits at the mean image (MSE ~0.22, the decoder
        # ignoring its tokens) for its first ~200 steps at any lr; 1e-3 decayed by a cosine never leaves it
        # within a few hundred steps (measured: tokenizers/textok.py, "The plateau").
        c.optim.update(lr=3e-3, schedule="warmup_constant", warmup_steps=20)
        c.checkpoint_every = 600
        c.log_every = 50
    return c


def demo_tokenizer(c: ml_collections.ConfigDict, gan: bool | None) -> None:
    """The embedded digits at 32 px, measured captions (trainers/captions.py), a random frozen T5."""
    common.embedded_demo_data(c, image_size=32)
    c.data.captions = "demo"
    c.text = text_config("")
    c.text.max_length = 32
    c.model.update(patch_size=4, width=128, depth=3, num_heads=4, text_length=32)
    lc = c.model.loss
    lc.update(perceptual_weight=0.0,  # no VGG16 weights ship offline
              gan_weight=0.1 if gan else 0.0, disc_start=500, disc_filters=16, disc_channel_multipliers=(1, 2, 2))
    c.batch_size = 64
    c.num_steps = 1500
    c.optim.update(lr=1e-3, b1=0.9, b2=0.99, schedule="warmup_cosine", warmup_steps=100, min_lr=1e-5)
    c.ema_rate = 0.99
    c.checkpoint_every = 500
    c.num_grid_samples = 0
    c.eval.num_samples = 0
    c.sample.caption_pool_size = 32


def dit_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """A DiT on TexTok tokens. ``arg`` (comma-separated): ``tN`` tokens (32, 64, 128, 256; default 256),
    ``256`` | ``512`` px, ``sit`` (SiT's flow objective instead of DiT's diffusion), ``demo`` (on the demo
    tokenizer's token cache)."""
    variants = [a for a in (arg or "").split(",") if a]
    num_tokens, resolution, objective, demo = 256, 256, "ddpm", False
    for v in variants:
        if v in ("256", "512"):
            resolution = int(v)
        elif v.startswith("t") and v[1:].isdigit():
            num_tokens = int(v[1:])
        elif v in ("sit", "ddpm"):
            objective = "flow" if v == "sit" else "ddpm"
        elif v == "demo":
            demo = True
        else:
            raise ValueError(f"unknown TexTok-DiT variant {v!r}; use tN (tokens), 256, 512, sit, ddpm, demo")
    width, depth, heads = DIT_SIZES[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="textok_dit", input_size=num_tokens, patch_size=1, in_channels=8, hidden_size=width, depth=depth,
        num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=objective == "ddpm",
        objective=objective))
    c.diffusion = ml_collections.ConfigDict(dict(noise_schedule="linear", diffusion_steps=1000))
    c.data.name = "imagenet2012"
    c.data.image_size = resolution
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = True
    c.data.latents = f"data_cache/imagenet2012_{resolution}_textok{num_tokens}_tokens"
    # The paired tokenizer (trainers/decode.py): a TexTok workdir; scale = 1 / std of its tokens (choice:
    # unit variance before diffusion; `python -m trainers.cache_latents --tokenizer_workdir=...` prints it).
    c.tokenizer.update(kind="workdir", workdir=f"workdirs/textok{num_tokens}_{resolution}", scale=1.0, use_ema=True)
    # Paper: 350 epochs (ImageNet 1.28M / 256 = 5005 steps per epoch); DiT/SiT defaults otherwise.
    c.batch_size = 256
    c.num_steps = 350 * 5005
    c.optim.update(lr=1e-4, weight_decay=0.0, grad_clip=0.0, schedule="constant")
    c.ema_rate = 0.9999
    c.checkpoint_every = 50_000
    c.sample.method = "ddpm" if objective == "ddpm" else "sde"
    c.sample.num_steps = 250
    c.sample.cfg_scale = 1.5  # the paper's CFG scale is not known: sweep 1.25..2.0
    c.sample.cfg_channels = 0  # guide every token channel
    # Grids and scores (config.num_grid_samples, config.eval) decode with a caption drawn from each sampled
    # label's pool (TexTok's decode(labels=)); FID-50K with `python -m trainers.sample` as for DiT.
    if demo:
        c.model.update(input_size=num_tokens if "t" + str(num_tokens) in variants else 32, hidden_size=128, depth=4, num_heads=4, num_classes=10)
        c.data.name = "mnist_embedded"
        c.data.image_size = 32
        c.data.channels = 1
        c.data.num_classes = 10
        c.data.random_flip = False
        c.data.latents = "data_cache/textok_demo_tokens"
        c.tokenizer.workdir = "workdirs/textok_demo"
        c.batch_size = 64
        c.num_steps = 2000
        c.optim.update(lr=5e-4, schedule="warmup_cosine", warmup_steps=100, min_lr=1e-5)
        c.ema_rate = 0.995
        c.checkpoint_every = 1000
        c.sample.num_steps = 50 if objective == "ddpm" else 30
        c.sample.method = "ddim" if objective == "ddpm" else "euler"
        c.sample.cfg_scale = 2.0
        c.num_grid_samples = 40  # 4 per class, one column per class
        c.sample_every = 1000
        c.eval.every = 1000  # and at the end: MNIST-feature FID, MNIST-classifier IS, class accuracy
        c.eval.num_samples = 500
    return c

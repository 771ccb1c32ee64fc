"""One-D-Piece sizes and the two training stages, shared by configs/one_d_piece_{s,b,l}256.py.

Variants (comma-separated): "stage1" (default) | "stage2" | "released" (the published stage-2
tokenizer for import and evaluation: no training losses' files needed, Tail Token Drop over 1..N-1
as those checkpoints were trained), plus "demo" (the embedded digits on a laptop CPU). Upstream
turingmotors/One-D-Piece configs/training/stage{1,2}/one-d-piece_*256.yaml.

    python -m trainers.convert import one_d_piece model.safetensors --config=configs/one_d_piece_s256.py:released \
        --out=DIR     # huggingface.co/turing-motors/One-D-Piece-S-256

    python -m trainers.main --config=configs/one_d_piece_s256.py:stage1 --workdir=S1 \
        --config.model.vqgan_weights=maskgit-vqgan-imagenet-f16-256.bin
    python -m trainers.main --config=configs/one_d_piece_s256.py:stage2 --workdir=S2 \
        --config.model.init_from=S1 --config.model.vqgan_weights=maskgit-vqgan-imagenet-f16-256.bin \
        --config.model.loss.convnext_path=convnext_small-0c510722.pth
"""

from __future__ import annotations

import ml_collections

from configs import common, maskgit_vqgan

# ViT width, depth, heads (upstream TiTokEncoder/TiTokDecoder size tables), encoder = decoder.
SIZES = {"S": (512, 8, 8), "B": (768, 12, 12), "L": (1024, 24, 16)}
# Global batch per stage (upstream: 8 GPUs x per-GPU batch x gradient accumulation).
BATCH = {1: 1024, 2: 512}


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    unknown = set(variants) - {"stage1", "stage2", "released", "demo"}
    if unknown or len({"stage1", "stage2", "released"} & set(variants)) > 1:
        raise ValueError(f"One-D-Piece config variants: stage1 | stage2 | released, and demo; got {arg!r}")
    released = "released" in variants
    stage = 2 if ("stage2" in variants or released) else 1
    demo = "demo" in variants
    width, depth, heads = SIZES[size]
    c = common.base()
    m = c.model
    m.name = "one_d_piece"
    m.stage = stage
    m.enc_patch_size = 16
    m.dec_patch_size = 16
    m.encoder = ml_collections.ConfigDict(dict(width=width, depth=depth, heads=heads))
    m.decoder = ml_collections.ConfigDict(dict(width=width, depth=depth, heads=heads))
    m.num_latent_tokens = 256
    m.token_size = 12
    m.codebook_size = 4096
    m.use_l2_norm = True
    m.commitment_cost = 0.25
    m.vqgan = ml_collections.ConfigDict(maskgit_vqgan.PUBLISHED)
    # maskgit-vqgan-imagenet-f16-256.bin (huggingface.co/fun-research/TiTok) or a configs/maskgit_vqgan.py workdir
    m.vqgan_weights = ""
    m.init_from = ""  # stage 2: the stage-1 workdir
    m.tail_token_drop = True
    # k ~ U{1..tail_drop_max}; upstream's fix (2025-04-02) gives N; the released checkpoints were trained with N - 1.
    m.tail_drop_max = 256
    m.ema_warmup = True  # diffusers EMAModel decay min((1+s)/(10+s), ema_rate)
    m.loss = ml_collections.ConfigDict(dict(
        quantizer_weight=1.0 if stage == 1 else 0.0,
        reconstruction_weight=1.0,
        perceptual_weight=0.1,
        convnext_path="",  # torchvision convnext_small-0c510722.pth (https://download.pytorch.org/models/)
        discriminator_start=20_000,
        discriminator_factor=1.0,
        discriminator_weight=0.01,
        lecam_weight=0.001,
        lecam_decay=0.999,
        disc_lr=1e-4,
        disc_hidden=128,
        disc_stages=3,
    ))

    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.batch_size = BATCH[stage]
    c.ema_rate = 0.999
    o = c.optim
    o.lr = 1e-4
    o.min_lr = 1e-5
    o.weight_decay = 1e-4
    o.grad_clip = 1.0
    o.schedule = "warmup_cosine"
    if stage == 1:
        c.num_steps = 1_000_000
        o.b1, o.b2 = 0.9, 0.99
        o.warmup_steps = 10_000
    else:
        c.num_steps = 500_000
        o.b1, o.b2 = 0.9, 0.999
        o.warmup_steps = 5_000
    c.sample_every = 5000
    c.checkpoint_every = 5000
    if released:
        m.tail_drop_max = m.num_latent_tokens - 1  # randint(1, N) before upstream's fix of 2025-04-02
        m.loss.perceptual_weight = 0.0  # import/evaluation only: no ConvNeXt file needed

    if demo:
        # Minutes on a laptop CPU: 32x32 digits, 16 latent tokens of 8x8 patches over a 4x4 grid of
        # the demo teacher's codes, a width-64 ViT, the GAN switched on halfway through stage 2.
        common.embedded_demo_data(c, image_size=32)
        m.vqgan = ml_collections.ConfigDict(maskgit_vqgan.DEMO)
        m.enc_patch_size = m.dec_patch_size = 8
        m.encoder = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4))
        m.decoder = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4))
        m.num_latent_tokens = 16
        m.tail_drop_max = 16
        m.codebook_size = 256
        m.loss.perceptual_weight = 0.0  # the ConvNeXt-S weights cannot be downloaded here
        m.loss.discriminator_start = 150
        m.loss.disc_hidden = 32
        m.loss.disc_stages = 2
        m.loss.disc_lr = 2e-4
        c.batch_size = 32
        c.num_steps = 600 if stage == 1 else 300
        o.lr = 1e-3 if stage == 1 else 5e-4
        o.min_lr = 1e-4
        o.warmup_steps = 50
        o.weight_decay = 1e-4
        c.ema_rate = 0.99
        c.checkpoint_every = c.num_steps
        c.sample_every = 0
        c.num_grid_samples = 16
        c.eval.num_samples = 0
    return c

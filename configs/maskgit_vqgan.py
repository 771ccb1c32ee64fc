"""The MaskGIT VQGAN (f16, 1024 x 256 codes): One-D-Piece's / TiTok's proxy-code teacher.

    python -m trainers.convert import maskgit_vqgan maskgit-vqgan-imagenet-f16-256.bin \
        --config=configs/maskgit_vqgan.py --out=DIR          # the published ImageNet weights
    python -m trainers.main --config=configs/maskgit_vqgan.py:demo --workdir=DIR   # a teacher for the digits

Variants: "" (the published architecture, ImageNet 256) and "demo" (a small f8 teacher on the
embedded digits, trained with L2 + VQ loss, for One-D-Piece's demo stage 1; upstream ships no
training code for this network).
"""

from __future__ import annotations

import ml_collections

from configs import common

# Upstream titok.py PretrainedTokenizer: hidden 128, channel_mult (1, 1, 2, 2, 4), 2 res blocks, z 256, 1024 codes.
PUBLISHED = dict(hidden_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                 num_embeddings=1024)
DEMO = dict(hidden_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32, num_embeddings=1024)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or ""
    if variant not in ("", "demo"):
        raise ValueError(f"configs/maskgit_vqgan.py: unknown variant {variant!r}; use '' or 'demo'")
    c = common.base()
    c.model.name = "maskgit_vqgan"
    c.model.vqgan = ml_collections.ConfigDict(PUBLISHED)
    c.model.vq_weight = 1.0  # L2 + vq_weight * (commitment + 0.25 codebook), the demo teacher's objective
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.batch_size = 64
    c.optim.lr = 1e-4
    if variant == "demo":
        common.embedded_demo_data(c, image_size=32)
        c.model.vqgan = ml_collections.ConfigDict(DEMO)
        c.batch_size = 32
        c.num_steps = 500
        c.optim.lr = 1e-3
        c.optim.schedule = "warmup_cosine"
        c.optim.warmup_steps = 50
        c.optim.min_lr = 1e-4
        c.checkpoint_every = 500
        c.sample_every = 0
        c.num_grid_samples = 16
        c.eval.num_samples = 0
    return c

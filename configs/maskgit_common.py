"""MaskGIT (TiTok's ``ImageBert``) on One-D-Piece codes, shared by configs/maskgit_one_d_piece_{s,b,l}256.py.

Upstream turingmotors/One-D-Piece configs/training/generator/maskgit_one-d-piece_*256.yaml: the
same BERT (768 wide, 24 layers, 16 heads) for every tokenizer size; the per-size sampling
settings (guidance scale, randomize temperature) are the configs'. Variant "demo": a tiny BERT on
the codes of the demo tokenizer (configs/one_d_piece_*.py:stage2,demo) over the embedded digits.

    python -m trainers.main --config=configs/maskgit_one_d_piece_s256.py --workdir=DIR \
        --config.tokenizer.workdir=ONE_D_PIECE_WORKDIR [--config.data.latents=CODE_CACHE]
"""

from __future__ import annotations

import ml_collections

from configs import common

# guidance_scale, randomize_temperature (configs/training/generator/maskgit_one-d-piece_{s,b,l}256.yaml)
SAMPLING = {"S": (12.5, 3.0), "B": (8.5, 2.5), "L": (5.5, 3.0)}


def get_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    variant = arg or ""
    if variant not in ("", "demo"):
        raise ValueError(f"MaskGIT config variants: '' or 'demo'; got {arg!r}")
    c = common.base()
    m = c.model
    m.name = "maskgit"
    m.codebook_size = 4096  # the tokenizer's (checked against config.tokenizer's workdir)
    m.seq_len = 256  # the tokenizer's num_latent_tokens
    m.hidden, m.depth, m.heads, m.intermediate = 768, 24, 16, 3072
    m.dropout = 0.1
    m.attn_dropout = 0.1
    m.class_dropout = 0.1
    m.label_smoothing = 0.1
    m.unmasked_weight = 0.1  # loss weight of unmasked positions
    common.paired_tokenizer(c, "workdir", 1.0)  # set --config.tokenizer.workdir

    g, t = SAMPLING[size]
    c.sample.num_steps = 16
    c.sample.cfg_scale = g
    c.sample.guidance_decay = "power-cosine"
    c.sample.guidance_scale_pow = 3.0
    c.sample.randomize_temperature = t
    c.sample.softmax_temperature_annealing = False

    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = True  # centre crop + flip
    c.batch_size = 2048
    c.num_steps = 500_000
    o = c.optim
    o.lr = 2e-4
    o.min_lr = 1e-5
    o.b1, o.b2 = 0.9, 0.96
    o.weight_decay = 0.03
    o.grad_clip = 1.0
    o.schedule = "warmup_cosine"
    o.warmup_steps = 10_000
    c.ema_rate = 0.999
    c.sample_every = 10_000

    if variant == "demo":
        common.embedded_demo_data(c, image_size=32)
        common.paired_tokenizer(c, "workdir", 1.0)
        m.codebook_size, m.seq_len = 256, 16
        m.hidden, m.depth, m.heads, m.intermediate = 64, 2, 4, 256
        c.sample.num_steps = 8
        c.sample.cfg_scale = 2.0
        c.sample.randomize_temperature = 1.0
        c.batch_size = 64
        c.num_steps = 600
        o.lr = 1e-3
        o.min_lr = 1e-4
        o.warmup_steps = 50
        o.weight_decay = 0.0
        c.ema_rate = 0.99
        c.checkpoint_every = 600
        c.sample_every = 0
        c.num_grid_samples = 40
        c.eval.num_samples = 0
    return c

"""LlamaGen's class-conditional GPT (1-D learned positions, as ReTok's scripts use it) over a VQ
tokenizer's cached codes (models/llamagen.py).

Variants (comma-separated): the size "b" (111M), "l" (343M, default), "xl" (775M); "demo" (a tiny GPT
on the embedded digits' cached codes of a configs/retok_ss.py:demo workdir: pass
``--config.data.latents=CACHE --config.tokenizer.workdir=TOKENIZER_WORKDIR``):

    python -m trainers.main --config=configs/retok_ss.py:demo --workdir=TOK
    python -m trainers.cache_latents --tokenizer_workdir=TOK --out=CODES
    python -m trainers.main --config=configs/llamagen_gpt.py:demo --workdir=GPT \\
        --config.data.latents=CODES --config.tokenizer.workdir=TOK

    python -m trainers.main --config=configs/llamagen_gpt.py:xl --workdir=DIR \\
        --config.data.latents=data_cache/imagenet2012_256_retok_sb --config.tokenizer.workdir=RETOK_WORKDIR
"""

from __future__ import annotations

import ml_collections

from configs import common

# n_layer, n_head, dim (upstream gpt_1d.py GPT_B / GPT_L / GPT_XL)
SIZES = {"b": (12, 12, 768), "l": (24, 16, 1024), "xl": (36, 20, 1280)}
IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    size, demo = "l", False
    for v in variants:
        if v in SIZES:
            size = v
        elif v == "demo":
            demo = True
        else:
            raise ValueError(f"unknown LlamaGen GPT config variant {v!r}; use one of {sorted(SIZES)} and/or demo")
    n_layer, n_head, dim = SIZES[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="llamagen_gpt",
        vocab_size=16384,  # ReTok's codebook (16384 x 8)
        block_size=256,  # codes per image
        dim=dim, n_layer=n_layer, n_head=n_head,
        class_dropout_prob=0.1,
        # LlamaGen ModelArgs defaults, which ReTok's train_c2i.py keeps
        token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1,
    ))
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.latents = "data_cache/imagenet2012_256_codes"  # codes cached by trainers.cache_latents
    # The codes are a zoo VQ tokenizer's (ReTok, One-D-Piece, ...): set --config.tokenizer.workdir.
    common.paired_tokenizer(c, "workdir", 1.0)
    # LlamaGen train_c2i.py: AdamW (0.9, 0.95), lr 1e-4, wd 0.05, clip 1.0, batch 256, 300 epochs, constant lr.
    c.batch_size = 256
    c.num_steps = 300 * IMAGENET_TRAIN_IMAGES // c.batch_size
    c.optim.lr = 1e-4
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0
    c.ema_rate = 0.0  # LlamaGen trains without EMA
    c.sample.use_ema = False
    # Sampling: ReTok's README "step" schedule (guidance off for the first 18% of tokens), cfg 1.5.
    c.sample.cfg_scale = 1.5
    c.sample.cfg_interval = -1
    c.sample.cfg_schedule = "step"
    c.sample.cfg_schedule_kwargs = ml_collections.ConfigDict(dict(window_start=0.18))
    c.sample.temperature = 1.0
    c.sample.top_k = 0
    c.sample.top_p = 1.0
    if demo:
        # The codes of a configs/retok_ss.py:demo tokenizer: its first N = 64 codes of 512.
        c.model.update(vocab_size=512, block_size=64, dim=64, n_layer=2, n_head=4,
                       token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
        common.embedded_demo_data(c, image_size=32)
        c.data.latents = "data_cache/mnist_embedded_codes"
        common.paired_tokenizer(c, "workdir", 1.0)
        c.batch_size = 64
        c.num_steps = 1000
        c.optim.lr = 1e-3
        c.optim.schedule = "warmup_cosine"
        c.optim.warmup_steps = 50
        c.sample.cfg_scale = 2.0
        c.sample.cfg_schedule = "constant"
        c.checkpoint_every = 500
    return c

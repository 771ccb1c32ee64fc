"""The class-conditional next-scale generator (models/next_scale.py) on a TokenFlow tokenizer's cached
multi-scale indices. Upstream's t2i recipe (ByteFlow-AI/TokenFlow t2i scripts): lr 5e-4 constant after
5000 warmup steps, wd 0.1, grad clip 0.5, bf16; sampling cfg 7.5, top-k 600, top-p 0.6.

Variants (comma-separated): "" (ImageNet 256 on the configs/tokenflow_clipb.py:256 tokenizer, upstream's t2i
one: clipb with --infer_interpolate, scales 1..14, 16; a Llama-style 24-layer 1024-wide model: a size
choice, the 7B text model is not the target), "demo" (the embedded digits on a
configs/tokenflow_clipb.py:demo tokenizer):

    python -m trainers.convert import tokenflow tokenflow_clipb_32k_enhanced.pt \\
        --config=configs/tokenflow_clipb.py:enhanced,released,256 --out=TOK256
    python -m trainers.cache_latents --tokenizer_workdir=TOK256 --set data.dir=IMAGENET \\
        --out=data_cache/imagenet2012_256_tokenflow
    python -m trainers.main --config=configs/next_scale_tokenflow.py --workdir=GEN256 \\
        --config.tokenizer.workdir=TOK256

    python -m trainers.main --config=configs/tokenflow_clipb.py:demo --workdir=TOK
    python -m trainers.cache_latents --tokenizer_workdir=TOK --out=CODES
    python -m trainers.main --config=configs/next_scale_tokenflow.py:demo --workdir=GEN \\
        --config.data.latents=CODES --config.tokenizer.workdir=TOK
"""

from __future__ import annotations

import ml_collections

from configs import common

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    if set(variants) - {"demo"}:
        raise ValueError(f"next-scale config variants: demo; got {arg!r}")
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name="next_scale",
        scales=(1, 2, 4, 6, 8, 10, 12, 14, 16),  # configs/tokenflow_clipb.py:256 (infer_interpolate, t2i)
        codebook_size=32768, code_dim=40,
        code_table="tokenizer",  # "tokenizer" (the paired TokenFlow's frozen codes, upstream) | "learned"
        dim=1024, n_layer=24, n_head=16,
        class_dropout_prob=0.1,
    ))
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.latents = "data_cache/imagenet2012_256_tokenflow"
    common.paired_tokenizer(c, "workdir", 1.0)
    c.batch_size = 256
    c.num_steps = 10 * IMAGENET_TRAIN_IMAGES // c.batch_size
    o = c.optim
    o.lr, o.b1, o.b2, o.weight_decay, o.grad_clip = 5e-4, 0.9, 0.95, 0.1, 0.5
    o.schedule, o.warmup_steps = "warmup_constant", 5000
    c.ema_rate = 0.0
    c.sample.use_ema = False
    c.sample.cfg_scale = 7.5
    c.sample.top_k = 600
    c.sample.top_p = 0.6
    c.sample.temperature = 1.0
    if "demo" in variants:
        common.embedded_demo_data(c, image_size=32)
        c.model.update(scales=(1, 2, 3, 4), codebook_size=512, dim=64, n_layer=2, n_head=4)
        c.data.latents = "data_cache/mnist_embedded_tokenflow"
        common.paired_tokenizer(c, "workdir", 1.0)
        c.batch_size, c.num_steps = 64, 1000
        o.lr, o.schedule, o.warmup_steps = 1e-3, "warmup_cosine", 50
        c.sample.cfg_scale, c.sample.top_k, c.sample.top_p = 2.0, 0, 1.0
        c.checkpoint_every = 500
    return c

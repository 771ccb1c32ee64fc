"""LiT and DyDi-LiT sizes and settings shared by configs/lit_{s,b,l,xl}.py and configs/dydi_lit_{s,b,l,xl}.py.

Both are DiT (configs/dit_common.py: widths/depths of DiT's Table 1, patch 2, SD-VAE latents, DiT's
Gaussian diffusion and optimiser) with the attention swapped and fewer heads.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import dit_common

# Heads: LiT uses fewer than DiT (LiT ablation: S/2 2 heads best, XL/2 4 heads); B/L are the method
# note's choice (shared/methods/dydi_lit_paper.md section 3), not a published number.
HEADS = {"S": 2, "B": 3, "L": 4, "XL": 4}


def get_config(size: str, attention: str, arg: str | None) -> ml_collections.ConfigDict:
    """``attention``: "lit" | "dydila". ``arg``: "256" (default) | "512"; "nodistill" (no DiT teacher: train
    from scratch or from inherited weights only); "demo" (pixel MNIST, no teacher); combined with commas.
    Distillation (the default at 256/512) needs a workdir made by `convert import lit|dydi_lit DiT.pt`."""
    variants = [a for a in (arg or "").split(",") if a]
    distill = "nodistill" not in variants and "demo" not in variants
    passed = [v for v in variants if v != "nodistill"]
    for v in passed:
        if v not in ("256", "512", "demo", "p2"):
            raise ValueError(f"unknown LiT config variant {v!r}; use 256, 512, nodistill and/or demo")
    c = dit_common.get_config(size, ",".join(passed + ["ddpm"]))
    dit_heads = c.model.num_heads
    c.model.name = "lit" if attention == "lit" else "dydi_lit"
    c.model.attention = attention  # "lit" | "dydila"
    c.model.attention_impl = "auto"  # linear-attention kernel: "auto" (Pallas on GPU/TPU) | "pallas" | "xla"
    c.model.num_heads = 2 if "demo" in variants else HEADS[size]
    if attention == "dydila":
        from models.lit import DyDiLAConfig

        c.model.dydila = ml_collections.ConfigDict(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(DyDiLAConfig()).items()})
    # LiT's hybrid distillation from a DiT teacher of the same width/depth with DiT's heads.
    c.distill = ml_collections.ConfigDict(dict(enabled=distill, teacher_num_heads=dit_heads, noise_weight=0.5,
                                               variance_weight=0.05, vlb=True))
    return c

"""Stable Diffusion's VAE (LDM AutoencoderKL f8, 4 channels), for importing the published weights.

    python -m trainers.convert import sd_vae diffusion_pytorch_model.safetensors --out=DIR --config=configs/sd_vae.py

Same network family and training objective as configs/kl_vae_f16.py; sizes
from LDM ``models/first_stage_models/kl-f8/config.yaml`` (ch 128, ch_mult
(1, 2, 4, 4), no attention outside the mid blocks), latents scaled by 0.18215. DiT-family
configs decode with it without an import: ``config.tokenizer.kind = "sd_vae"`` and
``config.tokenizer.weights`` = the published file (trainers/decode.py reads it directly).
"""

from __future__ import annotations

import ml_collections

from configs import kl_vae_f16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/sd_vae.py has no variants, got {arg!r}")
    c = kl_vae_f16.get_config()
    m = c.model
    m.embed_dim = 4
    m.ch = 128
    m.ch_mult = (1, 2, 4, 4)
    m.num_res_blocks = 2
    m.enc_attn_resolutions = ()
    m.dec_attn_resolutions = ()
    m.resolution = 256
    m.scale_factor = 0.18215
    return c

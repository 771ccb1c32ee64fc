"""DiT-XL (patch size 1) on TexTok tokens (variants: configs/textok_common.py dit_config)."""

from configs import textok_common


def get_config(arg=None):
    return textok_common.dit_config("XL", arg)

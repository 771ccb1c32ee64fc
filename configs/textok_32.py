"""TexTok-32: 32 continuous tokens of 8 channels (variants: configs/textok_common.py)."""

from configs import textok_common


def get_config(arg=None):
    return textok_common.tokenizer_config(32, arg)

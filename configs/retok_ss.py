"""ReTok-S-S (136M): small ViT encoder and decoder (configs/retok_common.py; upstream VQ_SS256.yaml)."""

from configs import retok_common


def get_config(arg=None):
    return retok_common.get_config("S", "S", arg)

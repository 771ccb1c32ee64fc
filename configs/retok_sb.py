"""ReTok-S-B (232M): small ViT encoder, base ViT decoder (configs/retok_common.py; upstream VQ_SB256.yaml;
released as VQ_SB256_e250.pt)."""

from configs import retok_common


def get_config(arg=None):
    return retok_common.get_config("S", "B", arg)

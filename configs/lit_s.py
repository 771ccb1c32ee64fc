"""LiT-S/2 (ReLU linear attention + 5x5 DWC on V, fewer heads) on DiT's diffusion. Variants: 256 | 512, nodistill, demo."""

from configs import lit_common


def get_config(arg=None):
    return lit_common.get_config("S", "lit", arg)

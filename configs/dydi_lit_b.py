"""DyDi-LiT-B/2 (LiT with Dynamic Differential Linear Attention). Variants: 256 | 512, nodistill, demo."""

from configs import lit_common


def get_config(arg=None):
    return lit_common.get_config("B", "dydila", arg)

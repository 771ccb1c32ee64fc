"""DiT-L with flow matching (SiT objective). Variants: p2 | p4 | p8 (patch size), demo."""

from configs import dit_common


def get_config(arg=None):
    return dit_common.get_config("L", arg)

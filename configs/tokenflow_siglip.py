"""TokenFlow with the siglip_384 teacher (configs/tokenflow_common.py)."""

from configs import tokenflow_common


def get_config(arg=None):
    return tokenflow_common.get_config("siglip_384", arg)

"""TokenFlow with the clipb_224 teacher (configs/tokenflow_common.py)."""

from configs import tokenflow_common


def get_config(arg=None):
    return tokenflow_common.get_config("clipb_224", arg)

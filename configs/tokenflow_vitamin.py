"""TokenFlow with the vitamin_xlarge_256 teacher (configs/tokenflow_common.py)."""

from configs import tokenflow_common


def get_config(arg=None):
    return tokenflow_common.get_config("vitamin_xlarge_256", arg)

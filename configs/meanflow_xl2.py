"""MeanFlow-XL/2 (JVP objective). Variants: demo."""

from configs import meanflow_common


def get_config(arg=None):
    return meanflow_common.get_config("XL/2", arg, "meanflow")

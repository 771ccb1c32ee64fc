"""MeanFlow-B/4 (JVP objective). Variants: demo."""

from configs import meanflow_common


def get_config(arg=None):
    return meanflow_common.get_config("B/4", arg, "meanflow")

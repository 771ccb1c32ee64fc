"""SplitMeanFlow-XL/2 (interval-splitting objective) on MeanFlow's recipe. Variants: demo, two_stage."""

from configs import meanflow_common


def get_config(arg=None):
    return meanflow_common.get_config("XL/2", arg, "splitmeanflow")

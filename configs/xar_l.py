"""xAR-L (upstream xar_large). Variants: demo, and the entity X (cell, token, subsample, scale, image).

    python -m trainers.main --config=configs/xar_l.py --workdir=DIR
"""

from configs import xar_common


def get_config(arg=None):
    return xar_common.get_config("L", arg)

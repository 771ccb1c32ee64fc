"""xAR-H (upstream xar_huge). Variants: demo, and the entity X (cell, token, subsample, scale, image).

    python -m trainers.main --config=configs/xar_h.py --workdir=DIR
"""

from configs import xar_common


def get_config(arg=None):
    return xar_common.get_config("H", arg)

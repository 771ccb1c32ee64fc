"""xAR-B (upstream xar_base). Variants: demo, and the entity X (cell, token, subsample, scale, image).

    python -m trainers.main --config=configs/xar_b.py --workdir=DIR
"""

from configs import xar_common


def get_config(arg=None):
    return xar_common.get_config("B", arg)

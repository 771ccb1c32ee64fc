"""TokenBridge-H (upstream tokenbridge_huge). Variants: demo, demo,latent (configs/tokenbridge_common.py).

    python -m trainers.main --config=configs/tokenbridge_h.py --workdir=DIR --config.tokenizer.weights=kl16.ckpt
"""

from configs import tokenbridge_common


def get_config(arg=None):
    return tokenbridge_common.get_config("H", arg)

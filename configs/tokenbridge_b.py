"""TokenBridge-B (upstream tokenbridge_base). Variants: demo, demo,latent (configs/tokenbridge_common.py).

    python -m trainers.main --config=configs/tokenbridge_b.py --workdir=DIR --config.tokenizer.weights=kl16.ckpt
"""

from configs import tokenbridge_common


def get_config(arg=None):
    return tokenbridge_common.get_config("B", arg)

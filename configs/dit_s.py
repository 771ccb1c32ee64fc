"""DiT-S with flow matching (SiT objective). Variants: p2 | p4 | p8 (patch size), demo."""

from configs import dit_common


# The demo's EMA: the loop's EMA starts at the init with no warm-up, so the shared demo rate 0.995 (horizon
# 200 steps) still lags the weights at the end of a 1,200-step run; 0.99 (horizon 100) has caught up.
DEMO_EMA_RATE = 0.99


def get_config(arg=None):
    c = dit_common.get_config("S", arg)
    if "demo" in (arg or "").split(","):
        c.ema_rate = DEMO_EMA_RATE
    return c

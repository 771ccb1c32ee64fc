"""MeanFlow / SplitMeanFlow sizes and the ImageNet recipe shared by configs/{meanflow,splitmeanflow}_*.py.

Recipe of MeanFlow's official code (Gsunshine/meanflow ``configs/default.py``, ``run_b4.yml``) and
paper Table 4: ImageNet 256 on SD-VAE ft-MSE latents (32x32x4) x 0.18215 with a new posterior sample
each step (the latent cache stores the posterior moments, trainers/cache_latents.py), batch 256,
Adam (0.9, 0.95), lr 1e-4 constant, no weight decay, no clipping, EMA 0.9999, 240 epochs,
logit-normal(-0.4, 1.0) times, label drop 0.1, adaptive weight p = 1, c = 0.01, CFG folded into the
target with the per-size (omega, kappa, interval) of Table 4; 1-step sampling.
"""

from __future__ import annotations

import ml_collections

from configs import common

# name -> (width, depth, heads, patch); MeanFlow Table 2 parameter counts 131M / 131M / 308M / 459M / 676M.
SIZES = {"B/4": (768, 12, 12, 4), "B/2": (768, 12, 12, 2), "M/2": (1024, 16, 16, 2), "L/2": (1024, 24, 16, 2),
         "XL/2": (1152, 28, 16, 2)}
PAPER_PARAMS_M = {"B/4": 131.0, "B/2": 131.0, "M/2": 308.0, "L/2": 459.0, "XL/2": 676.0}
# Table 4 (omega, kappa, t_start, t_end); B/4 as the official default.py (omega' = 2.0).
CFG = {"B/4": (1.0, 0.5, 0.0, 1.0), "B/2": (1.0, 0.5, 0.0, 1.0), "M/2": (1.0, 0.5, 0.0, 1.0),
       "L/2": (0.2, 0.92, 0.0, 0.8), "XL/2": (0.2, 0.92, 0.0, 0.75)}
IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 240


def get_config(size: str, arg: str | None, method: str = "meanflow") -> ml_collections.ConfigDict:
    """``arg`` (comma-separated): "demo" (pixel-space embedded MNIST on a laptop CPU);
    SplitMeanFlow also takes "two_stage" (boundary target from a frozen flow-matching teacher,
    the student initialised from it: ``python -m trainers.convert import splitmeanflow_sit``)."""
    variants = [a for a in (arg or "").split(",") if a]
    allowed = {"demo"} | ({"two_stage"} if method == "splitmeanflow" else set())
    for v in variants:
        if v not in allowed:
            raise ValueError(f"unknown {method} config variant {v!r}; use {sorted(allowed)}")
    width, depth, heads, patch = SIZES[size]
    omega, kappa, t_start, t_end = CFG[size]
    c = common.base()
    c.model = ml_collections.ConfigDict(dict(
        name=method, input_size=32, patch_size=patch, in_channels=4, hidden_size=width, depth=depth,
        num_heads=heads, mlp_ratio=4.0, num_classes=1000, remat=False,
        time_dist="logit_normal", P_mean=-0.4, P_std=1.0,
        guidance="cfg", omega=omega, kappa=kappa, t_start=t_start, t_end=t_end, class_dropout_prob=0.1,
        norm_p=1.0, norm_eps=0.01))
    if method == "meanflow":
        c.model.data_proportion = 0.75  # share of rows with r = t (25 % r != t, MeanFlow Table 1a)
    else:
        # SplitMeanFlow: share of flow-matching boundary rows (r = t). The paper's value is not public;
        # its ablation shows collapse at low values (implementation choice 0.5; MeanFlow's is 0.75).
        c.model.flow_ratio = 0.5
        c.model.boundary_target = "teacher" if "two_stage" in variants else "self"
        c.model.teacher_cfg_scale = omega / (1.0 - kappa)  # teacher CFG = MeanFlow's effective scale
        # Plain squared error (the paper's Algorithm 1), not MeanFlow's adaptive weight (norm_p = 1):
        # at init the split rows' self-referential targets give error ~0, so 1/(err + c) up-weights them
        # ~100x and holds the network at the trivial u = 0 solution (measured on the digits: split error
        # 1e-5, boundary error flat for 100 steps). norm_p = 1 stays selectable (implementation choice).
        c.model.norm_p = 0.0
    common.imagenet256_latents(c, "data_cache/imagenet2012_256_sd_vae", 0.18215)
    c.batch_size = 256
    c.num_steps = EPOCHS * IMAGENET_TRAIN_IMAGES // 256
    c.optim.lr = 1e-4
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0
    c.optim.schedule = "constant"
    c.ema_rate = 0.9999
    c.seed = 42
    c.checkpoint_every = 50_000
    c.keep_every = 100_000
    c.sample.num_steps = 1  # 1-NFE; no CFG at sampling (folded into training)
    c.sample.cfg_scale = 1.0
    if "demo" in variants:
        # Pixel space on the embedded MNIST digits, the same network and budget as configs/dit_*.py:demo.
        c.model.update(input_size=32, patch_size=4, in_channels=1, num_classes=10, hidden_size=min(width, 96),
                       depth=4, num_heads=4, omega=1.0, kappa=0.5, t_start=0.0, t_end=1.0)
        if method == "splitmeanflow":
            c.model.teacher_cfg_scale = 2.0
        common.embedded_demo_data(c, image_size=32)
        c.sample.num_steps = 1
        c.sample.cfg_scale = 1.0
        common.short_demo_run(c)
    return c

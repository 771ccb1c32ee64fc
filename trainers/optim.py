"""Learning-rate schedules and the AdamW optimizer every one-optimizer method trains with."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "warmup_constant", "cosine", "warmup_cosine", "warmup_constant_cosine")


def make_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Peak ``lr`` with optional linear warmup; cosine decays to ``min_lr`` at ``num_steps``.

    ``warmup_constant_cosine`` is xAR's (upstream main.py adjust_learning_rate):
    linear warmup, constant at the peak for ``constant_steps``, then a half-cosine
    to ``min_lr`` at the end of training.
    """
    o = optim_config
    name = o.schedule
    if name not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={name!r}: must be one of {SCHEDULES}")
    warmup = int(o.warmup_steps) if name.startswith("warmup") else 0
    pieces, boundaries = [], []
    if warmup:
        pieces.append(optax.linear_schedule(0.0, o.lr, warmup))
        boundaries.append(warmup)
    if name in ("constant", "warmup_constant"):
        pieces.append(optax.constant_schedule(o.lr))
    elif name in ("cosine", "warmup_cosine"):
        pieces.append(optax.cosine_decay_schedule(o.lr, max(1, num_steps - warmup), alpha=o.min_lr / o.lr))
    else:
        constant = int(o.constant_steps)
        pieces.append(optax.constant_schedule(o.lr))
        boundaries.append(warmup + constant)
        pieces.append(optax.cosine_decay_schedule(o.lr, max(1, num_steps - warmup - constant),
                                                  alpha=o.min_lr / o.lr))
    return pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)


def decay_mask(params):
    """Weight decay on matrices and kernels only: no decay on biases, norms or any 1-D parameter
    (timm's param_groups_weight_decay, used by DiT, MAR and xAR)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = config.optim
    schedule = make_schedule(o, config.num_steps)
    chain = []
    if o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain), schedule

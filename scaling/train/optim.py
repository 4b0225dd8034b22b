"""Optimizers and learning-rate schedules, built from the `train` config section.

Schedules are given in epochs in the config and converted to steps here:
  cosine       linear warmup then cosine decay to `lr * end_factor`
  step         lr x `decay_factor` at each of `decay_epochs` (WRN: x0.2 at 60/120/160)
  exponential  lr x `decay_factor` every `decay_every_epochs` (EfficientNet: 0.97 every 2.4)
  constant     warmup then constant
Weight decay skips norm scales and biases (every parameter with fewer than 2 dimensions).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

OPTIMIZERS = ("sgd", "rmsprop", "adamw", "adam")
SCHEDULES = ("cosine", "step", "exponential", "constant")


def decay_mask(params: Any) -> Any:
    """True for the weights that get weight decay: kernels and embeddings, not scales/biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(cfg: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    lr = cfg.lr
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=cfg.end_factor)
    elif cfg.schedule == "step":
        boundaries = {int(round(e * steps_per_epoch)) - warmup: cfg.decay_factor
                      for e in cfg.decay_epochs}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif cfg.schedule == "exponential":
        main = optax.exponential_decay(lr, max(int(round(cfg.decay_every_epochs * steps_per_epoch)), 1),
                                       cfg.decay_factor, staircase=True)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"train.schedule: unknown {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}.")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD (momentum / Nesterov, coupled L2 decay as torch), RMSProp (TF/EfficientNet style),
    Adam, AdamW (decoupled decay). Optional global-norm clipping first."""
    wd = cfg.weight_decay
    name = cfg.optimizer
    parts: list[optax.GradientTransformation] = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if name in ("sgd", "rmsprop", "adam") and wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    if name == "sgd":
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif name == "rmsprop":
        # TF RMSProp as in EfficientNet: decay 0.9, momentum 0.9, eps 1e-3 inside the sqrt.
        parts.append(optax.rmsprop(schedule, decay=cfg.rmsprop_decay, eps=cfg.eps,
                                   momentum=cfg.momentum, eps_in_sqrt=True, initial_scale=1.0))
    elif name == "adam":
        parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd,
                                 mask=decay_mask))
    else:
        raise ValueError(f"train.optimizer: unknown {name!r}; use one of {', '.join(OPTIMIZERS)}.")
    return optax.chain(*parts)


def build(cfg: Any, steps_per_epoch: int, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    schedule = make_schedule(cfg, steps_per_epoch, total_steps)
    return make_optimizer(cfg, schedule), schedule

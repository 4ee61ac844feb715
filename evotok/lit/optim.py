"""The shared optimiser section (``optim.*``): named parameter groups with their own learning rates, and
learning-rate schedules that are functions of the step alone.

Every stage builds its optimiser from :func:`lr_groups` (``optim.group_lr.<name>`` overrides ``optim.lr`` for
the group ``name``; a name the stage does not define is an error naming the key) and its schedule from
:func:`lr_multiplier` (via :func:`step_scheduler` for automatic optimisation, :func:`apply_lr` for the
tokenizer's manual loop). Nothing here reads the clock, so two runs of one config follow the same schedule on
any machine, and every DDP rank uses the same learning rate.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from evotok.config import ConfigError, OptimConfig


def lr_multiplier(step: int, total: int, o: OptimConfig) -> float:
    """The factor on each group's learning rate after ``step`` optimiser steps of a ``total``-step run:
    linear warm-up over ``o.warmup_steps`` (from 1/warmup), then ``o.schedule``:

    - ``constant``: 1;
    - ``cosine``: from 1 at the end of the warm-up to ``o.min_lr_ratio`` at ``total``;
    - ``linear``: 1, then linearly to 0 over the last ``o.cooldown`` fraction of ``total``.
    """
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    if o.schedule == "constant" or total <= 0:
        return warm
    if o.schedule == "cosine":
        if step < o.warmup_steps:
            return warm
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "linear":
        return warm * min(1.0, max(0.0, total - step) / (o.cooldown * total))
    raise ConfigError(f"config key 'optim.schedule' = {o.schedule!r} is not one of constant, cosine, linear")


def lr_groups(
    named: Mapping[str, Sequence[torch.nn.Parameter]], o: OptimConfig, stage: str, **extra: Any,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per name (trainable parameters only; empty groups dropped), each with
    ``lr`` = ``o.group_lr[name]`` if set, else ``o.lr``, and its ``name``."""
    unknown = sorted(set(o.group_lr) - set(named))
    if unknown:
        raise ConfigError(
            f"config key 'optim.group_lr.{unknown[0]}' names no parameter group of stage '{stage}' "
            f"(its groups: {', '.join(named)})"
        )
    groups = []
    for name, params in named.items():
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": float(o.group_lr.get(name, o.lr)), "name": name, **extra})
    return groups


def step_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, total: int) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` dict: :func:`lr_multiplier` applied after every optimiser step."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total, o))
    return {"scheduler": sched, "interval": "step", "frequency": 1}


def apply_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's ``lr`` to its base rate (``initial_lr``, recorded on first use) times ``factor``."""
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * factor

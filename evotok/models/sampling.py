"""Sampling as small pure functions (LlamaGen's generate.py style): filtering, sampling, CFG, per-depth values.

Conventions: ``top_k = 0`` and ``top_p = 1`` disable their filter; temperature is applied before the
filters (so top-p sees the tempered distribution), temperature 0 is greedy; CFG logits are computed from a
batch of [conditional; unconditional] rows as ``uncond + scale * (cond - uncond)``. Ties are broken towards
the lower code id everywhere (a stable sort; ``argmax`` returns the first maximum).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from evotok.errors import UserError

TOP_P_TOLERANCE = 1e-6
"""A set of tokens "reaches" top_p when its probability is >= top_p - TOP_P_TOLERANCE, so that float
rounding of a softmax (0.5 + 0.3 summing to 0.79999995) does not add a token."""


class SamplingError(UserError, ValueError):
    """A bad sampling argument; the message names it."""


def check_top_k(top_k: int, name: str = "top_k") -> int:
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
        raise SamplingError(f"{name} must be an integer >= 0 (0 disables it), got {top_k!r}")
    return int(top_k)


def check_top_p(top_p: float, name: str = "top_p") -> float:
    if not 0.0 < top_p <= 1.0:
        raise SamplingError(f"{name} must be in (0, 1] (1 disables it), got {top_p!r}")
    return float(top_p)


def check_temperature(temperature: float) -> float:
    if not temperature >= 0.0:  # also rejects NaN
        raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    return float(temperature)


def check_cfg_scale(scale: float) -> float:
    if not scale >= 0.0:
        raise SamplingError(f"cfg_scale must be >= 0 (1 is plain conditional sampling), got {scale!r}")
    return float(scale)


def per_depth(value: Union[float, Sequence[float]], depth: int, name: str) -> list:
    """One value per depth: a scalar is repeated, a sequence must have exactly ``depth`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise SamplingError(
                f"{name} has {len(value)} values but there are {depth} code depths: give one value or {depth}"
            )
        return list(value)
    return [value] * depth


def top_k_top_p_filter(logits_NK: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top_k largest and outside the smallest set (in order of
    decreasing probability, after top-k) whose probability reaches top_p. At least one token per row
    survives; ties go to the lower id."""
    top_k, top_p = check_top_k(top_k), check_top_p(top_p)
    K = logits_NK.shape[-1]
    if (top_k == 0 or top_k >= K) and top_p >= 1.0:
        return logits_NK
    sorted_NK, order_NK = torch.sort(logits_NK, dim=-1, descending=True, stable=True)
    keep_NK = torch.ones_like(sorted_NK, dtype=torch.bool)
    if 0 < top_k < K:
        keep_NK[..., top_k:] = False
    if top_p < 1.0:
        probs_NK = torch.softmax(sorted_NK.float().masked_fill(~keep_NK, float("-inf")), dim=-1)
        before_NK = probs_NK.cumsum(dim=-1) - probs_NK  # probability of the tokens ranked above
        keep_NK &= before_NK < top_p - TOP_P_TOLERANCE
        keep_NK[..., 0] = True
    keep_in_place = torch.empty_like(keep_NK).scatter_(-1, order_NK, keep_NK)
    return logits_NK.masked_fill(~keep_in_place, float("-inf"))


def sample(
    logits_NK: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """ids (N,): greedy (the first maximum) at temperature 0, else a draw from the tempered, filtered
    softmax with ``generator``."""
    temperature = check_temperature(temperature)
    check_top_k(top_k), check_top_p(top_p)
    if temperature == 0.0:
        return logits_NK.argmax(dim=-1)
    # shifting by the row maximum keeps tiny temperatures finite (the maximum maps to 0, never inf - inf)
    logits = logits_NK.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs_NK = torch.softmax(top_k_top_p_filter(logits, top_k, top_p), dim=-1)
    return torch.multinomial(probs_NK, 1, generator=generator).squeeze(-1)


def cfg_logits(logits_2NK: Tensor, scale: float) -> Tensor:
    """[cond; uncond] rows -> ``uncond + scale * (cond - uncond)`` (N, K); scale 1 returns cond exactly."""
    scale = check_cfg_scale(scale)
    if logits_2NK.shape[0] % 2:
        raise ValueError(f"cfg_logits needs [cond; uncond] rows, got an odd batch of {logits_2NK.shape[0]}")
    cond, uncond = logits_2NK.chunk(2, dim=0)
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)

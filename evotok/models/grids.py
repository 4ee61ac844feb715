"""Token-grid geometry shared by the model and the evaluation (torch only, no evaluation imports)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def resize_token_grid(tokens_BTC: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """Area-resize a token grid (B, gh*gw, C) laid out row-major on ``src_grid`` = (gh, gw) to
    (B, h*w, C) on ``dst_grid`` = (h, w); the input itself when the grids agree.

    ``F.adaptive_avg_pool2d`` semantics: each output token is the average of the input tokens its cell
    covers, i.e. an area average when shrinking and a replication when growing (by an integer factor;
    other ratios average the overlapping cells). Raises ``ValueError`` when T != gh * gw."""
    src, dst = tuple(int(g) for g in src_grid), tuple(int(g) for g in dst_grid)
    if src == dst:
        return tokens_BTC
    B, T, C = tokens_BTC.shape
    if T != src[0] * src[1]:
        raise ValueError(f"{T} tokens do not fill the source grid {src[0]}x{src[1]} (src_grid={src})")
    x_BCgg = tokens_BTC.transpose(1, 2).reshape(B, C, src[0], src[1])
    return F.adaptive_avg_pool2d(x_BCgg, dst).flatten(2).transpose(1, 2)

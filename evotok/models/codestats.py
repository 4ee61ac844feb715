"""Codebook statistics: per-depth code histograms, usage and perplexity (torch only).

The one implementation behind the quantizer's per-batch ``usage_L`` / ``perplexity_L``, the
evaluation's ``CodeHistogram`` and the tokenizer's validation-end numbers. Counts are (L, K): row l
is the histogram of the K codes at depth l. Everything stays on the counts' device and dtype.

- usage of a row: the fraction of the K codes counted at least once (0 for an all-zero row);
- perplexity of a row: exp(entropy) of its normalised histogram, K for uniform use, 1 for a single
  code, and NaN for an all-zero row (no codes seen: the distribution is undefined).
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_counts(codes_NL: Tensor, depth: int, K: int) -> Tensor:
    """(L, K) float64 histogram of integer codes ``codes_NL`` (N, L) or any (..., L) layout, on their
    device. Raises ``ValueError`` for codes outside [0, K)."""
    codes = codes_NL.reshape(-1, depth).long()
    if codes.numel() and bool(((codes < 0) | (codes >= K)).any()):
        raise ValueError(f"codes outside [0, {K}) (codebook_size={K})")
    offsets_L = torch.arange(depth, device=codes.device) * K
    return torch.bincount((codes + offsets_L).flatten(), minlength=depth * K).view(depth, K).double()


def _floating(counts_LK: Tensor) -> Tensor:
    return counts_LK if counts_LK.is_floating_point() else counts_LK.double()


def usage_from_counts(counts_LK: Tensor) -> Tensor:
    """(L,): per depth, the fraction of the K codes used at least once."""
    c = _floating(counts_LK)
    return (c > 0).to(c.dtype).mean(dim=1)


def perplexity_from_counts(counts_LK: Tensor) -> Tensor:
    """(L,): per depth, exp(entropy) of the code distribution; NaN where the row is all zero."""
    c = _floating(counts_LK)
    total_L1 = c.sum(dim=1, keepdim=True)
    p_LK = c / total_L1.clamp_min(torch.finfo(c.dtype).tiny)
    perplexity_L = torch.exp(-torch.xlogy(p_LK, p_LK).sum(dim=1))  # xlogy(0, 0) = 0: unused codes add nothing
    return torch.where(total_L1[:, 0] > 0, perplexity_L, torch.full_like(perplexity_L, float("nan")))


def usage_perplexity(counts_LK: Tensor) -> tuple[Tensor, Tensor]:
    """``(usage_L, perplexity_L)`` of (L, K) counts (e.g. a validation epoch's summed histogram; a flat
    (L*K,) vector must be viewed as (L, K) first)."""
    return usage_from_counts(counts_LK), perplexity_from_counts(counts_LK)

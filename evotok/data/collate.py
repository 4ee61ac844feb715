"""Batch collation shared by every stage."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """List of item dicts -> batch dict: ``image`` stacked to (B, 3, H, W); ``labels`` to a dict of
    LongTensor (B,); ``index`` to LongTensor (B,); any other value kept as a Python list."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "image":
            out[key] = torch.stack(values)
        elif key == "labels":
            out[key] = {k: torch.tensor([v[k] for v in values], dtype=torch.long) for k in values[0]}
        elif key == "index":
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = list(values)
    return out

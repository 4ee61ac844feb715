"""A reconstruction grid from a trained tokenizer: each row an image, then its reconstruction from
depths 1, 2, 4, ..., L (the same depths the training module logs to TensorBoard)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


@torch.no_grad()
def save_recon_grid(
    run_or_ckpt: str | Path, out_png: str | Path, n: int = 8, split: str = "val", data_overrides: Sequence[str] = (),
    upscale: int = 4,
) -> Path:
    from torchvision.utils import make_grid, save_image

    from evotok.api import load_tokenizer
    from evotok.data import build_dataset
    from evotok.config import with_overrides
    from evotok.lit.tokenizer_module import log_depths

    model = load_tokenizer(run_or_ckpt)
    cfg = with_overrides(model.config, data_overrides)
    ds = build_dataset(cfg.data, split)
    images = torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])
    z_cum = model.cumulative(images)
    depths = log_depths(model.depth)
    cols = [images] + [model.decode_pixels(z_cum[l - 1], l).clamp(0, 1) for l in depths]
    tiles = torch.stack(cols, 1).flatten(0, 1)
    tiles = torch.nn.functional.interpolate(tiles, scale_factor=upscale, mode="nearest")
    grid = make_grid(tiles, nrow=len(cols), padding=2, pad_value=1.0)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    (out.with_suffix(".txt")).write_text("columns: original, then depths " + ", ".join(map(str, depths)) + "\n")
    return out

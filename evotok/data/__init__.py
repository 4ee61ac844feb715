"""Data layer: EvoShapes, image folders, LLaVA JSON, WebDataset shards, real photos, one DataModule.

Common item schema
------------------
Every source's dataset yields a dict with exactly these keys:

- ``image``: float32 tensor (3, H, W) in [0, 1], RGB, H = W = ``data.resolution``.
- ``labels``: dict[str, int] with the EvoShapes factor keys ``shape, count, color, texture,
  background`` (class indices into ``evoshapes.FACTORS``; -1 where the source has no such label).
  ``count`` is the index into FACTORS["count"], i.e. number of objects - 1.
- ``caption``: str; ``caption_sem``: str (semantic factors only).
- ``qa``: list of {"type", "question", "answer"}.
- ``conversations``: list of {"from": "human" | "gpt", "value": str}, LLaVA style; ``<image>`` in a
  human turn marks an understanding sample, in a gpt turn a generation sample.
- ``task``: "understanding" | "generation" | "" (usable by both).
- ``index``: int (position in the split); ``source``: str (the ``data.source`` name).

Missing text fields are "" or []. Bad input handling (``data.on_bad_file``): greyscale, 16-bit,
palette, CMYK and RGBA images are converted to RGB (alpha composited on white); images smaller than
the resolution, 1x1 included, are upscaled (bicubic); corrupt, truncated or non-image files and JSON
records whose image is missing are skipped (counted, one warning listing the first few) under "skip"
or raise DataError naming the file under "error". A missing or empty ``data.root`` or a malformed
JSON file always raises DataError naming the key.
"""

from __future__ import annotations

from typing import Any

from evotok.errors import UserError

ITEM_KEYS = ("image", "labels", "caption", "caption_sem", "qa", "conversations", "task", "index", "source")
LABEL_KEYS = ("shape", "count", "color", "texture", "background")


class DataError(UserError, ValueError):
    """A data problem (bad file, missing folder, malformed JSON); the message names the file and key."""


_LAZY = {
    "build_dataset": "evotok.data.sources",
    "EvoShapes": "evotok.data.evoshapes",
    "FACTORS": "evotok.data.evoshapes",
    "SEMANTIC_FACTORS": "evotok.data.evoshapes",
    "LOWLEVEL_FACTORS": "evotok.data.evoshapes",
    "caption": "evotok.data.evoshapes",
    "semantic_caption": "evotok.data.evoshapes",
    "qa_pairs": "evotok.data.evoshapes",
    "zero_shot_prompts": "evotok.data.evoshapes",
    "EvoTokDataModule": "evotok.data.datamodule",
    "collate": "evotok.data.collate",
    "write_preview": "evotok.data.preview",
    "bench_data": "evotok.data.bench",
}


def __getattr__(name: str) -> Any:  # lazy re-exports: importing evotok.data stays cheap
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evotok.data' has no attribute '{name}'")


__all__ = ["DataError", "ITEM_KEYS", "LABEL_KEYS", *_LAZY]

"""Evaluation: reconstruction metrics (rFID, PSNR, SSIM), CLIPSIM, codebook usage / perplexity.

``evaluate_recon(run_or_ckpt, split, max_images, data_overrides, out)`` scores a tokenizer run per
depth and writes its metrics.json; ``evotok.eval.metrics`` holds the metric functions, and
``evotok.models.codestats`` the code-usage ones it shares with the quantizer. Imports are lazy so that
``import evotok.eval`` stays cheap (torchmetrics loads on first use).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "evaluate_recon": "evotok.eval.recon",
    "PER_DEPTH_NAMES": "evotok.eval.recon",
    "psnr": "evotok.eval.metrics",
    "ssim": "evotok.eval.metrics",
    "clipsim_pix": "evotok.eval.metrics",
    "clipsim_sem": "evotok.eval.metrics",
    "fid_from_features": "evotok.eval.metrics",
    "make_fid": "evotok.eval.metrics",
    "FIDPerDepth": "evotok.eval.metrics",
    "TeacherPooled": "evotok.eval.metrics",
    "InceptionPool": "evotok.eval.metrics",
    "CodeHistogram": "evotok.eval.metrics",
    "code_counts": "evotok.models.codestats",
    "usage_from_counts": "evotok.models.codestats",
    "perplexity_from_counts": "evotok.models.codestats",
    "usage_perplexity": "evotok.models.codestats",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evotok.eval' has no attribute '{name}'")


__all__ = list(_LAZY)

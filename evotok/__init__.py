"""EvoTok suite: residual-latent-evolution image tokenizer and its experiment suite.

The public loaders are imported lazily (no torch import at ``import evotok``):
``evotok.load_tokenizer(run_dir)``, ``evotok.load_teacher(cfg)``, ``evotok.load_config(name, overrides)``.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_tokenizer": ("evotok.api", "load_tokenizer"),
    "load_teacher": ("evotok.models.teacher", "load_teacher"),
    "load_config": ("evotok.config", "load_config"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'evotok' has no attribute '{name}'")


__all__ = list(_LAZY)

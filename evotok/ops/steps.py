"""The generation sampler's C++ steps (``evotok/ops/csrc/depth_step_cpu.cpp``, ``lm_step_cpu.cpp``): the choice
between them and the PyTorch steps they replace.

``impl``: "torch" (the PyTorch step), "cpp" (the whole step in one call of the CPU extension: float32 CPU
tensors under ``torch.no_grad()``; where the extension does not build it falls back to "torch" after one
warning), "auto" ("cpp" where it applies, else "torch"). Both give the same function to float rounding."""

from __future__ import annotations

from typing import Optional

import torch

STEP_IMPLS = ("auto", "torch", "cpp")


def cpu_module():
    """The compiled CPU extension (built on first use, cached), or None where it does not build."""
    from evotok.ops.build import load_cpu

    return load_cpu()


def cpu_float32_no_grad(x: torch.Tensor) -> Optional[str]:
    """Why a C++ step cannot run on tensors like ``x`` in the current grad mode (None if it can)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"it runs float32 CPU tensors, got {x.dtype} on {x.device}"
    if torch.is_grad_enabled():
        return "it runs under torch.no_grad() only"
    return None


def resolve_step(impl: str, why_not: Optional[str], what: str) -> str:
    """The implementation ``impl`` runs as, given why the C++ step does not apply (None when it does)."""
    if impl not in STEP_IMPLS:
        raise ValueError(f"{what} impl must be one of {STEP_IMPLS}, got {impl!r}")
    if impl == "torch":
        return impl
    if why_not and impl == "cpp":
        raise ValueError(f"impl='cpp' cannot run this {what}: {why_not}; use impl='torch' or 'auto'")
    return "cpp" if why_not is None and cpu_module() is not None else "torch"

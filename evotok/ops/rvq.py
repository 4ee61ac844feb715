"""Residual vector quantisation: nearest-code assignment over all depths.

Contract shared by every implementation (``impl=``):

* For every vector and every depth ``l`` in order: ``code_l = argmin_k ||c_lk||^2 - 2 <r, c_lk>``
  computed in fp32, ``r <- r - c_l[code_l]``; ``r`` starts as ``x``.
* Ties (equal fp32 distances) resolve to the lowest code index.
* No N x K distance matrix and no N x K one-hot is materialised by ``ref``, ``cpp`` or ``cuda``;
  ``gemm`` (the baseline) materialises ``chunk_size`` x K at a time.
* Inputs in float16 / bfloat16 / float64 are converted to float32 (a copy); the residual is returned
  in float32. A non-contiguous input is made contiguous. Empty N is allowed.
* Bad input raises ``ValueError`` naming the argument: wrong ranks, d mismatch, K == 0, non-floating
  dtype, different devices, NaN or Inf values.

Implementations:

* ``ref``  -- pure PyTorch, tiles of ``chunk_size`` vectors x ``REF_CODE_TILE`` codes with a running
  argmin: the specification. Peak extra memory O(chunk_size * REF_CODE_TILE + N * d + K).
* ``gemm`` -- ``addmm`` of a chunk of vectors against all K codes and ``argmin`` (the usual baseline);
  peak extra memory O(chunk_size * K). Default chunk (:func:`gemm_chunk`): ``GEMM_CHUNK`` vectors on the
  CPU; on CUDA as many vectors as keep the chunk's fp32 distances under ``GEMM_CUDA_CHUNK_BYTES``
  (256 MiB: 2048 vectors at K = 32768, 16384 at K = 4096). On CUDA its distances are fp32 only while
  TF32 matmuls are off (``torch.backends.cuda.matmul.allow_tf32``, off by default).
* ``cpp``  -- C++/OpenMP register- and cache-blocked kernel (csrc/rvq_cpu.cpp), all depths in one call.
* ``cuda`` -- CUDA kernels (csrc/rvq_cuda.cu), all depths in one call: per depth a 2-D grid over tiles
  of vectors x slices of codes, combined by a 64-bit atomicMin on packed (distance, index) keys; its
  first use in a process is checked against ``ref`` on a small random input and falls back to ``ref``
  with a warning on mismatch. Compiled and emulated on CPU threads, never yet timed on a GPU.
* ``auto`` -- CUDA tensors: ``gemm``, because the custom kernel has never been measured on a GPU; until
  experiments/gpu/check_quantizer.sh has measured it faster at the paper's shape (N = 8192, K = 32768,
  d = 32, L = 16), ``auto`` does not pick it (``impl="cuda"`` still runs it). CPU tensors: ``cpp`` when
  it builds, else ``ref``.
  There is no shape rule on the CPU: on the 2-core AVX-512 Xeon of the project (measured once with
  ``evotok bench quantizer``; numbers in results/bench_quantizer.json) ``cpp`` beat the best ``gemm``
  at every measured shape, d = 32 and d = 256 included. No timing is taken at run time.
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

IMPLS = ("auto", "ref", "gemm", "cpp", "cuda")
REF_CHUNK = 1024  # vectors per tile in ref
REF_CODE_TILE = 1024  # codes per tile in ref
GEMM_CHUNK = 4096  # default vectors per chunk in gemm on the CPU
GEMM_CUDA_CHUNK_BYTES = 256 * 2**20  # on CUDA the default gemm chunk keeps its chunk x K distances under this


class RVQAssign(NamedTuple):
    codes_NL: Tensor  # int64 (N, L)
    residual_Nd: Tensor  # float32 (N, d): x minus the sum of the chosen codes of all depths


# ------------------------------------------------------------------------------------------ checks


def _all_finite(t: Tensor) -> bool:
    """No NaN / Inf, without a tensor-sized temporary (min and max propagate NaN)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check(x_Nd: Tensor, codebooks_LKd: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(x_Nd, Tensor):
        raise ValueError(f"x_Nd must be a torch.Tensor, got {type(x_Nd).__name__}")
    if not isinstance(codebooks_LKd, Tensor):
        raise ValueError(f"codebooks_LKd must be a torch.Tensor, got {type(codebooks_LKd).__name__}")
    if x_Nd.dim() != 2:
        raise ValueError(f"x_Nd must be 2-D (N, d), got shape {tuple(x_Nd.shape)}")
    if codebooks_LKd.dim() != 3:
        raise ValueError(f"codebooks_LKd must be 3-D (L, K, d), got shape {tuple(codebooks_LKd.shape)}")
    if not x_Nd.is_floating_point():
        raise ValueError(f"x_Nd must be a floating-point tensor, got dtype {x_Nd.dtype}")
    if not codebooks_LKd.is_floating_point():
        raise ValueError(f"codebooks_LKd must be a floating-point tensor, got dtype {codebooks_LKd.dtype}")
    N, d = x_Nd.shape
    L, K, dc = codebooks_LKd.shape
    if dc != d:
        raise ValueError(
            f"codebooks_LKd has code dimension {dc} but x_Nd has d={d} (expected codebooks_LKd of shape "
            f"(L, K, {d}))"
        )
    if K == 0:
        raise ValueError("codebooks_LKd has K=0 codes; at least one code per depth is needed")
    if L == 0:
        raise ValueError("codebooks_LKd has L=0 depths; at least one depth is needed")
    if d == 0:
        raise ValueError("x_Nd has d=0; vectors need at least one dimension")
    if x_Nd.device != codebooks_LKd.device:
        raise ValueError(f"x_Nd is on {x_Nd.device} but codebooks_LKd is on {codebooks_LKd.device}")
    x = x_Nd.to(torch.float32).contiguous()
    cb = codebooks_LKd.to(torch.float32).contiguous()
    if N and not _all_finite(x):
        raise ValueError("x_Nd contains NaN or Inf values")
    if not _all_finite(cb):
        raise ValueError("codebooks_LKd contains NaN or Inf values")
    return x, cb


# --------------------------------------------------------------------------------- implementations


def _ref(x: Tensor, cb: Tensor, chunk_size: int = REF_CHUNK, code_tile: int = REF_CODE_TILE) -> RVQAssign:
    """The specification: running argmin over tiles of codes; lowest index on ties."""
    N, d = x.shape
    L, K, _ = cb.shape
    residual = x.clone()
    codes = torch.zeros(N, L, dtype=torch.long, device=x.device)
    for l in range(L):
        C = cb[l]
        c2 = (C * C).sum(dim=1)  # (K,)
        for n0 in range(0, N, chunk_size):
            r = residual[n0 : n0 + chunk_size]
            best = torch.full((r.shape[0],), float("inf"), device=x.device)
            bidx = torch.zeros(r.shape[0], dtype=torch.long, device=x.device)
            for k0 in range(0, K, code_tile):
                dist = r @ C[k0 : k0 + code_tile].T  # (n, k) tile: x.c
                dist.mul_(-2.0).add_(c2[k0 : k0 + code_tile][None, :])  # ||c||^2 - 2 x.c, in place
                idx = dist.argmin(dim=1)  # first minimum within the tile
                val = dist.gather(1, idx[:, None])[:, 0]
                better = val < best  # strict: an earlier tile keeps ties
                best = torch.where(better, val, best)
                bidx = torch.where(better, idx + k0, bidx)
            codes[n0 : n0 + chunk_size, l] = bidx
            residual[n0 : n0 + chunk_size] -= C[bidx]
    return RVQAssign(codes, residual)


def gemm_chunk(K: int, device: torch.device) -> int:
    """Default vectors per chunk of ``gemm`` for K codes on ``device``: ``GEMM_CHUNK`` on the CPU; on CUDA
    ``GEMM_CUDA_CHUNK_BYTES // (4 K)`` (at least 1), so one chunk's fp32 distance matrix stays under
    256 MiB (a fixed 4096 would be 512 MiB at K = 32768) while small K still gets large chunks."""
    if device.type != "cuda":
        return GEMM_CHUNK
    return max(1, GEMM_CUDA_CHUNK_BYTES // (4 * int(K)))


def _gemm(x: Tensor, cb: Tensor, chunk_size: int = GEMM_CHUNK) -> RVQAssign:
    """Baseline: one (chunk x K) addmm + argmin per chunk and depth."""
    N, d = x.shape
    L, K, _ = cb.shape
    residual = x.clone()
    codes = torch.zeros(N, L, dtype=torch.long, device=x.device)
    for l in range(L):
        C = cb[l]
        c2 = (C * C).sum(dim=1)
        Ct = C.T
        for n0 in range(0, N, chunk_size):
            r = residual[n0 : n0 + chunk_size]
            dist = torch.addmm(c2[None, :], r, Ct, beta=1.0, alpha=-2.0)
            idx = dist.argmin(dim=1)
            codes[n0 : n0 + chunk_size, l] = idx
            residual[n0 : n0 + chunk_size] -= C[idx]
    return RVQAssign(codes, residual)


def _cpp_module():
    from evotok.ops.build import load_cpu

    return load_cpu()


def cpp_available() -> bool:
    """Whether the C++ extension builds (building it on first call)."""
    return _cpp_module() is not None


def _cpp(x: Tensor, cb: Tensor) -> RVQAssign:
    mod = _cpp_module()
    if mod is None:
        return _ref(x, cb)
    codes, residual = mod.rvq_assign_cpu(x, cb)
    return RVQAssign(codes, residual)


_cuda_ok: dict[int, bool] = {}
_cuda_lock = threading.Lock()


def codes_agree(x: Tensor, cb: Tensor, codes_a: Tensor, codes_b: Tensor, rel_tol: float = 1e-5) -> tuple[bool, int]:
    """Whether two code sets agree up to near-ties: (ok, number of excused near-ties).

    Depth by depth along ``codes_a``'s residual path, a differing code is excused when its distance is
    within ``rel_tol * (||r||^2 + ||c_a||^2 + ||c_b||^2)`` of the chosen one (implementations sum the
    fp32 dot product in different orders). Rows that differ are dropped from the later depths, since
    their residual paths diverge."""
    r = x.float().clone()
    cb = cb.float()
    excused = 0
    for l in range(cb.shape[0]):
        C = cb[l]
        a, b = codes_a[:, l], codes_b[:, l]
        diff = (a != b).nonzero()[:, 0]
        if diff.numel():
            rd, ca, cbb = r[diff], C[a[diff]], C[b[diff]]
            gap = ((rd - ca).pow(2).sum(1) - (rd - cbb).pow(2).sum(1)).abs()
            scale = rd.pow(2).sum(1) + ca.pow(2).sum(1) + cbb.pow(2).sum(1) + 1e-30
            if bool((gap > rel_tol * scale).any()):
                return False, excused
            excused += int(diff.numel())
            keep = a == b
            r, codes_a, codes_b, a = r[keep], codes_a[keep], codes_b[keep], a[keep]
        r = r - C[a]
    return True, excused


def _cuda_module():
    from evotok.ops.build import load_cuda

    return load_cuda()


def _cuda_verified(device: torch.device) -> bool:
    """First use on a device: compare against ref on a small random input (warn and fall back on mismatch)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _cuda_lock:
        if idx in _cuda_ok:
            return _cuda_ok[idx]
        mod = _cuda_module()
        ok = False
        if mod is not None:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(777, 32, generator=g)
            cb = torch.randn(3, 301, 32, generator=g)
            cb[:, 7] = cb[:, 3]  # duplicated codes: ties must go to the lower index
            ref = _ref(x, cb)
            try:
                codes, res = mod.rvq_assign_cuda(x.to(device), cb.to(device))
                codes, res = codes.cpu(), res.cpu()
                ok, _ = codes_agree(x, cb, ref.codes_NL, codes)
                ok = ok and bool((codes == ref.codes_NL).float().mean() > 0.99)
                same = (codes == ref.codes_NL).all(dim=1)
                ok = ok and torch.allclose(res[same], ref.residual_Nd[same], atol=1e-5, rtol=1e-5)
                reason = "its codes disagree with impl='ref'"
            except Exception as e:  # launch failure, no kernel image for this GPU, ...
                ok, reason = False, f"{type(e).__name__}: {e}"
            if not ok:
                warnings.warn(
                    f"evotok.ops: the CUDA residual-VQ kernel failed its self-check on {device} ({reason}); "
                    "falling back to impl='ref'",
                    RuntimeWarning,
                    stacklevel=4,
                )
        _cuda_ok[idx] = ok
        return ok


def _cuda(x: Tensor, cb: Tensor) -> RVQAssign:
    if not _cuda_verified(x.device):
        return _ref(x, cb)
    codes, residual = _cuda_module().rvq_assign_cuda(x, cb)
    return RVQAssign(codes, residual)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` runs as on ``device`` (``auto`` resolved; unbuildable ones -> ref)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if device.type == "cuda":
        if impl == "auto":
            # The CUDA kernel has never been timed on a GPU: until experiments/gpu/check_quantizer.sh has
            # measured the kernel faster at the paper shape, auto picks gemm (cuBLAS addmm + argmin).
            # Nothing here touches CUDA: no build, no self-check, no device query.
            return "gemm"
        if impl == "cuda":
            return "cuda" if _cuda_verified(device) else "ref"
        if impl == "cpp":
            raise ValueError("impl='cpp' needs CPU tensors; use impl='cuda' or 'auto' for CUDA tensors")
        return impl
    if impl == "cuda":
        raise ValueError(f"impl='cuda' needs CUDA tensors, got tensors on {device}")
    if impl in ("auto", "cpp"):
        return "cpp" if cpp_available() else "ref"
    return impl


# ------------------------------------------------------------------------------------------ public


def group_sums(idx_M: Tensor, src_Md: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """(sums (rows, d) float32, counts (rows,) float32) of ``src_Md`` rows grouped by ``idx_M``.

    Never a one-hot: the C++ kernel on CPU when built, else ``index_add_`` / ``bincount``."""
    src = src_Md.float().contiguous()
    idx = idx_M.long().contiguous()
    if src.device.type == "cpu" and cpp_available():
        sums, counts = _cpp_module().rvq_accumulate_cpu(idx, src, rows)
        return sums, counts
    sums = torch.zeros(rows, src.shape[1], device=src.device).index_add_(0, idx, src)
    return sums, torch.bincount(idx, minlength=rows).float()



def rvq_assign(x_Nd: Tensor, codebooks_LKd: Tensor, *, impl: str = "auto",
               chunk_size: Optional[int] = None) -> RVQAssign:
    """Residual-VQ assignment of ``x_Nd`` (N, d) against ``codebooks_LKd`` (L, K, d).

    Returns ``RVQAssign(codes_NL int64 (N, L), residual_Nd float32 (N, d))``. ``chunk_size`` sets the
    vectors per chunk of ``ref`` and ``gemm`` (ignored by ``cpp`` and ``cuda``; default ``REF_CHUNK``,
    resp. :func:`gemm_chunk`). Runs without autograd.
    See the module docstring for the contract and the ``auto`` rule.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x, cb = _check(x_Nd, codebooks_LKd)
    which = resolve_impl(impl, x.device)
    # fp32 as the contract says, also inside a mixed-precision region (autocast would run gemm's addmm in bf16)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        if which == "ref":
            return _ref(x, cb, chunk_size or REF_CHUNK)
        if which == "gemm":
            return _gemm(x, cb, chunk_size or gemm_chunk(cb.shape[1], x.device))
        if which == "cpp":
            return _cpp(x, cb)
        return _cuda(x, cb)


def rvq_assign_ref(x_Nd: Tensor, codebooks_LKd: Tensor, *, chunk_size: int = REF_CHUNK) -> RVQAssign:
    """The reference implementation (same signature and contract as :func:`rvq_assign`)."""
    return rvq_assign(x_Nd, codebooks_LKd, impl="ref", chunk_size=chunk_size)

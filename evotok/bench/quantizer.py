"""Benchmark of residual-VQ assignment: ref, gemm (several chunk sizes), cpp, and, when importable,
vector-quantize-pytorch's ResidualVQ and faiss IndexFlatL2, on the same inputs and codebooks.

Reported per shape and implementation:

* ``ms``: wall time of one full assignment (all L depths): a call over 2 s is timed once, faster ones
  get a warm-up call and the best of 3 (shared machines are noisy: compare ratios inside one run, not
  across runs); extensions are built and loaded before any timing;
* ``speedup_vs_gemm``: best gemm time / this time;
* ``gflops``: 2 N K d L / time, and ``frac_of_peak``: that over a square fp32 GEMM rate (torch.mm,
  2048 x 2048 and 4096 x 4096, best of the rates measured before and after the shapes, same run);
  ``floor_ratio`` = time / (2 N K d L / GEMM rate), the distance from the compute floor;
* ``peak_extra_mib``: the rise of the peak resident memory (VmHWM, reset through /proc/self/clear_refs
  just before the call) during one call, measured in a fresh subprocess with L = 1 after its inputs
  (and the module under test) exist, with glibc's mmap threshold fixed at 256 KiB (quick
  mode: cpp only). All
  these methods' memory is independent of L. It counts every touched page (torch's, faiss's, the
  extension's), unlike tracemalloc; ru_maxrss would not do in a child (it starts at the parent's RSS);
* ``agree``: fraction of codes equal to those of ``ref``.

A training-mode row times a full ResidualQuantizer forward (train mode: assignment, EMA, restarts,
outputs) against the bare eval-mode assignment ``rvq_assign`` with the same impl.

vector-quantize-pytorch is fed in chunks of 4096 vectors (it builds a chunk x K distance matrix per
depth; whole inputs at K = 32768 would take GiBs) with its codebooks replaced by ours; faiss gets one
IndexFlatL2 per depth, built inside the timed region (codebooks change every training step).

Run: ``python -m evotok.bench.quantizer [--quick] [--out-dir results]`` (or ``evotok bench quantizer``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from evotok.ops import rvq_assign
from evotok.ops.build import load_cpu

VQP_CHUNK = 4096


# ------------------------------------------------------------------------------------ other libs


def _have(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def _vqp_module(cb_LKd: torch.Tensor):
    from vector_quantize_pytorch import ResidualVQ

    L, K, d = cb_LKd.shape
    m = ResidualVQ(dim=d, num_quantizers=L, codebook_size=K).eval()
    for l in range(L):
        m.layers[l]._codebook.embed.data.copy_(cb_LKd[l][None])
    return m


def _vqp_assign(m, x_Nd: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for n0 in range(0, x_Nd.shape[0], VQP_CHUNK):
            _, idx, _ = m(x_Nd[None, n0 : n0 + VQP_CHUNK])
            out.append(idx[0])
    return torch.cat(out)


def _faiss_assign(x_Nd: torch.Tensor, cb_LKd: torch.Tensor) -> torch.Tensor:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    L, K, d = cb_LKd.shape
    r = x_Nd.numpy().copy()
    codes = []
    for l in range(L):
        C = cb_LKd[l].numpy()
        index = faiss.IndexFlatL2(d)
        index.add(C)
        _, I = index.search(r, 1)
        codes.append(torch.from_numpy(I[:, 0]).long())
        r -= C[I[:, 0]]
    return torch.stack(codes, 1)


# ------------------------------------------------------------------------------------- timing


def _time(fn: Callable[[], object], slow_s: float = 2.0, repeats: int = 3) -> tuple[float, object]:
    """Wall time of ``fn``: a call over ``slow_s`` is timed once (its one-time costs are small next to
    it); faster ones get one warm-up call and the best of ``repeats`` timed calls."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if first >= slow_s:
        return first, out
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def gemm_rate_gflops(sizes=(2048, 4096)) -> float:
    """Best square fp32 torch.mm rate over ``sizes`` (GFLOP/s)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t, _ = _time(lambda: a @ b, slow_s=10.0, repeats=3)
        best = max(best, 2 * n**3 / t / 1e9)
    return best


_MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[7])
from evotok.bench.quantizer import _run_impl, _prepare_impl, _peak_rss_reset, _proc_status_kib
impl, N, K, d, L, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.manual_seed(0)
x, cb = torch.randn(N, d), torch.randn(L, K, d)
state = _prepare_impl(impl, cb)
_run_impl(impl, state, x[:64].clone(), cb, chunk)  # loads extensions / libraries first
before = _peak_rss_reset()
_run_impl(impl, state, x, cb, chunk)
print(json.dumps({"extra_kib": _proc_status_kib("VmHWM") - before}))
"""


def _peak_rss_reset() -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS in KiB.

    Uses /proc/self/clear_refs (Linux); ru_maxrss is not usable in a child process because it starts
    at the parent's RSS at fork time."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS")


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _prepare_impl(impl: str, cb: torch.Tensor):
    return _vqp_module(cb) if impl == "vqp" else None


def _run_impl(impl: str, state, x: torch.Tensor, cb: torch.Tensor, chunk: int) -> torch.Tensor:
    if impl == "vqp":
        return _vqp_assign(state, x)
    if impl == "faiss":
        return _faiss_assign(x, cb)
    if impl == "gemm":
        return rvq_assign(x, cb, impl="gemm", chunk_size=chunk).codes_NL
    return rvq_assign(x, cb, impl=impl).codes_NL


def peak_extra_mib(impl: str, N: int, K: int, d: int, chunk: int = 0) -> Optional[float]:
    """ru_maxrss rise (MiB) during one L=1 call in a fresh subprocess; None if it failed."""
    root = str(Path(__file__).resolve().parents[2])
    # fixed glibc mmap threshold: blocks >= 256 KiB go back to the OS on free, so the peak measures live
    # memory rather than allocator fragmentation
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MALLOC_MMAP_THRESHOLD_="262144")
    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEM_SCRIPT, impl, str(N), str(K), str(d), "1", str(chunk), root],
            capture_output=True, text=True, env=env, timeout=600,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["extra_kib"] / 1024.0
    except Exception:
        return None


# ---------------------------------------------------------------------------------------- main


def _shapes(quick: bool) -> list[dict]:
    if quick:
        return [dict(N=512, d=16, L=2, K=256), dict(N=256, d=64, L=2, K=128)]
    return [dict(N=16384, d=32, L=16, K=4096), dict(N=16384, d=32, L=16, K=32768), dict(N=16384, d=256, L=4, K=4096)]


def bench_quantizer(quick: bool = False, out_dir: str | os.PathLike = "results") -> dict:
    """Time every implementation on the same inputs; print a table; write out_dir/bench_quantizer.json."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    cpp = load_cpu()
    extras = {"vqp": _have("vector_quantize_pytorch"), "faiss": _have("faiss")}
    chunks = (128, 512) if quick else (1024, 4096, 16384)
    rate0 = gemm_rate_gflops((256, 512) if quick else (2048, 4096))
    rows: list[dict] = []
    for shp in _shapes(quick):
        N, d, L, K = shp["N"], shp["d"], shp["L"], shp["K"]
        x, cb = torch.randn(N, d), torch.randn(L, K, d)
        flops = 2.0 * N * K * d * L
        t_ref, ref_codes = _time(lambda: rvq_assign(x, cb, impl="ref").codes_NL)
        res = [dict(impl="ref", t=t_ref, codes=ref_codes, mem=("ref", 0))]
        for c in chunks:
            t, codes = _time(lambda: rvq_assign(x, cb, impl="gemm", chunk_size=c).codes_NL)
            res.append(dict(impl=f"gemm[chunk={c}]", t=t, codes=codes, mem=("gemm", c), gemm=True))
        if cpp is not None:
            t, codes = _time(lambda: rvq_assign(x, cb, impl="cpp").codes_NL)
            res.append(dict(impl="cpp", t=t, codes=codes, mem=("cpp", 0)))
        if extras["faiss"]:
            t, codes = _time(lambda: _faiss_assign(x, cb))
            res.append(dict(impl="faiss IndexFlatL2", t=t, codes=codes, mem=("faiss", 0)))
        if extras["vqp"]:
            m = _vqp_module(cb)
            t, codes = _time(lambda: _vqp_assign(m, x))
            res.append(dict(impl="vector-quantize-pytorch ResidualVQ", t=t, codes=codes, mem=("vqp", 0)))
        for r in res:
            print(f"  N={N} d={d} L={L} K={K} {r['impl']}: {r['t'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
        t_gemm = min(r["t"] for r in res if r.get("gemm"))
        for r in res:
            rows.append(dict(
                N=N, d=d, L=L, K=K, impl=r["impl"], ms=r["t"] * 1e3,
                speedup_vs_gemm=t_gemm / r["t"], gflops=flops / r["t"] / 1e9,
                agree=float((r["codes"] == ref_codes).float().mean()),
                best_gemm=bool(r.get("gemm") and r["t"] == t_gemm), _mem=r["mem"],
            ))
    rate1 = gemm_rate_gflops((256, 512) if quick else (2048, 4096))
    rate = max(rate0, rate1)
    for row in rows:
        row["frac_of_peak"] = row["gflops"] / rate
        row["floor_ratio"] = rate / row["gflops"]
        impl, chunk = row.pop("_mem")
        # quick mode: memory of cpp only (each measurement is a fresh process)
        measure = not quick or impl == "cpp"
        row["peak_extra_mib"] = peak_extra_mib(impl, row["N"], row["K"], row["d"], chunk) if measure else None

    training = [_bench_training(quick, K) for K in ((64,) if quick else (4096, 32768))]
    result = {
        "machine": {
            "cpu": _cpu_model(), "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "cpp_simd": cpp.simd_name() if cpp is not None else None,
        },
        "gemm_rate_gflops": rate, "gemm_rate_before_after": [rate0, rate1],
        "extras_installed": extras, "quick": quick, "rows": rows, "training": training,
        "method": __doc__.split("Reported per shape and implementation:")[1].split("Run:")[0].strip(),
    }
    _print(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quantizer.json").write_text(json.dumps(result, indent=2))
    return result


def _bench_training(quick: bool, K: int) -> dict:
    from evotok.config import QuantizerConfig
    from evotok.models.quantizer import ResidualQuantizer

    N, d, L = (512, 16, 2) if quick else (16384, 32, 16)
    torch.manual_seed(1)
    q = ResidualQuantizer(QuantizerConfig(codebook_size=K, dim=d, impl="auto"), depth=L).train()
    x = torch.randn(1, N, d)
    q(x)  # initialise from this batch
    restarts = []

    def train_step():
        q.train()
        out = q(x)
        restarts.append(int(q.last_restarts_L.sum()))
        return out

    t_train, _ = _time(train_step)
    cb = q.codebooks_LKd.clone()
    t_eval, _ = _time(lambda: rvq_assign(x[0], cb, impl="auto"))
    q.eval()
    t_eval_fwd, _ = _time(lambda: q(x))
    return dict(N=N, d=d, L=L, K=K, train_forward_ms=t_train * 1e3, eval_assign_ms=t_eval * 1e3,
                eval_forward_ms=t_eval_fwd * 1e3, ratio_train_vs_assign=t_train / t_eval,
                restarts_per_step=restarts[-1], target_ratio=1.3)


def _cpu_model() -> str:
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print(result: dict) -> None:
    print(f"square fp32 GEMM rate: {result['gemm_rate_gflops']:.0f} GFLOP/s "
          f"(before/after: {result['gemm_rate_before_after'][0]:.0f}/{result['gemm_rate_before_after'][1]:.0f}); "
          f"threads {result['machine']['threads']}; cpp SIMD {result['machine']['cpp_simd']}")
    hdr = f"{'N':>6} {'d':>4} {'L':>3} {'K':>6}  {'impl':<36} {'ms':>9} {'x gemm':>7} {'GFLOP/s':>8} {'floor x':>7} {'MiB':>7} {'agree':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in result["rows"]:
        mem = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        name = r["impl"] + (" *" if r["best_gemm"] else "")
        print(f"{r['N']:>6} {r['d']:>4} {r['L']:>3} {r['K']:>6}  {name:<36} {r['ms']:>9.1f} {r['speedup_vs_gemm']:>7.2f} "
              f"{r['gflops']:>8.1f} {r['floor_ratio']:>7.2f} {mem:>7} {r['agree']:>6.3f}")
    for t in result["training"]:
        print(f"training forward (N={t['N']}, d={t['d']}, L={t['L']}, K={t['K']}): {t['train_forward_ms']:.1f} ms vs "
              f"eval assignment {t['eval_assign_ms']:.1f} ms -> {t['ratio_train_vs_assign']:.2f}x (target <= 1.3x); "
              f"eval forward {t['eval_forward_ms']:.1f} ms; {t['restarts_per_step']} restarts in the last step")
    print("* = best gemm chunk size (the baseline); MiB = peak extra memory of one L=1 call")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default="results")
    a = p.parse_args(argv)
    bench_quantizer(quick=a.quick, out_dir=a.out_dir)


if __name__ == "__main__":
    main()

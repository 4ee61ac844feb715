#!/usr/bin/env bash
# GPU check of the residual-VQ CUDA kernel (about 2-4 minutes on one H100/H200; hard limit 5 minutes):
#   1. builds the CUDA extension (TORCH_CUDA_ARCH_LIST defaults to the local GPU's capability),
#   2. checks cuda codes against ref on random inputs (odd sizes, exact ties, d in {3, 8, 32, 64, 256}),
#   3. times cuda vs the gemm baseline (best chunk) at the paper's shape and prints a table.
# Usage: experiments/gpu/check_quantizer.sh [PYTHON]   (default: .venv/bin/python, else python3)
# Writes results/gpu_check_quantizer.json (or $OUT/gpu_check_quantizer.json when $OUT is set).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME="$("$PY" -c 'from evotok.ops.build import find_cuda_home; print(find_cuda_home() or "")')"
  export CUDA_HOME
fi
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")')"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-8}"
OUT_DIR="${OUT:-results}"
mkdir -p "$OUT_DIR"
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST python=$PY"

timeout 300 "$PY" - "$OUT_DIR" <<'EOF'
import json, sys, time
import torch
from evotok.ops import build, codes_agree, rvq_assign
from evotok.ops.rvq import resolve_impl

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
t0 = time.time()
mod = build.load("cuda", verbose=False)
assert mod is not None, f"CUDA build failed: {build.last_error('cuda')}"
print(f"built in {time.time() - t0:.1f} s; self-check -> {resolve_impl('cuda', dev)}")
assert resolve_impl("cuda", dev) == "cuda", "CUDA kernel failed its self-check against ref"

# 1. equivalence with ref
g = torch.Generator().manual_seed(0)
checks = []
for N, K, d, L in [(1037, 300, 3, 3), (517, 77, 8, 4), (4099, 1000, 32, 4), (333, 129, 64, 2),
                   (2049, 4097, 256, 2), (8192, 4096, 32, 16), (3000, 32768, 32, 2)]:
    x, cb = torch.randn(N, d, generator=g), torch.randn(L, K, d, generator=g)
    ref = rvq_assign(x, cb, impl="ref")
    out = rvq_assign(x.to(dev), cb.to(dev), impl="cuda")
    codes, res = out.codes_NL.cpu(), out.residual_Nd.cpu()
    ok, excused = codes_agree(x, cb, ref.codes_NL, codes)
    same = (codes == ref.codes_NL).all(1)
    ok = ok and excused <= max(2, 2e-3 * codes.numel())
    ok = ok and torch.allclose(res[same], ref.residual_Nd[same], atol=1e-5, rtol=1e-5)
    checks.append(dict(N=N, K=K, d=d, L=L, ok=bool(ok), near_ties_excused=excused))
    print(f"equivalence N={N} K={K} d={d} L={L}: {'OK' if ok else 'FAIL'} ({excused} near-ties excused)")
# exact ties (integer data): lowest index
cb = torch.randint(-2, 3, (3, 50, 8), generator=g).float()
cb[:, 49] = cb[:, 1]; cb[:, 13] = cb[:, 12]
x = torch.randint(-3, 4, (400, 8), generator=g).float(); x[:50] = 0
r = x.double(); want = []
for l in range(3):
    C = cb[l].double(); dist = (C * C).sum(1)[None] - 2 * r @ C.T
    idx = (dist == dist.min(1, keepdim=True).values).float().argmax(1); want.append(idx); r = r - C[idx]
tie_ok = torch.equal(rvq_assign(x.to(dev), cb.to(dev), impl="cuda").codes_NL.cpu(), torch.stack(want, 1))
checks.append(dict(name="exact ties", ok=bool(tie_ok)))
print(f"exact ties -> lowest index: {'OK' if tie_ok else 'FAIL'}")

# 2. timing at the paper's shape
def cuda_time(fn, reps=5):
    fn(); torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b))
    return best

rows = []
n = 8192
A, B = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
torch.backends.cuda.matmul.allow_tf32 = False
rate = 2 * n**3 / cuda_time(lambda: A @ B) / 1e6  # GFLOP/s, fp32 without TF32
for N, K, d, L in [(8192, 32768, 32, 16), (65536, 32768, 32, 16), (16384, 4096, 32, 16), (16384, 4096, 256, 4)]:
    x, cb = torch.randn(N, d, device=dev), torch.randn(L, K, d, device=dev)
    flops = 2.0 * N * K * d * L
    res = {"cuda": cuda_time(lambda: rvq_assign(x, cb, impl="cuda"))}
    for c in (4096, 16384):
        res[f"gemm[chunk={c}]"] = cuda_time(lambda: rvq_assign(x, cb, impl="gemm", chunk_size=c), reps=3)
    best_gemm = min(v for k, v in res.items() if k.startswith("gemm"))
    for impl, ms in res.items():
        rows.append(dict(N=N, K=K, d=d, L=L, impl=impl, ms=ms, speedup_vs_gemm=best_gemm / ms,
                         gflops=flops / ms / 1e6, frac_of_fp32_gemm=flops / ms / 1e6 / rate))
print(f"\nfp32 GEMM (no TF32) {n}x{n}: {rate:.0f} GFLOP/s on {torch.cuda.get_device_name()}")
print(f"{'N':>6} {'K':>6} {'d':>4} {'L':>3}  {'impl':<18} {'ms':>9} {'x gemm':>7} {'GFLOP/s':>9} {'of GEMM':>8}")
for r in rows:
    print(f"{r['N']:>6} {r['K']:>6} {r['d']:>4} {r['L']:>3}  {r['impl']:<18} {r['ms']:>9.2f} {r['speedup_vs_gemm']:>7.2f} "
          f"{r['gflops']:>9.0f} {r['frac_of_fp32_gemm']:>8.2f}")
out = dict(device=torch.cuda.get_device_name(), fp32_gemm_gflops=rate, checks=checks, rows=rows)
json.dump(out, open(f"{sys.argv[1]}/gpu_check_quantizer.json", "w"), indent=2)
sys.exit(0 if all(c["ok"] for c in checks) else 1)
EOF

"""Equivalence, tie, memory and input tests of evotok.ops.rvq_assign (ref, gemm, cpp, cuda)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from evotok.ops import build, rvq
from evotok.ops import codes_agree, cpp_available, resolve_impl, rvq_assign

REPO = Path(__file__).resolve().parents[1]
MAX_NEAR_TIE_FRACTION = 2e-3  # excused near-ties per (vector, depth), random Gaussian inputs


@pytest.fixture(scope="module")
def cpp_built():
    if not build.compiler_available():
        pytest.skip("no C++ compiler on PATH")
    assert cpp_available(), f"C++ extension failed to build: {build.last_error('cpu')}"


def _inputs(N, K, d, L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randn(L, K, d, generator=g)


def _check_equivalent(x, cb, got, want, label):
    ok, excused = codes_agree(x, cb, want.codes_NL, got.codes_NL)
    total = want.codes_NL.numel()
    msg = f"{label}: {excused} near-ties excused of {total} codes"
    print(msg)
    assert ok, f"{label}: codes differ by more than a near-tie ({msg})"
    assert excused <= max(2, MAX_NEAR_TIE_FRACTION * total), msg
    same = (got.codes_NL == want.codes_NL).all(dim=1)
    assert same.float().mean() > 0.99, msg
    assert got.residual_Nd.dtype == torch.float32 and got.codes_NL.dtype == torch.int64
    torch.testing.assert_close(got.residual_Nd[same], want.residual_Nd[same], atol=1e-5, rtol=1e-5)


SHAPES = [(1037, 300, 3, 3), (517, 77, 8, 4), (1001, 1000, 32, 3), (333, 129, 64, 2), (70, 13, 32, 5)]


@pytest.mark.parametrize("N,K,d,L", SHAPES)
def test_cpp_matches_ref(cpp_built, N, K, d, L):
    x, cb = _inputs(N, K, d, L, seed=N + K + d)
    _check_equivalent(x, cb, rvq_assign(x, cb, impl="cpp"), rvq_assign(x, cb, impl="ref"), f"cpp {N}x{K}x{d}x{L}")


@pytest.mark.parametrize("N,K,d,L", SHAPES)
def test_gemm_matches_ref(N, K, d, L):
    x, cb = _inputs(N, K, d, L, seed=N + K + d + 1)
    got = rvq_assign(x, cb, impl="gemm", chunk_size=129)
    _check_equivalent(x, cb, got, rvq_assign(x, cb, impl="ref"), f"gemm {N}x{K}x{d}x{L}")


def test_ref_tiling_does_not_change_result():
    x, cb = _inputs(301, 97, 8, 3, seed=3)
    a = rvq._ref(x, cb)
    b = rvq._ref(x, cb, chunk_size=7, code_tile=5)
    ok, excused = codes_agree(x, cb, a.codes_NL, b.codes_NL)
    assert ok and excused <= 2


def _tie_problem(seed=0):
    """Integer data: every distance is exact in fp32 whatever the summation order, so ties are exact."""
    g = torch.Generator().manual_seed(seed)
    L, K, d, N = 3, 50, 8, 400
    cb = torch.randint(-2, 3, (L, K, d), generator=g).float()
    cb[:, 49] = cb[:, 1]  # duplicates, the later copy across micro-kernel and tile boundaries
    cb[:, 13] = cb[:, 12]
    cb[:, 30] = cb[:, 6]
    x = torch.randint(-3, 4, (N, d), generator=g).float()
    x[:50] = 0.0  # many codes equidistant from 0 (same norm)
    # midpoints between two codes of depth 1 (even sums keep the midpoint an integer)
    a, b = cb[0, 20], cb[0, 21].clone()
    b = b + ((a + b) % 2)  # make a + b even
    cb[0, 21] = b
    x[50:60] = (a + b) / 2
    return x, cb


def _brute_force(x, cb):
    """Float64, exhaustive, lowest index on ties (exact for the integer problem)."""
    r = x.double()
    codes = []
    for l in range(cb.shape[0]):
        C = cb[l].double()
        dist = (C * C).sum(1)[None] - 2 * r @ C.T
        m = dist.min(dim=1, keepdim=True).values
        idx = (dist == m).float().argmax(dim=1)  # first column attaining the minimum
        codes.append(idx)
        r = r - C[idx]
    return torch.stack(codes, 1), r.float()


@pytest.mark.parametrize("impl", ["ref", "gemm", "cpp"])
def test_exact_ties_resolve_to_lowest_index(impl, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_built")
    x, cb = _tie_problem()
    want_codes, want_res = _brute_force(x, cb)
    got = rvq_assign(x, cb, impl=impl, chunk_size=64) if impl != "cpp" else rvq_assign(x, cb, impl="cpp")
    n_ties = 0
    r = x.double()
    for l in range(cb.shape[0]):  # the problem really has ties
        C = cb[l].double()
        dist = (C * C).sum(1)[None] - 2 * r @ C.T
        n_ties += int(((dist == dist.min(1, keepdim=True).values).sum(1) > 1).sum())
        r = r - C[want_codes[:, l]]
    assert n_ties > 50
    assert torch.equal(got.codes_NL, want_codes), f"{impl}: tie broken differently"
    assert torch.equal(got.residual_Nd, want_res)
    if impl == "ref":
        tiled = rvq._ref(x, cb, chunk_size=33, code_tile=7)
        assert torch.equal(tiled.codes_NL, want_codes)


# ------------------------------------------------------------------------------------ input handling


@pytest.mark.parametrize("impl", ["ref", "gemm", "cpp"])
def test_noncontiguous_and_low_precision_inputs(impl, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_built")
    x, cb = _inputs(200, 40, 16, 2, seed=5)
    want = rvq_assign(x, cb, impl=impl)
    xt = x.T.contiguous().T  # same values, column-major
    cbt = cb.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous() and not cbt.is_contiguous()
    got = rvq_assign(xt, cbt, impl=impl)
    assert torch.equal(got.codes_NL, want.codes_NL) and torch.equal(got.residual_Nd, want.residual_Nd)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xl, cbl = x.to(dt), cb.to(dt)
        got = rvq_assign(xl, cbl, impl=impl)
        ref = rvq_assign(xl.float(), cbl.float(), impl="ref")  # documented: computed in fp32
        assert got.residual_Nd.dtype == torch.float32
        ok, excused = codes_agree(xl.float(), cbl.float(), ref.codes_NL, got.codes_NL)
        assert ok and excused <= 2


def test_empty_input():
    x, cb = torch.zeros(0, 8), torch.randn(2, 5, 8)
    out = rvq_assign(x, cb, impl="ref")
    assert out.codes_NL.shape == (0, 2) and out.residual_Nd.shape == (0, 8)
    if build.compiler_available() and cpp_available():
        out = rvq_assign(x, cb, impl="cpp")
        assert out.codes_NL.shape == (0, 2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 5, 8)), "x_Nd must be 2-D"),
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), "codebooks_LKd must be 3-D"),
        (lambda: (torch.randn(4, 8), torch.randn(2, 5, 7)), r"x_Nd has d=8.*\(L, K, 8\)"),
        (lambda: (torch.randn(4, 8), torch.randn(2, 0, 8)), "K=0"),
        (lambda: (torch.randn(4, 8), torch.randn(0, 5, 8)), "L=0"),
        (lambda: (torch.tensor([[1.0, float("nan")]]), torch.randn(1, 3, 2)), "x_Nd contains NaN"),
        (lambda: (torch.randn(3, 2), torch.tensor([[[float("inf"), 0.0]]])), "codebooks_LKd contains NaN or Inf"),
        (lambda: (torch.ones(3, 2, dtype=torch.long), torch.randn(1, 3, 2)), "x_Nd must be a floating"),
        (lambda: (torch.randn(3, 2), torch.ones(1, 3, 2, dtype=torch.int32)), "codebooks_LKd must be a floating"),
        (lambda: ([[1.0, 2.0]], torch.randn(1, 3, 2)), "x_Nd must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("impl", ["ref", "gemm", "cpp", "auto"])
def test_bad_inputs_raise_value_error(make, match, impl):
    x, cb = make()
    with pytest.raises(ValueError, match=match):
        rvq_assign(x, cb, impl=impl)


def test_bad_impl_and_device_rules():
    x, cb = _inputs(10, 4, 2, 1, seed=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        rvq_assign(x, cb, impl="fast")
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        rvq_assign(x, cb, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        rvq_assign(x, cb, impl="gemm", chunk_size=0)


def test_auto_picks_cpp_on_cpu(cpp_built):
    assert resolve_impl("auto", torch.device("cpu")) == "cpp"
    x, cb = _inputs(100, 30, 8, 2, seed=1)
    assert torch.equal(rvq_assign(x, cb).codes_NL, rvq_assign(x, cb, impl="cpp").codes_NL)


def test_failed_build_warns_once_and_cpp_falls_back(tmp_path, monkeypatch):
    bad = tmp_path / "csrc"
    bad.mkdir()
    for name in build.CPU_SOURCES:
        (bad / name).write_text("#error deliberately broken\n")
    monkeypatch.setattr(build, "CSRC", bad)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert build.load("cpu", cache_root=tmp_path / "cache") is None
        assert build.load("cpu", cache_root=tmp_path / "cache") is None
    msgs = [str(w.message) for w in rec if "extension failed" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "falling back to impl='ref'" in msgs[0]
    monkeypatch.setattr(rvq, "_cpp_module", lambda: None)
    x, cb = _inputs(50, 9, 4, 2, seed=2)
    assert resolve_impl("cpp", torch.device("cpu")) == "ref"
    assert torch.equal(rvq_assign(x, cb, impl="cpp").codes_NL, rvq_assign(x, cb, impl="ref").codes_NL)


def test_builds_from_two_checkouts_name_the_same_source_files(tmp_path, monkeypatch):
    """The JIT build compiles copies staged in its cache folder, so checkouts at different paths share one
    build (ninja records source paths); unchanged copies keep their mtime, changed ones are rewritten."""
    folder = tmp_path / "cache" / "evotok_rvq_cpu-abc"
    staged = []
    for checkout in ("a", "b"):
        csrc = tmp_path / checkout / "csrc"
        csrc.mkdir(parents=True)
        (csrc / "rvq_cpu.cpp").write_text("int f() { return 1; }\n")
        (csrc / "util.h").write_text("#pragma once\n")
        monkeypatch.setattr(build, "CSRC", csrc)
        staged.append(build._stage_sources(folder, ("rvq_cpu.cpp",)))
        if checkout == "a":
            os.utime(folder / "src" / "rvq_cpu.cpp", (1, 1))
    assert staged[0] == staged[1] == [str(folder / "src" / "rvq_cpu.cpp")]
    assert (folder / "src" / "util.h").is_file()
    assert os.stat(folder / "src" / "rvq_cpu.cpp").st_mtime == 1  # b's identical copy left it alone
    (tmp_path / "b" / "csrc" / "rvq_cpu.cpp").write_text("int f() { return 2; }\n")
    build._stage_sources(folder, ("rvq_cpu.cpp",))
    assert (folder / "src" / "rvq_cpu.cpp").read_text() == "int f() { return 2; }\n"



def test_build_cache_entry_moves_with_the_virtual_environment(monkeypatch):
    """Two virtual environments name different torch folders on the compile line; sharing one cache entry made
    ninja rebuild it for each in turn, so the folders are part of the entry's hash."""
    from torch.utils import cpp_extension

    here = build.build_dir("cpu")
    assert build.build_dir("cpu") == here  # stable within one environment
    real = cpp_extension.include_paths
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/elsewhere/venv/torch/include"])
    assert build.build_dir("cpu") != here
    monkeypatch.setattr(cpp_extension, "include_paths", real)
    monkeypatch.setattr(cpp_extension, "library_paths", lambda *a, **k: ["/elsewhere/venv/torch/lib"])
    assert build.build_dir("cpu") != here

# ------------------------------------------------------------------------------------------- memory

_MEM_SCRIPT = r"""
import json, sys, torch
from evotok.bench.quantizer import _peak_rss_reset, _proc_status_kib
from evotok.ops import rvq_assign
impl, N, K, d, L = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
rvq_assign(torch.randn(64, d), torch.randn(1, 8, d), impl=impl)  # load the extension first
x, cb = torch.randn(N, d), torch.randn(L, K, d)
before = _peak_rss_reset()  # VmHWM := VmRSS (ru_maxrss would start at the parent's RSS)
out = rvq_assign(x, cb, impl=impl)
print(json.dumps({"extra_kib": _proc_status_kib("VmHWM") - before}))
"""


def _peak_extra_kib(impl, N, K, d, L):
    # fixed glibc mmap threshold: big blocks are returned on free, so the peak is the live memory, not
    # allocator fragmentation (the default threshold adapts, which made ref's peak vary run to run)
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="262144")
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, impl, str(N), str(K), str(d), str(L)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_kib"]


@pytest.mark.slow  # part of make test, not of make test-fast
def test_peak_memory_flat_in_K(cpp_built):
    """Peak-RSS (VmHWM) rise during one call, in a fresh process, measured after the inputs exist.

    cpp and ref: the rise must not grow by more than 4 MiB when K grows 16x (1024 -> 16384).
    gemm (control): the same measurement must see its chunk x K matrix grow (>= 100 MiB)."""
    N, d, L = 4096, 32, 1
    rows = {}
    for impl in ("cpp", "ref", "gemm"):
        rows[impl] = (_peak_extra_kib(impl, N, 1024, d, L), _peak_extra_kib(impl, N, 16384, d, L))
    print("peak extra KiB (K=1024, K=16384):", rows)
    assert rows["gemm"][1] - rows["gemm"][0] > 100 * 1024, f"control failed to register growth: {rows}"
    for impl in ("cpp", "ref"):
        small, big = rows[impl]
        assert big - small < 4 * 1024, f"{impl}: peak extra memory grew with K: {rows}"


# --------------------------------------------------------------------------------------------- CUDA


def test_auto_on_cuda_resolves_to_gemm_without_touching_cuda(monkeypatch):
    """Until experiments/gpu/check_quantizer.sh has timed the kernel, auto on CUDA is gemm: no build, no
    self-check, no device query (so this holds on a machine without a GPU)."""
    def boom(*a, **k):
        raise AssertionError("resolve_impl('auto', cuda) touched CUDA")

    monkeypatch.setattr(rvq, "_cuda_verified", boom)
    monkeypatch.setattr(rvq, "_cuda_module", boom)
    monkeypatch.setattr(build, "load", boom)
    for name in ("is_available", "current_device", "device_count", "init", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, boom)
    assert resolve_impl("auto", torch.device("cuda")) == "gemm"
    assert resolve_impl("auto", torch.device("cuda", 1)) == "gemm"


def test_gemm_default_chunk_is_k_aware_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rvq.gemm_chunk(32768, cpu) == rvq.gemm_chunk(16, cpu) == rvq.GEMM_CHUNK
    assert rvq.gemm_chunk(32768, cuda) == 2048 and rvq.gemm_chunk(4096, cuda) == 16384
    assert rvq.gemm_chunk(2**30, cuda) == 1
    for K in (1, 1000, 4096, 32768, 100003):
        assert 1 <= rvq.gemm_chunk(K, cuda) and rvq.gemm_chunk(K, cuda) * K * 4 <= rvq.GEMM_CUDA_CHUNK_BYTES


@pytest.mark.slow  # part of make test, not of make test-fast
def test_cuda_kernel_compiles_for_sm80_and_sm90_without_spills():
    """nvcc alone on rvq_cuda.cu (no torch headers, seconds) for two archs; on sm_90 (H100/H200, the
    target) ptxas must report no register spills in any kernel."""
    cuda_home = build.find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc + include/cuda_runtime.h) on this machine")
    src = Path(build.__file__).parent / "csrc" / "rvq_cuda.cu"
    cmd = [str(Path(cuda_home) / "bin" / "nvcc"), *build.CUDA_CFLAGS, "-std=c++17", "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-c", str(src), "-o", os.devnull]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    arch, spills, kernels = None, [], set()
    for line in log.splitlines():
        if "Compiling entry function" in line:
            arch = line.rsplit("for '", 1)[-1].rstrip("'")
            kernels.add((arch, line.split("'")[1]))
        elif arch == "sm_90" and (m := re.search(r"(\d+) bytes spill stores", line)) and int(m.group(1)):
            spills.append(line.strip())
    assert {a for a, _ in kernels} == {"sm_80", "sm_90"}, log[-4000:]
    assert sum(1 for a, k in kernels if a == "sm_90" and "argmin_kernel" in k) == 5  # d = 8, 16, 32, 64, generic
    assert not spills, spills


def test_cuda_source_compiles_under_nvcc(tmp_path):
    """Builds the CUDA extension (compile + link of kernel and torch binding) for sm_90 in a child
    process; no GPU needed."""
    cuda_home = build.find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc + include/cuda_runtime.h) on this machine")
    env = dict(os.environ, CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    code = (
        "from evotok.ops import build\n"
        "m = build.load('cuda', warn=False)\n"
        "print('BUILT' if m is not None else 'FAILED ' + str(build.last_error('cuda')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=900)
    assert "BUILT" in out.stdout, (out.stdout + out.stderr)[-4000:]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N,K,d,L", SHAPES + [(4099, 4097, 256, 2), (10000, 4096, 32, 16), (1, 1, 1, 2),
                                     (700, 257, 16, 3), (600, 300, 17, 2), (500, 1000, 65, 2)])
def test_cuda_matches_ref(N, K, d, L):
    x, cb = _inputs(N, K, d, L, seed=N + K)
    assert resolve_impl("cuda", torch.device("cuda")) == "cuda", "CUDA kernel failed its self-check"
    got = rvq_assign(x.cuda(), cb.cuda(), impl="cuda")
    got = rvq.RVQAssign(got.codes_NL.cpu(), got.residual_Nd.cpu())
    _check_equivalent(x, cb, got, rvq_assign(x, cb, impl="ref"), f"cuda {N}x{K}x{d}x{L}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N,K,d,L,scale", [(1037, 300, 3, 3, 1.0), (4099, 1000, 32, 4, 1.0), (333, 129, 64, 2, 1.0),
                                           (2000, 3000, 32, 2, 30.0)])
def test_cuda_matches_cpp_bitwise(cpp_built, N, K, d, L, scale):
    """Both kernels sum the dot product sequentially over d with fma and take fma(-2, dot, ||c||^2): the
    same fp32 operations, so identical codes and residuals (x * 30: about half the distances negative)."""
    x, cb = _inputs(N, K, d, L, seed=N + d)
    x = x * scale
    got = rvq_assign(x.cuda(), cb.cuda(), impl="cuda")
    want = rvq_assign(x, cb, impl="cpp")
    assert torch.equal(got.codes_NL.cpu(), want.codes_NL)
    assert torch.equal(got.residual_Nd.cpu(), want.residual_Nd)


@pytest.mark.gpu
@gpu
def test_cuda_empty_input_and_auto_is_gemm():
    out = rvq_assign(torch.zeros(0, 8, device="cuda"), torch.randn(2, 5, 8, device="cuda"), impl="cuda")
    assert out.codes_NL.shape == (0, 2) and out.residual_Nd.shape == (0, 8)
    x, cb = _inputs(300, 40, 8, 2, seed=4)
    a = rvq_assign(x.cuda(), cb.cuda())
    b = rvq_assign(x.cuda(), cb.cuda(), impl="gemm")
    assert torch.equal(a.codes_NL, b.codes_NL)


@pytest.mark.gpu
@gpu
def test_cuda_exact_ties():
    x, cb = _tie_problem()
    want_codes, want_res = _brute_force(x, cb)
    got = rvq_assign(x.cuda(), cb.cuda(), impl="cuda")
    assert torch.equal(got.codes_NL.cpu(), want_codes)
    assert torch.equal(got.residual_Nd.cpu(), want_res)


def test_codes_agree_detects_real_differences():
    x, cb = _inputs(300, 50, 8, 2, seed=9)
    ref = rvq_assign(x, cb, impl="ref")
    bad = ref.codes_NL.clone()
    bad[7, 0] = (bad[7, 0] + 1) % 50  # a different code, almost surely not a near-tie
    assert codes_agree(x, cb, ref.codes_NL, ref.codes_NL) == (True, 0)
    assert codes_agree(x, cb, ref.codes_NL, bad)[0] is False

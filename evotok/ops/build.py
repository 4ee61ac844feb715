"""Lazy JIT builds of the C++/CUDA extensions (the residual-VQ kernels; on the CPU also the generation sampler's
depth-transformer and LM steps), cached by a hash of their sources.

``load_cpu()`` / ``load_cuda()`` return the compiled module or ``None``; the first failure in a process
emits ONE warning naming the reason and is remembered, so callers fall back to the reference.

The build folder is ``<cache_root>/<name>-<hash>`` with ``cache_root`` = ``~/.cache/evotok/ext`` by
default. The hash covers the sources, the compiler flags, the torch version and, for the CPU build
(``-march=native``), the host CPU's model and flags, so a shared home folder never hands one machine's
binary to another. It also covers the paths the compile and link lines name (torch's include and library
folders, Python's headers): ninja rebuilds whenever its command line changes, so two virtual environments (a
clean clone's and the working checkout's) sharing one entry rebuilt it for each other, a minute each time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("rvq_cpu.cpp", "depth_step_cpu.cpp", "lm_step_cpu.cpp")  # one module: RVQ kernels, sampler steps
CUDA_SOURCES = ("rvq_cuda.cu", "rvq_cuda_bind.cpp")
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # no -ffast-math: it may break the tie rule
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-lineinfo"]  # no --use_fast_math: distances must stay exact fp32
CUDA_HOST_CFLAGS = ["-O3"]
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "evotok" / "ext"

_lock = threading.Lock()
_cache: dict[str, Optional[ModuleType]] = {}
_errors: dict[str, str] = {}


def _cpu_signature() -> str:
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            keep = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        sig += "".join(sorted(set(keep)))
    except OSError:
        sig += platform.processor()
    return sig


def _toolchain_paths(kind: str) -> str:
    """The folders the build's command lines name, which move with the virtual environment."""
    import sysconfig

    from torch.utils import cpp_extension

    device = "cpu" if kind == "cpu" else "cuda"
    paths = [sysconfig.get_paths().get("include", "")]
    for find in (cpp_extension.include_paths, cpp_extension.library_paths):
        try:
            paths += find(device)
        except Exception:  # no CUDA toolkit: the build itself says so; torch's own folders still count
            paths += find("cpu")
    return "\n".join(paths)


def source_hash(kind: str) -> str:
    """Hash of everything that determines the binary of ``kind`` ('cpu' or 'cuda')."""
    import torch

    h = hashlib.sha256()
    names = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    for name in sorted(names) + sorted(p.name for p in CSRC.glob("*.h")):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_toolchain_paths(kind).encode())
    if kind == "cpu":
        h.update(" ".join(CPU_CFLAGS + CPU_LDFLAGS).encode())
        h.update(_cpu_signature().encode())
    else:
        h.update(" ".join(CUDA_CFLAGS + CUDA_HOST_CFLAGS).encode())
        h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    return h.hexdigest()[:16]


def build_dir(kind: str, cache_root: Optional[Path] = None) -> Path:
    root = Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    return root / f"evotok_rvq_{kind}-{source_hash(kind)}"


def last_error(kind: str) -> Optional[str]:
    """Why the last build of ``kind`` failed in this process (None if it did not)."""
    return _errors.get(kind)


def _stage_sources(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the sources and headers into ``folder/src`` and return the copied sources' paths. The build
    then names the same files whichever checkout imports evotok: ninja records source paths, so
    building from each checkout's own csrc made two checkouts rebuild each other's cache entry."""
    src = folder / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in list(names) + [p.name for p in CSRC.glob("*.h")]:
        data, dst = (CSRC / name).read_bytes(), src / name
        if not dst.is_file() or dst.read_bytes() != data:  # unchanged copies keep their mtime
            dst.write_bytes(data)
    return [str(src / n) for n in names]


def _build(kind: str, cache_root: Optional[Path], verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    folder = build_dir(kind, cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"evotok_rvq_{kind}_{source_hash(kind)}"
    if kind == "cpu":
        return cpp_extension.load(
            name=name,
            sources=_stage_sources(folder, CPU_SOURCES),
            extra_cflags=CPU_CFLAGS,
            extra_ldflags=CPU_LDFLAGS,
            build_directory=str(folder),
            verbose=verbose,
        )
    cuda_home = cpp_extension.CUDA_HOME
    if not cuda_home or not (Path(cuda_home) / "include" / "cuda_runtime.h").exists():
        raise RuntimeError(
            f"no CUDA toolkit found (torch resolved CUDA_HOME={cuda_home!r}; set CUDA_HOME to the "
            f"toolkit that holds bin/nvcc and include/cuda_runtime.h, e.g. {find_cuda_home()!r}, before "
            "starting Python)"
        )
    return cpp_extension.load(
        name=name,
        sources=_stage_sources(folder, CUDA_SOURCES),
        extra_cflags=CUDA_HOST_CFLAGS,
        extra_cuda_cflags=CUDA_CFLAGS,
        build_directory=str(folder),
        verbose=verbose,
    )


def load(kind: str, *, cache_root: Optional[Path] = None, verbose: bool = False,
         warn: bool = True) -> Optional[ModuleType]:
    """The compiled extension ``kind`` ('cpu' | 'cuda'), building it on first use; None on failure."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    key = f"{kind}:{cache_root}"
    with _lock:
        if key in _cache:
            return _cache[key]
        try:
            mod = _build(kind, cache_root, verbose)
        except Exception as e:  # compiler missing, compile error, bad toolkit, ...
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            _errors[kind] = reason
            if warn:
                warnings.warn(
                    f"evotok.ops: building the {kind} extension failed ({reason}); falling back to "
                    + ("impl='ref' for the residual VQ and impl='torch' for the sampler's steps" if kind == "cpu"
                       else "impl='ref'"),
                    RuntimeWarning,
                    stacklevel=3,
                )
            mod = None
        _cache[key] = mod
        return mod


def load_cpu(**kw) -> Optional[ModuleType]:
    return load("cpu", **kw)


def load_cuda(**kw) -> Optional[ModuleType]:
    return load("cuda", **kw)


def find_cuda_home() -> Optional[str]:
    """A CUDA toolkit folder holding bin/nvcc and include/cuda_runtime.h, or None.

    Tries $CUDA_HOME, $CUDA_PATH, the folder above ``nvcc`` on PATH (following links and one-line
    ``exec`` wrapper scripts), /usr/local/cuda and /usr/local/cuda-*. For launching builds in a child
    process with CUDA_HOME set (torch reads CUDA_HOME once, at import)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        cands.append(str(real.parent.parent))
        try:
            text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 4096 else ""
        except OSError:
            text = ""
        for tok in text.split():
            if tok.endswith("/bin/nvcc"):
                cands.append(str(Path(tok).resolve().parent.parent))
    cands.append("/usr/local/cuda")
    cands.extend(sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True))
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return str(Path(c).resolve())
    return None


def compiler_available() -> bool:
    """Whether a C++ compiler is on PATH (the CPU build needs one)."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


__all__ = ["load", "load_cpu", "load_cuda", "build_dir", "source_hash", "last_error", "compiler_available",
           "find_cuda_home"]

"""Residual-VQ kernels: reference (PyTorch, the spec), gemm baseline, C++ CPU, CUDA; JIT loader."""

from evotok.ops.rvq import (IMPLS, RVQAssign, codes_agree, cpp_available, group_sums, resolve_impl, rvq_assign,
                            rvq_assign_ref)

__all__ = ["IMPLS", "RVQAssign", "rvq_assign", "rvq_assign_ref", "resolve_impl", "cpp_available", "codes_agree", "group_sums"]

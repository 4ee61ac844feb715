"""Depth transformer of the generation stage (RQ-Transformer style, DESIGN.md §1 "Generation").

For one image position it predicts the position's D = Lpix codes one after another. Its input at depth k
(0-based) is

    x_k = ctx_proj(h) + code_proj(z_k) + depth_emb[k],    z_k = q_0 + ... + q_{k-1}  (z_0 = 0)

with h the LM's hidden state at that position and q_j the tokenizer's code vector chosen at depth j. A
causal transformer over the D depths and one classifier per depth (K classes) give logits_k, which
depend only on the codes of depths < k.

Code embeddings are *tied to the tokenizer's codebooks*: the frozen (D, K, d) codebooks are a buffer and
one Linear(d -> width) embeds the cumulative code vector z_k. This is what the reference code does (it
embeds the tokenizer's code vectors and takes their cumulative sum); z_k is exactly the tokenizer's
partial reconstruction at depth k, the trajectory the method is about; and it costs d * width parameters
instead of D * K * width for learned tables (16 x 32768 x width at paper scale). Because the projection
is linear, it equals a learned per-depth table E_k[c] = W q_k[c] constrained to the codebook geometry.

Symbols: N rows (positions), D depths, K codes per depth, d code dimension, C context (LM hidden) width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from evotok.errors import UserError


class GenerationConfigError(UserError, ValueError):
    """A bad size in a generation-stage model config; the message names the field."""


def _check_positive(owner: str, **fields: int) -> None:
    for name, value in fields.items():
        if value < 1:
            raise GenerationConfigError(f"{owner}.{name} must be >= 1, got {value}")


def check_dropout(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise GenerationConfigError(f"{owner}.{name} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class DepthTransformerConfig:
    context_dim: int  # C: hidden size of the LM whose state the head reads
    depth: int  # D = Lpix code depths per position
    codebook_size: int  # K
    code_dim: int  # d
    width: int = 256
    layers: int = 6  # the paper's depth transformer has 6 layers
    heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(
            "DepthTransformerConfig", context_dim=self.context_dim, depth=self.depth,
            codebook_size=self.codebook_size, code_dim=self.code_dim, width=self.width,
            layers=self.layers, heads=self.heads,
        )
        if self.width % self.heads:
            raise GenerationConfigError(
                f"DepthTransformerConfig.width={self.width} is not a multiple of heads={self.heads}"
            )
        check_dropout("DepthTransformerConfig", "dropout", self.dropout)


def cumulative_code_vectors(codebooks_DKd: Tensor, codes_ND: Tensor) -> Tensor:
    """codes (..., k) with k <= D -> z (..., k, d): z[..., j, :] = sum of the code vectors of depths 0..j."""
    k = codes_ND.shape[-1]
    depth_ids = torch.arange(k, device=codes_ND.device)
    return codebooks_DKd[depth_ids, codes_ND].cumsum(dim=-2)


class _Block(nn.Module):
    """Pre-LN causal self-attention + GELU MLP over the depth axis."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x_NSC: Tensor) -> Tensor:
        N, S, C = x_NSC.shape
        q, k, v = self.qkv(self.ln1(x_NSC)).view(N, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x_NSC = x_NSC + self.drop(self.proj(a.transpose(1, 2).reshape(N, S, C)))
        return x_NSC + self.drop(self.mlp(self.ln2(x_NSC)))

    def step(self, x_NC: Tensor, kv_2NHDh: Tensor, k: int) -> Tensor:
        """Inference: the new depth-k token of every row attending to itself and the earlier depths, whose keys
        and values ``kv_2NHDh`` (preallocated for all D depths) holds; this token's are written at index k.

        The same function as :meth:`forward` on the prefix, written for the sampler's ~1k calls per image:
        functional calls on this block's weights (no module dispatch), and at depth 0, where the token's only key
        is its own, the attention output is its value (the softmax weight of a single key is exactly 1)."""
        N, C = x_NC.shape
        ln1, ln2, up, act, down = self.ln1, self.ln2, self.mlp[0], self.mlp[1], self.mlp[2]
        x_ln = F.layer_norm(x_NC, (C,), ln1.weight, ln1.bias, ln1.eps)
        qkv_N3Hh = F.linear(x_ln, self.qkv.weight, self.qkv.bias).view(N, 3, self.heads, C // self.heads)
        kv_2NHDh[:, :, :, k] = qkv_N3Hh[:, 1:].transpose(0, 1)
        if k == 0:
            a_NHh = qkv_N3Hh[:, 2]
        else:
            keys, values = kv_2NHDh[:, :, :, : k + 1]
            a_NHh = F.scaled_dot_product_attention(qkv_N3Hh[:, 0, :, None], keys, values)  # the newest sees all
        x_NC = x_NC + F.linear(a_NHh.reshape(N, C), self.proj.weight, self.proj.bias)
        h_NF = F.gelu(F.linear(F.layer_norm(x_NC, (C,), ln2.weight, ln2.bias, ln2.eps), up.weight, up.bias),
                      approximate=act.approximate)
        return x_NC + F.linear(h_NF, down.weight, down.bias)


def _cpp_step_fits(head: "DepthTransformer", x: Tensor) -> Optional[str]:
    """Why the C++ step cannot run this head on ``x`` (None if it can)."""
    from evotok.ops.steps import cpu_float32_no_grad

    norms = [m for block in head.blocks for m in (block.ln1, block.ln2)] + [head.ln_f]
    if len({m.eps for m in norms}) != 1 or any(block.mlp[1].approximate != "none" for block in head.blocks):
        return "it needs one LayerNorm eps and the exact GELU"
    return cpu_float32_no_grad(x)


class StepPlan(NamedTuple):
    """How a :class:`DepthCache` runs its steps, resolved once (:meth:`DepthTransformer.step_plan`) and shared by
    the caches of one sampling call: the implementation and, for "cpp", the blocks' weights in the kernel's order."""

    impl: str
    weights: list
    module: object = None  # the compiled extension, for "cpp"


def resolve_depth_step(impl: str, head: "DepthTransformer", x: Tensor) -> str:
    """The implementation ``impl`` (one of :data:`evotok.ops.steps.STEP_IMPLS`) runs as for ``head`` on ``x``."""
    from evotok.ops.steps import resolve_step

    return resolve_step(impl, None if impl == "torch" else _cpp_step_fits(head, x), "depth step")


class DepthCache:
    """Depth-by-depth sampling state of one batch of positions: every depth's input but its code term computed
    once, each block's keys and values of the depths so far (in buffers for all D depths), and z_k.
    ``logits()`` gives depth k's logits (N, K); ``push(codes_N)`` appends depth k's codes. Equals
    :meth:`DepthTransformer.logits_at` on the same prefix (eval mode), without recomputing the prefix.
    ``impl``: one of :data:`evotok.ops.steps.STEP_IMPLS` ("cpp": the whole step in one call of
    ``evotok/ops/csrc/depth_step_cpu.cpp``) or a :class:`StepPlan` (``self.impl`` is the one that runs)."""

    def __init__(self, head: "DepthTransformer", context_NC: Tensor, impl: "str | StepPlan" = "auto"):
        c = head.config
        N, self.head, self.k = len(context_NC), head, 0
        ctx_NC = head.ctx_proj(context_NC.to(head.ctx_proj.weight.dtype))
        self.x_DNC = ctx_NC + head.depth_emb_DC[:, None]  # every depth's input but its code term
        self.z_Nd = ctx_NC.new_zeros(N, c.code_dim)
        self.kv = [ctx_NC.new_empty(2, N, c.heads, c.depth, c.width // c.heads) for _ in head.blocks]
        plan = impl if isinstance(impl, StepPlan) else head.step_plan(impl, self.x_DNC)
        self.impl, self._weights, self._module = plan

    def logits(self) -> Tensor:
        h, k = self.head, self.k
        if k >= h.config.depth:
            raise ValueError(f"all {h.config.depth} depths are sampled")
        x_NC = (self.x_DNC[k] + F.linear(self.z_Nd, h.code_proj.weight, h.code_proj.bias)) if k else self.x_DNC[0]
        if self.impl == "cpp":
            return self._module.depth_step_cpu(
                x_NC, self.kv, k, self._weights, h.ln_f.weight, h.ln_f.bias, h.head_w_DCK[k], h.head_b_DK[k],
                h.config.heads, h.ln_f.eps)
        for block, kv in zip(h.blocks, self.kv):
            x_NC = block.step(x_NC, kv, k)
        ln_f = h.ln_f
        x_NC = F.layer_norm(x_NC, (x_NC.shape[1],), ln_f.weight, ln_f.bias, ln_f.eps)
        return torch.addmm(h.head_b_DK[k], x_NC, h.head_w_DCK[k])

    def push(self, codes_N: Tensor) -> None:
        self.z_Nd = self.z_Nd + self.head.codebooks_DKd[self.k, codes_N]
        self.k += 1


class DepthTransformer(nn.Module):
    """Causal transformer over the D code depths of one position; see the module docstring.

    ``codebooks_DKd``: the frozen tokenizer codebooks of the first D depths, kept as a (persistent) buffer
    so that a checkpoint carries the code geometry the head was trained with.
    """

    def __init__(self, config: DepthTransformerConfig, codebooks_DKd: Tensor):
        super().__init__()
        c = config
        if tuple(codebooks_DKd.shape) != (c.depth, c.codebook_size, c.code_dim):
            raise GenerationConfigError(
                f"codebooks_DKd has shape {tuple(codebooks_DKd.shape)}, the config expects "
                f"(depth, codebook_size, code_dim) = ({c.depth}, {c.codebook_size}, {c.code_dim})"
            )
        self.config = c
        self.register_buffer("codebooks_DKd", codebooks_DKd.detach().clone().float())
        self.ctx_proj = nn.Linear(c.context_dim, c.width)
        self.code_proj = nn.Linear(c.code_dim, c.width)
        self.depth_emb_DC = nn.Parameter(torch.randn(c.depth, c.width) * 0.02)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, c.dropout) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.head_w_DCK = nn.Parameter(torch.randn(c.depth, c.width, c.codebook_size) * 0.02)
        self.head_b_DK = nn.Parameter(torch.zeros(c.depth, c.codebook_size))

    def extra_repr(self) -> str:
        c = self.config
        return f"depth={c.depth}, codebook_size={c.codebook_size}, code_dim={c.code_dim}, width={c.width}"

    def _hidden(self, context_NC: Tensor, codes_Nk: Tensor) -> Tensor:
        """Transformer output (N, k + 1, width) for depths 0..k given the codes of depths < k."""
        N, k = codes_Nk.shape
        if k >= self.config.depth:
            raise ValueError(f"a prefix of {k} codes leaves no depth to predict (depth={self.config.depth})")
        ctx_N1C = self.ctx_proj(context_NC.to(self.ctx_proj.weight.dtype))[:, None]
        z_Nkd = cumulative_code_vectors(self.codebooks_DKd, codes_Nk)
        codes_in = torch.cat([ctx_N1C.new_zeros(N, 1, ctx_N1C.shape[-1]), self.code_proj(z_Nkd)], dim=1)
        x = self.drop(ctx_N1C + codes_in + self.depth_emb_DC[: k + 1])
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, context_NC: Tensor, codes_ND: Tensor) -> Tensor:
        """Teacher forcing: logits (N, D, K); logits[:, k] depend on codes_ND[:, :k] only (the last depth's
        code is never read)."""
        h_NDC = self._hidden(context_NC, codes_ND[:, :-1])
        return torch.einsum("ndc,dck->ndk", h_NDC, self.head_w_DCK) + self.head_b_DK

    def logits_at(self, context_NC: Tensor, codes_prefix_Nk: Tensor) -> Tensor:
        """Sampling step: logits (N, K) of depth k = codes_prefix_Nk.shape[1] (0 <= k < D), the prefix
        recomputed (the reference :meth:`cache` is tested against)."""
        k = codes_prefix_Nk.shape[1]
        h_NC = self._hidden(context_NC, codes_prefix_Nk)[:, -1]
        return h_NC @ self.head_w_DCK[k] + self.head_b_DK[k]

    def cache(self, context_NC: Tensor, impl: "str | StepPlan" = "auto") -> DepthCache:
        """Sampling with keys and values kept across depths (see :class:`DepthCache`)."""
        return DepthCache(self, context_NC, impl)

    def step_plan(self, impl: str, like: Tensor) -> StepPlan:
        """:class:`StepPlan` of ``impl`` for steps on tensors like ``like`` (dtype, device) in the current grad mode."""
        from evotok.ops.steps import cpu_module

        impl = resolve_depth_step(impl, self, like)
        if impl == "torch":
            return StepPlan(impl, [])
        weights = [w for b in self.blocks for w in (
            b.ln1.weight, b.ln1.bias, b.qkv.weight, b.qkv.bias, b.proj.weight, b.proj.bias, b.ln2.weight, b.ln2.bias,
            b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight, b.mlp[2].bias)]
        return StepPlan(impl, weights, cpu_module())

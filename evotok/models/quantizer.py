"""Residual vector quantizer with EMA codebooks, dead-code restarts and straight-through outputs.

Behaviour follows the paper's reference code, VisionXLab/EvoTok
``evotok/tokenizer/quantizer/shared_rq_quantizer.py`` (``VQEmbedding`` and ``SharedResidualQuantizer``,
called as in ``evotok/tokenizer/vq_model/evotok.py``; the paper's run uses ``--vq-warmup 2000
--restart-unused-codes``); what still differs is listed under "Deviations from the reference" below.

Per depth l = 1..L there is one codebook of K codes of dimension d (buffers, ``codebooks_LKd``). The
nearest-code assignment is :func:`evotok.ops.rvq_assign` (no N x K matrix); every z_l passes its
gradient straight through to the same input x.

Training-mode forward, in this order (all under ``no_grad`` except the outputs):

1. first training forward only: the residual inputs are pooled over all ranks (``all_gather``; N may
   differ per rank: sizes first, padded, trimmed). Rank 0 initialises the codebooks depth by depth on the
   pooled set with torch's global RNG -- K distinct pooled rows for depth 1 when the pooled count P >= K
   (only when P < K: every row once, then repeats with small Gaussian noise); the pooled set is assigned
   to them and its residuals feed depth 2, and so on -- and broadcasts the codebooks. Statistics start at
   size 1 and sum = code;
2. assignment with the current codebooks; all outputs use these codebooks;
3. EMA statistics (cluster sizes ``ema_size_LK`` and vector sums ``ema_sum_LKd``, accumulated with
   :func:`evotok.ops.rvq.group_sums` -- a C++ grouped sum on CPU, ``index_add_`` / ``bincount``
   elsewhere -- never a dense one-hot), summed over ranks with ``all_reduce`` when
   torch.distributed is initialised: ``s <- decay * s + (1 - decay) * batch``. The sizes always; the
   sums only once ``step >= ema_warmup``: during the warm-up they stay frozen (as in the reference);
4. every training step, warm-up included: codes <- ``ema_sum / clamp(laplace(ema_size), min=1)`` with
   ``laplace(n_k) = (n_k + eps) / (n + K eps) * n``, ``n = sum_k n_k``. So during the warm-up code
   vectors are NOT fixed: with frozen sums a code whose EMA size exceeds 1 is scaled down by that size
   (the reference's ``_update_embedding`` does exactly this);
5. every training step, warm-up included: every code whose EMA cluster size is below
   ``restart_threshold`` (0 disables restarts) is replaced by a random residual input of its depth in
   the batch, pooled over all ranks (indices drawn on rank 0 with the global RNG and broadcast; distinct
   rows while a depth has no more dead codes than pooled rows, else every row once and repeats with
   noise), and its statistics are reset to size ``max(1, restart_threshold)`` around the new vector;
6. ``step += 1``.

``l2_normalize`` normalises the input vectors to unit L2 norm before quantisation (z_l then
approximates the normalised x); code vectors are not renormalised because residuals below depth 1 are
not unit vectors.

Deviations from the reference (``shared_rq_quantizer.py``):

- Initialisation. The reference has none: its codes start as ``nn.Embedding``'s N(0, 1) rows with
  ``cluster_size_ema = 0``, so on the first step (nearly) every code is below size 1 and restarted from
  that step's pooled residuals -- in effect a first-batch init, except that depths >= 2 see residuals of
  the random N(0, 1) codes (each depth subtracts its pre-update codes). Ours draws explicitly, depth by
  depth, with the new codebooks (step 1 above).
- ``ema_warmup = 0`` means no warm-up here. The reference's guard ``vq_warmup > 0 and step >= vq_warmup``
  never accumulates the vector sums when ``vq_warmup = 0`` (the paper's run uses 2000, unaffected).
- Dead threshold: fixed at 1 in the reference (dead = ``cluster_size_ema < 1``, reset to 1; restarts
  switched by ``restart_unused_codes``); here ``restart_threshold`` (reset to ``max(1, threshold)``).
- Order of restart and code update: the reference writes restarts into the EMA buffers and then
  recomputes every code, so a restarted code is ``v / clamp(laplace(1), 1)`` (within 1e-5 relative of
  ``v``) and the Laplace total n includes the reset sizes; ours recomputes first and writes ``v`` exactly.
- Repeats: the reference's ``_tile_with_noise`` tiles whenever the pooled count is below K and adds
  uniform ``[0, 0.01 / sqrt(d))`` noise to every row, originals included; ours tiles only when more rows
  are needed than pooled (init: P < K; restarts: more dead codes of a depth than pooled rows), keeps the
  first copy of each row exact and adds zero-mean Gaussian noise of std ``INIT_NOISE * std(pool)``.
- Gathering: the reference's ``all_gather`` assumes equal N per rank; ours allows unequal N (the init
  pads and trims; restarts broadcast indices and sum the owning rank's rows, without a full gather).
- Kernels and precision: the reference builds the full N x K distance matrix with ``addmm`` and its
  per-code sums with a one-hot matmul (both bf16 under the paper's autocast); ours assigns without an
  N x K matrix, in float32, and sums with grouped sums. Argmin ties and rounding can differ. The Laplace
  smoothing (formula, eps = 1e-5, clamp at 1) and the decay are the reference's.
- Step counter: one per depth codebook in the reference, one here (``set_step`` wires the trainer's in).
- Outputs: the reference returns only the z of its two read-out depths, codebook usage over a sliding
  window of 131072 codes and distance norms; ours returns every depth's z, per-batch usage and
  perplexity. ``l2_normalize`` has no counterpart there (off by default).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from evotok.config import QuantizerConfig
from evotok.models.codestats import code_counts, perplexity_from_counts, usage_from_counts
from evotok.ops import IMPLS, rvq_assign
from evotok.ops.rvq import group_sums

LAPLACE_EPS = 1e-5
INIT_NOISE = 1e-3  # std of the noise on repeated rows (init with P < K, or restarts), relative to the pool's std


class QuantizerOutput(NamedTuple):
    z_cum: Tensor  # (L, *x.shape): cumulative sums z_1..z_L, each straight-through to x
    codes: Tensor  # int64, (B,h,w,L) for (B,d,h,w) input, (B,N,L) for (B,N,d) input
    commit_loss: Tensor  # scalar: mean over depths of mean((x - sg(zq_l))^2)
    usage_L: Tensor  # (L,) fraction of the K codes used in this batch (this rank), per depth
    perplexity_L: Tensor  # (L,) exp(entropy of the code histogram), per depth


def _cumsum_depths_(t_LNd: Tensor) -> Tensor:
    """In-place cumulative sum over depths, t_l += t_(l-1): one pass per depth, about 10x faster than
    ``cumsum(0)`` on (L, N, d) on CPU. Forward and decode_codes both use it, so z is bit-identical."""
    for l in range(1, t_LNd.shape[0]):
        t_LNd[l].add_(t_LNd[l - 1])
    return t_LNd


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _all_gather_rows(t_Nd: Tensor) -> Tensor:
    """Rows of every rank concatenated in rank order, (P, d) with P = sum of the ranks' N, identical on
    every rank. N may differ per rank: the sizes are gathered first, rows padded to the largest, trimmed."""
    if not _dist_on():
        return t_Nd
    ws = dist.get_world_size()
    n_1 = torch.tensor([t_Nd.shape[0]], dtype=torch.long, device=t_Nd.device)
    sizes_W = [torch.zeros_like(n_1) for _ in range(ws)]
    dist.all_gather(sizes_W, n_1)
    sizes = [int(s) for s in sizes_W]
    n_max = max(sizes)
    if n_max == 0:
        return t_Nd
    padded_Md = t_Nd.new_zeros(n_max, t_Nd.shape[1])
    padded_Md[: t_Nd.shape[0]] = t_Nd
    parts_W = [torch.empty_like(padded_Md) for _ in range(ws)]
    dist.all_gather(parts_W, padded_Md)
    return torch.cat([part[:n] for part, n in zip(parts_W, sizes)])


def _draw_pool_indices(P: int, m: int) -> Tensor:
    """m indices into a pool of P >= 1 rows from torch's global (CPU) RNG, int64 (m,) on CPU: distinct
    when m <= P; else all P rows once, in random order, then the same order repeated (the first P entries
    are exact rows; :func:`_noise_repeats_` perturbs the rest)."""
    perm_P = torch.randperm(P)
    return perm_P[:m] if m <= P else perm_P.repeat(-(-m // P))[:m]


def _noise_repeats_(rows_md: Tensor, P: int) -> Tensor:
    """In place: rows beyond the first P (repeats of a pool of P rows, see :func:`_draw_pool_indices`)
    get Gaussian noise of std INIT_NOISE * std(first P rows) (INIT_NOISE if that std is 0); global RNG."""
    m = rows_md.shape[0]
    if m > P:
        std = float(rows_md[:P].float().std(correction=0))
        scale = INIT_NOISE * (std if std > 0 else 1.0)
        noise = torch.randn(m - P, rows_md.shape[1]) * scale
        rows_md[P:] += noise.to(rows_md.device, rows_md.dtype)
    return rows_md


class ResidualQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig, depth: int):
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if cfg.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {cfg.codebook_size}")
        if cfg.dim < 1:
            raise ValueError(f"dim must be >= 1, got {cfg.dim}")
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
        if cfg.ema_warmup < 0:
            raise ValueError(f"ema_warmup must be >= 0, got {cfg.ema_warmup}")
        if cfg.restart_threshold < 0:
            raise ValueError(f"restart_threshold must be >= 0, got {cfg.restart_threshold}")
        if cfg.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {cfg.impl!r}")
        self.cfg = cfg
        self.depth = depth
        L, K, d = depth, cfg.codebook_size, cfg.dim
        self.register_buffer("codebooks_LKd", torch.zeros(L, K, d))
        self.register_buffer("ema_size_LK", torch.ones(L, K))
        self.register_buffer("ema_sum_LKd", torch.zeros(L, K, d))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_restarts_L: Tensor = torch.zeros(L, dtype=torch.long)  # restarts in the last update

    # ------------------------------------------------------------------------------------ helpers

    def set_step(self, step: int) -> None:
        """Wire the trainer's global step in (the warm-up reads it)."""
        self.step.fill_(int(step))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"depth={self.depth}, codebook_size={c.codebook_size}, dim={c.dim}, impl={c.impl!r}"

    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple]:
        d = self.cfg.dim
        if x.dim() == 4:
            if x.shape[1] != d:
                raise ValueError(f"x must have shape (B, {d}, h, w) or (B, N, {d}); got {tuple(x.shape)}")
            B, _, h, w = x.shape
            return x.permute(0, 2, 3, 1).reshape(B * h * w, d), ("bdhw", B, h, w)
        if x.dim() == 3:
            if x.shape[2] != d:
                raise ValueError(f"x must have shape (B, {d}, h, w) or (B, N, {d}); got {tuple(x.shape)}")
            B, N, _ = x.shape
            return x.reshape(B * N, d), ("bnd", B, N)
        raise ValueError(f"x must have shape (B, {d}, h, w) or (B, N, {d}); got {tuple(x.shape)}")

    @staticmethod
    def _unflatten(t_Nd: Tensor, layout: tuple) -> Tensor:
        """(..., N, c) -> (..., B, c, h, w) or (..., B, N, c)."""
        lead = t_Nd.shape[:-2]
        c = t_Nd.shape[-1]
        if layout[0] == "bdhw":
            _, B, h, w = layout
            t = t_Nd.reshape(*lead, B, h, w, c)
            nl = len(lead)
            return t.permute(*range(nl), nl, nl + 3, nl + 1, nl + 2)
        _, B, N = layout
        return t_Nd.reshape(*lead, B, N, c)

    def _flat_index(self, codes_NL: Tensor) -> Tensor:
        """(N, L') codes -> (L' * N,) rows of the (L * K, d) flattened codebooks, depth-major."""
        L = codes_NL.shape[1]
        offs = torch.arange(L, device=codes_NL.device) * self.cfg.codebook_size
        return (codes_NL.T + offs[:, None]).reshape(-1)

    def _gather_LNd(self, codes_NL: Tensor) -> Tensor:
        """Code vectors (L', N, d) of (N, L') codes."""
        L, N = codes_NL.shape[1], codes_NL.shape[0]
        flat = self.codebooks_LKd.view(-1, self.cfg.dim)
        return flat.index_select(0, self._flat_index(codes_NL)).view(L, N, self.cfg.dim)

    # ------------------------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> QuantizerOutput:
        x_Nd, layout = self._flatten(x)
        if self.cfg.l2_normalize:
            x_Nd = F.normalize(x_Nd, dim=-1)
        L, K = self.depth, self.cfg.codebook_size
        with torch.no_grad():
            xf = x_Nd.detach().float()
            if self.training and not bool(self.initialized):
                self._init_codebooks(xf)
            codes_NL = rvq_assign(xf, self.codebooks_LKd, impl=self.cfg.impl).codes_NL
            flat_idx = self._flat_index(codes_NL)  # (L*N,)
            zq_LNd = self.codebooks_LKd.view(-1, self.cfg.dim).index_select(0, flat_idx)
            zq_LNd = _cumsum_depths_(zq_LNd.view(L, -1, self.cfg.dim))  # cumulative quantised values
            if self.training:
                counts_LK = self._ema_update(xf, zq_LNd, flat_idx)
                self.step.add_(1)
            else:
                counts_LK = code_counts(codes_NL, L, K)
            usage_L = usage_from_counts(counts_LK).float()
            perplexity_L = perplexity_from_counts(counts_LK).float()
        zq_LNd = zq_LNd.to(x_Nd.dtype)
        commit_loss = F.mse_loss(x_Nd[None].expand_as(zq_LNd), zq_LNd)  # = mean over depths of the means
        # value exactly zq_l (so decode_codes rebuilds it bit for bit), gradient the identity to x
        z_LNd = zq_LNd + (x_Nd - x_Nd.detach())[None]
        z_cum = self._unflatten(z_LNd, layout)
        if layout[0] == "bdhw":
            codes = codes_NL.reshape(layout[1], layout[2], layout[3], L)
        else:
            codes = codes_NL.reshape(layout[1], layout[2], L)
        return QuantizerOutput(z_cum, codes, commit_loss, usage_L, perplexity_L)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, depth: Optional[int] = None) -> Tensor:
        """z_depth from codes: (B,h,w,L') -> (B,d,h,w); (B,N,L') -> (B,N,d). depth defaults to L'."""
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError("codes must be an int64 (or int32) tensor")
        if codes.dim() not in (3, 4):
            raise ValueError(f"codes must have shape (B, h, w, L') or (B, N, L'); got {tuple(codes.shape)}")
        Lc = codes.shape[-1]
        if Lc > self.depth:
            raise ValueError(f"codes have {Lc} depths but the quantizer has depth {self.depth}")
        depth = Lc if depth is None else depth
        if not isinstance(depth, int) or not 1 <= depth <= min(Lc, self.depth):
            raise ValueError(
                f"depth must be an int in [1, {min(Lc, self.depth)}] (codes have {Lc} depths, the quantizer "
                f"{self.depth}); got {depth!r}"
            )
        K = self.cfg.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(f"codes must lie in [0, {K}); got values in [{int(codes.min())}, {int(codes.max())}]")
        codes_NL = codes.reshape(-1, Lc)[:, :depth].long()
        zq_Nd = _cumsum_depths_(self._gather_LNd(codes_NL))[-1]  # the same ops as forward: bit-identical z
        if codes.dim() == 4:
            B, h, w = codes.shape[:3]
            return self._unflatten(zq_Nd, ("bdhw", B, h, w))
        B, N = codes.shape[:2]
        return self._unflatten(zq_Nd, ("bnd", B, N))

    # ---------------------------------------------------------------------------------- learning

    @torch.no_grad()
    def _init_codebooks(self, x_Nd: Tensor) -> None:
        """First training batch -> codebooks, from the inputs of ALL ranks; identical on every rank after.

        The inputs are pooled (``all_gather``, unequal N per rank allowed) into P rows. Rank 0 then, depth by
        depth, draws depth l's K rows from the pooled depth-l residuals with the global RNG (K distinct rows
        when P >= K; else all P rows once and K - P noisy repeats), assigns the pooled residuals to them and
        passes the new residuals to depth l + 1; its codebooks are broadcast. Statistics: size 1, sum = code.
        Raises ValueError when the batch is empty on every rank."""
        L, K = self.depth, self.cfg.codebook_size
        pool_Pd = _all_gather_rows(x_Nd)
        P = pool_Pd.shape[0]
        if P == 0:
            raise ValueError("the first training batch is empty (on every rank); codebooks are initialised from it")
        if _rank() == 0:
            r_Pd = pool_Pd
            for l in range(L):
                idx_K = _draw_pool_indices(P, K).to(r_Pd.device)
                rows_Kd = _noise_repeats_(r_Pd.index_select(0, idx_K), P)
                self.codebooks_LKd[l].copy_(rows_Kd)
                if l + 1 < L:
                    r_Pd = rvq_assign(r_Pd, rows_Kd[None], impl=self.cfg.impl).residual_Nd
        if _dist_on():
            dist.broadcast(self.codebooks_LKd, src=0)
        self.ema_size_LK.fill_(1.0)
        self.ema_sum_LKd.copy_(self.codebooks_LKd)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, x_Nd: Tensor, zq_LNd: Tensor, flat_idx: Tensor) -> Tensor:
        """EMA step, code update and restarts (module docstring, steps 3-5); returns this rank's counts (L, K).

        Warm-up (``step < ema_warmup``): the sizes accumulate, the sums stay frozen, codes are recomputed
        from them and dead codes are restarted, as in the reference."""
        L, K, d = self.depth, self.cfg.codebook_size, self.cfg.dim
        decay = self.cfg.ema_decay
        warm_up = int(self.step) < self.cfg.ema_warmup
        # residual inputs of each depth: r_0 = x, r_l = x - zq_l
        r_LNd = torch.empty_like(zq_LNd)
        r_LNd[0] = x_Nd
        torch.sub(x_Nd[None], zq_LNd[:-1], out=r_LNd[1:])
        sums, counts = group_sums(flat_idx, r_LNd.reshape(-1, d), L * K)
        counts_LK = counts.view(L, K).clone()
        if _dist_on():
            dist.all_reduce(counts)
            if not warm_up:
                dist.all_reduce(sums)
        self.ema_size_LK.mul_(decay).add_(counts.view(L, K), alpha=1 - decay)
        if not warm_up:
            self.ema_sum_LKd.mul_(decay).add_(sums.view(L, K, d), alpha=1 - decay)
        n = self.ema_size_LK.sum(dim=1, keepdim=True)
        size = (self.ema_size_LK + LAPLACE_EPS) / (n + K * LAPLACE_EPS) * n
        self.codebooks_LKd.copy_(self.ema_sum_LKd / size.clamp_min(1.0)[..., None])
        self._restart_dead(r_LNd)
        return counts_LK

    @torch.no_grad()
    def _restart_dead(self, r_LNd: Tensor) -> None:
        """Replace codes whose EMA size < restart_threshold by random residual inputs of their depth.

        The m dead codes of depth l get m rows of depth l's residual inputs pooled over all ranks (P rows):
        rank 0 draws the indices (distinct when m <= P; else all P once, then noisy repeats) and broadcasts
        them; each rank contributes the rows it owns and an ``all_reduce`` assembles them. Sets
        ``last_restarts_L`` (dead codes per depth, identical on every rank)."""
        thr = self.cfg.restart_threshold
        dead_LK = self.ema_size_LK < thr  # identical on every rank (synchronised statistics)
        n_dead_L = dead_LK.sum(dim=1)
        total_dead = int(n_dead_L.sum())
        L, N_local, d = r_LNd.shape
        self.last_restarts_L = torch.zeros(L, dtype=torch.long)
        if total_dead == 0:
            return
        dev = r_LNd.device
        if _dist_on():
            ws, rank = dist.get_world_size(), dist.get_rank()
            sizes = torch.zeros(ws, dtype=torch.long, device=dev)
            sizes[rank] = N_local
            dist.all_reduce(sizes)
            sizes = sizes.cpu()
        else:
            rank, sizes = 0, torch.tensor([N_local])
        N_total = int(sizes.sum())
        if N_total == 0:  # the batch is empty on every rank: nothing to restart from
            return
        self.last_restarts_L = n_dead_L.cpu()
        offset = int(sizes[:rank].sum())
        m_L = [int(m) for m in n_dead_L]
        # rank 0 draws, per dead code, an index into its depth's pooled residual inputs
        pick = torch.zeros(total_dead, dtype=torch.long)
        if rank == 0:
            pick = torch.cat([_draw_pool_indices(N_total, m) for m in m_L if m])
        pick = pick.to(dev)
        depth_of = torch.repeat_interleave(torch.arange(L, device=dev), n_dead_L.to(dev))
        if _dist_on():
            dist.broadcast(pick, src=0)
        local = pick - offset
        if N_local:
            rows = depth_of * N_local + local.clamp(0, N_local - 1)
            vecs = r_LNd.reshape(L * N_local, d).index_select(0, rows).float()
        else:
            vecs = torch.zeros(total_dead, d, device=dev)
        if _dist_on():
            mine = (local >= 0) & (local < N_local)
            vecs = vecs * mine[:, None]
            dist.all_reduce(vecs)  # exactly one rank contributes each row
        if max(m_L) > N_total:  # repeats: rank 0 adds the noise, its rows are broadcast
            if rank == 0:
                start = 0
                for m in m_L:
                    _noise_repeats_(vecs[start:start + m], N_total)
                    start += m
            if _dist_on():
                dist.broadcast(vecs, src=0)
        flat = dead_LK.reshape(-1).nonzero()[:, 0]  # row-major: matches depth_of's order
        reset = max(1.0, thr)
        K = self.cfg.codebook_size
        self.codebooks_LKd.view(L * K, d).index_copy_(0, flat, vecs)
        self.ema_size_LK.view(L * K).index_fill_(0, flat, reset)
        self.ema_sum_LKd.view(L * K, d).index_copy_(0, flat, vecs * reset)

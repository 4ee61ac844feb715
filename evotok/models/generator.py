"""Image generation model: a Hugging Face causal LM + code projector + depth transformer (DESIGN.md §1).

Sequence seen by the LM for one row (P = h*w image positions, row-major):

    [prompt tokens (T, padded)] [begin-of-image] [code_proj(z_Lpix) of positions 0 .. P-2]

so the LM's last hidden state at the begin-of-image slot predicts position 0, and at the slot of
position p-1 predicts position p; the depth transformer turns each hidden state into the position's
Lpix codes. z_Lpix is the cumulative sum of the position's Lpix code vectors in the frozen tokenizer's
codebooks (the reference code's input, unlike a vocabulary extended with code tokens).

Padding: prompts may be padded on either side. Pad slots get attention mask 0 (no query attends to
them) and position ids come from the cumulative sum of the mask, so a row's real tokens see exactly the
positions they would see unpadded. Training batches are right-padded; generation batches left-padded.

Sampling runs the [conditional; unconditional] rows in one batch with the LM's KV cache
(``transformers.DynamicCache``) across positions, the depth transformer depth by depth with CFG on the
logits at every depth, and feeds the sampled code to both halves.

Symbols: B batch, T prompt length, P positions, D = Lpix depths, K codes per depth, d code dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from evotok.models.depth_transformer import (
    DepthTransformer,
    DepthTransformerConfig,
    GenerationConfigError,
    StepPlan,
    check_dropout,
    cumulative_code_vectors,
)
from evotok.models.sampling import (
    SamplingError,
    cfg_logits,
    check_cfg_scale,
    check_temperature,
    check_top_k,
    check_top_p,
    per_depth,
    sample,
)
from evotok.ops.steps import STEP_IMPLS


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes of the parts the generator adds to the LM (the LM and the codebooks are passed in)."""

    lpix: int = 4  # D: code depths generated per position (the first lpix tokenizer codebooks)
    head_width: int = 256
    head_layers: int = 6
    head_heads: int = 4
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lpix", "head_width", "head_layers", "head_heads"):
            if getattr(self, name) < 1:
                raise GenerationConfigError(f"GeneratorConfig.{name} must be >= 1, got {getattr(self, name)}")
        check_dropout("GeneratorConfig", "head_dropout", self.head_dropout)

    def head_config(self, context_dim: int, codebook_size: int, code_dim: int) -> DepthTransformerConfig:
        return DepthTransformerConfig(
            context_dim=context_dim, depth=self.lpix, codebook_size=codebook_size, code_dim=code_dim,
            width=self.head_width, layers=self.head_layers, heads=self.head_heads, dropout=self.head_dropout,
        )


DECODE_IMPLS = ("auto", "hf", "lean")


class GenOutput(NamedTuple):
    loss: Tensor  # (): mean of ce_per_depth_D
    ce_per_depth_D: Tensor  # (D,): cross-entropy per depth, mean over rows and positions
    logits: Tensor  # (B, P, D, K)


def positions_from_mask(mask_BT: Tensor) -> Tensor:
    """Position ids that skip pad slots: the number of real tokens before each slot (pads repeat it)."""
    return (mask_BT.long().cumsum(dim=-1) - 1).clamp_min(0)


def _left_pad(ids_BT: Tensor, mask_BT: Tensor, length: int) -> tuple[Tensor, Tensor]:
    pad = length - ids_BT.shape[1]
    return F.pad(ids_BT, (pad, 0)), F.pad(mask_BT, (pad, 0))


class ImageGenerator(nn.Module):
    """``lm``: a transformers causal LM (its body is ``lm.base_model``, its token embeddings
    ``lm.get_input_embeddings()``). ``codebooks_LKd``: the frozen tokenizer codebooks (L >= lpix)."""

    def __init__(self, config: GeneratorConfig, lm: nn.Module, codebooks_LKd: Tensor):
        super().__init__()
        if codebooks_LKd.ndim != 3 or codebooks_LKd.shape[0] < config.lpix:
            raise GenerationConfigError(
                f"codebooks_LKd must have shape (L, K, d) with L >= GeneratorConfig.lpix={config.lpix}, "
                f"got {tuple(codebooks_LKd.shape)}"
            )
        self.config = config
        self.lm = lm
        hidden = lm.get_input_embeddings().embedding_dim
        _, K, d = codebooks_LKd.shape
        self.code_proj = nn.Linear(d, hidden)
        self.boi = nn.Parameter(torch.randn(hidden) * 0.02)
        # the head owns the (non-trainable) codebook buffer; the generator reads it from there
        self.head = DepthTransformer(config.head_config(hidden, K, d), codebooks_LKd[: config.lpix])

    @property
    def codebooks_DKd(self) -> Tensor:
        return self.head.codebooks_DKd

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group for per-group learning rates (phase 1: projector + head; phase 2: all).
        The LM group includes its lm_head, which the generation loss never reaches."""
        return {
            "projector": [*self.code_proj.parameters(), self.boi],
            "head": list(self.head.parameters()),
            "lm": list(self.lm.parameters()),
        }

    # -- pieces -----------------------------------------------------------------------------------------
    def _embed_tokens(self, ids_BT: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(ids_BT)

    def _embed_codes(self, codes_ND: Tensor, dtype: torch.dtype) -> Tensor:
        """codes (..., D) -> code_proj(z_Lpix) (..., hidden)."""
        z_Nd = cumulative_code_vectors(self.codebooks_DKd, codes_ND)[..., -1, :]
        return self.code_proj(z_Nd).to(dtype)

    def _boi(self, rows: int, dtype: torch.dtype) -> Tensor:
        return self.boi.to(dtype).expand(rows, 1, -1)

    def _lm_hidden(self, embeds_BSH: Tensor, mask_BS: Tensor, position_ids_BS: Tensor, cache=None) -> Tensor:
        """Last hidden states (B, S, hidden) of the LM body for the new slots; ``cache`` is extended in place."""
        out = self.lm.base_model(
            inputs_embeds=embeds_BSH, attention_mask=mask_BS, position_ids=position_ids_BS,
            cache=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state

    def _lean_decode(self, decode_impl: str) -> bool:
        from evotok.models.lm_decode import lean_decode_supported

        if decode_impl not in DECODE_IMPLS:
            raise SamplingError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
        if decode_impl == "hf":
            return False
        why_not = lean_decode_supported(self.lm)
        if why_not and decode_impl == "lean":
            raise SamplingError(f"decode_impl='lean' does not support this LM: {why_not}; use 'hf' or 'auto'")
        return why_not is None

    # -- teacher forcing --------------------------------------------------------------------------------
    def forward(self, prompt_ids_BT: Tensor, prompt_mask_BT: Tensor, codes_BHWD: Tensor) -> GenOutput:
        """Cross-entropy of the codes given the prompt. ``codes_BHWD`` may hold more than lpix depths
        (a codes cache of all L depths); the first lpix are used."""
        D = self.config.lpix
        B, H, W, L = codes_BHWD.shape
        if L < D:
            raise ValueError(f"codes_BHWD has {L} depths, the generator predicts lpix={D}")
        P, T = H * W, prompt_ids_BT.shape[1]
        codes_BPD = codes_BHWD[..., :D].reshape(B, P, D)
        tok = self._embed_tokens(prompt_ids_BT)
        embeds = torch.cat([tok, self._boi(B, tok.dtype), self._embed_codes(codes_BPD[:, :-1], tok.dtype)], dim=1)
        mask = torch.cat([prompt_mask_BT.long(), prompt_mask_BT.new_ones(B, P).long()], dim=1)
        hidden_BPH = self._lm_hidden(embeds, mask, positions_from_mask(mask))[:, T:]
        logits_NDK = self.head(hidden_BPH.reshape(B * P, -1), codes_BPD.reshape(B * P, D))
        ce_ND = F.cross_entropy(logits_NDK.float().flatten(0, 1), codes_BPD.reshape(-1), reduction="none")
        ce_D = ce_ND.view(B * P, D).mean(dim=0)
        return GenOutput(ce_D.mean(), ce_D, logits_NDK.view(B, P, D, -1))

    # -- sampling ---------------------------------------------------------------------------------------
    def _sample_depths(
        self, hidden_RH: Tensor, cfg_scale: Optional[float], temperature: float,
        top_k_D: list, top_p_D: list, generator: Optional[torch.Generator], use_cache: bool = True,
        depth_plan: "str | StepPlan" = "auto",
    ) -> Tensor:
        """Codes (B, D) of one position from its LM hidden states: R = 2B rows [cond; uncond] when
        ``cfg_scale`` is given, else R = B conditional rows. ``use_cache``: the depth transformer keeps its keys
        and values across depths (else it recomputes the prefix at every depth)."""
        cache = self.head.cache(hidden_RH, depth_plan) if use_cache else None
        codes_RD = None if use_cache else hidden_RH.new_zeros(hidden_RH.shape[0], 0, dtype=torch.long)  # the prefix
        columns = []
        for k in range(self.config.lpix):
            logits = cache.logits() if cache is not None else self.head.logits_at(hidden_RH, codes_RD)
            if cfg_scale is not None:
                logits = cfg_logits(logits, cfg_scale)
            ids_B = sample(logits, temperature, top_k_D[k], top_p_D[k], generator)
            columns.append(ids_B)
            ids_R = torch.cat([ids_B, ids_B]) if cfg_scale is not None else ids_B  # both CFG halves
            if cache is not None:
                cache.push(ids_R)
            else:
                codes_RD = torch.cat([codes_RD, ids_R[:, None]], dim=1)
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids_BT: Tensor,
        prompt_mask_BT: Tensor,
        uncond_ids_BT: Optional[Tensor] = None,
        uncond_mask_BT: Optional[Tensor] = None,
        *,
        n_positions: int,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: Union[int, Sequence[int]] = 0,
        top_p: Union[float, Sequence[float]] = 1.0,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
        decode_impl: str = "auto",
        step_impl: str = "auto",
    ) -> Tensor:
        """Sample codes (B, n_positions, D) row-major. Call ``eval()`` first (dropout is the caller's mode).

        ``uncond_*``: the unconditional prompts (B rows, or 1 row for all, e.g. an empty turn), needed
        when ``cfg_scale != 1``. At ``cfg_scale == 1`` CFG is the conditional logits exactly, so the
        unconditional half is not run and the result is the same with or without it. top_k / top_p:
        one value or one per depth. ``use_cache=False`` re-runs the whole sequence at every position and
        the depth transformer's prefix at every depth (the reference the KV caches are tested against).
        ``decode_impl`` (with the cache): "hf" runs every position through the LM's own forward and
        ``DynamicCache``; "lean" through :class:`~evotok.models.lm_decode.LeanDecoder` (Llama / Qwen2-style LMs:
        the same function with less bookkeeping per step); "auto" takes "lean" where it is supported.
        ``step_impl`` (with the cache): how the depth transformer's steps and the lean LM steps run, "torch", "cpp"
        (one call of the CPU extension per step) or "auto" ("cpp" where it applies), see
        :mod:`evotok.ops.steps`. Deterministic for a fixed ``generator``.
        """
        D = self.config.lpix
        cfg_scale, temperature = check_cfg_scale(cfg_scale), check_temperature(temperature)
        top_k_D = [check_top_k(k, "top_k") for k in per_depth(top_k, D, "top_k")]
        top_p_D = [check_top_p(p, "top_p") for p in per_depth(top_p, D, "top_p")]
        if n_positions < 1:
            raise SamplingError(f"n_positions must be >= 1, got {n_positions}")
        use_lean = self._lean_decode(decode_impl) and use_cache
        if step_impl not in STEP_IMPLS:
            raise SamplingError(f"step_impl must be one of {STEP_IMPLS}, got {step_impl!r}")
        depth_plan = self.head.step_plan(step_impl, self.head.depth_emb_DC) if use_cache else "torch"
        B = prompt_ids_BT.shape[0]
        ids, mask = prompt_ids_BT, prompt_mask_BT.long()
        guided = cfg_scale != 1.0
        if guided:
            if uncond_ids_BT is None or uncond_mask_BT is None:
                raise SamplingError(f"cfg_scale={cfg_scale} needs uncond_ids_BT and uncond_mask_BT (the empty prompt)")
            u_ids, u_mask = uncond_ids_BT, uncond_mask_BT.long()
            if u_ids.shape[0] == 1:
                u_ids, u_mask = u_ids.expand(B, -1), u_mask.expand(B, -1)
            if u_ids.shape[0] != B:
                raise SamplingError(f"uncond_ids_BT has {u_ids.shape[0]} rows, expected 1 or {B} (as prompt_ids_BT)")
            T = max(ids.shape[1], u_ids.shape[1])
            (ids, mask), (u_ids, u_mask) = _left_pad(ids, mask, T), _left_pad(u_ids, u_mask, T)
            ids, mask = torch.cat([ids, u_ids]), torch.cat([mask, u_mask])
        R = ids.shape[0]
        tok = self._embed_tokens(ids)
        embeds = torch.cat([tok, self._boi(R, tok.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(R, 1)], dim=1)
        positions = positions_from_mask(mask)
        cache = None
        if use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.config)
        hidden_RH = self._lm_hidden(embeds, mask, positions, cache)[:, -1]
        decoder = None
        if use_lean:
            from evotok.models.lm_decode import LeanDecoder

            decoder = LeanDecoder(self.lm.base_model, cache, mask, capacity=mask.shape[1] + n_positions - 1,
                                  impl=step_impl)
        out = []
        for p in range(n_positions):
            codes_BD = self._sample_depths(
                hidden_RH, cfg_scale if guided else None, temperature, top_k_D, top_p_D, generator, use_cache,
                depth_plan,
            )
            out.append(codes_BD)
            if p == n_positions - 1:
                break
            x_R1H = self._embed_codes(codes_BD, tok.dtype).repeat(R // B, 1)[:, None]  # both CFG halves
            if decoder is not None:
                positions = positions[:, -1:] + 1
                hidden_RH = decoder.step(x_R1H[:, 0], positions[:, 0])
                continue
            mask = torch.cat([mask, mask.new_ones(R, 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            if use_cache:
                hidden_RH = self._lm_hidden(x_R1H, mask, positions[:, -1:], cache)[:, -1]
            else:
                embeds = torch.cat([embeds, x_R1H], dim=1)
                hidden_RH = self._lm_hidden(embeds, mask, positions)[:, -1]
        return torch.stack(out, dim=1)

"""The understanding bridge (DESIGN.md §1, LLaVA-1.5 recipe): frozen EvoTok tokenizer -> feature source -> MLP
projector (``mlp2x_gelu``) -> the LM's input embeddings at the ``<image>`` placeholder positions.

Feature sources: ``semantic`` = the semantic decoder's output from z_l, (B, h*w, teacher_width) (the reference
code's choice, at l = Lsem); ``latent`` = z_l itself as h*w tokens, (B, h*w, d). Features depend only on the
image and the frozen tokenizer, so they can be computed once per item and cached; :class:`MultimodalLM` takes
them precomputed, or computes them from images when it holds an :class:`ImageFeatures`.

Symbols: B batch, T sequence, N image tokens (= h*w), C channels, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from evotok.errors import UserError
from evotok.models.conversation import LMBatch, SpecialIds, position_ids_from_mask, special_ids

FEATURE_KINDS = ("semantic", "latent")


class BridgeError(UserError, ValueError):
    """Image features that do not fit the batch or the tokenizer; the message says what disagrees."""


# ------------------------------------------------------------------------------------------ features


@dataclass(frozen=True)
class FeatureSource:
    """Which tokenizer representation feeds the LM: ``kind`` in FEATURE_KINDS, ``depth`` l in 1..L, or 0 for the
    tokenizer's own attach point (Lsem for semantic, Lpix for latent)."""

    kind: str = "semantic"
    depth: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise BridgeError(f"feature source kind must be one of {', '.join(FEATURE_KINDS)}, got {self.kind!r}")
        if int(self.depth) < 0:
            raise BridgeError(f"feature source depth must be >= 0 (0 = the tokenizer's attach point), got {self.depth}")

    def resolve_depth(self, tokenizer) -> int:
        default = tokenizer.lsem if self.kind == "semantic" else tokenizer.lpix
        depth = int(self.depth) or int(default)
        if depth > tokenizer.depth:
            raise BridgeError(f"feature source depth={depth} exceeds the tokenizer's L={tokenizer.depth}")
        return depth

    def width(self, tokenizer) -> int:
        """C of the features: the teacher width (semantic) or the code dimension d (latent)."""
        return int(tokenizer.teacher_width) if self.kind == "semantic" else int(tokenizer.quantizer.codebooks_LKd.shape[-1])

    def n_tokens(self, tokenizer) -> int:
        h, w = tokenizer.grid
        return h * w


@torch.no_grad()
def extract_features(tokenizer, source: FeatureSource, images_BCHW: torch.Tensor) -> torch.Tensor:
    """Features (B, h*w, C) of a batch of images in [0, 1] from a tokenizer in eval mode (train mode would
    update its EMA codebooks)."""
    if tokenizer.training:
        raise BridgeError("extract_features: the tokenizer is in train mode; call tokenizer.eval() (it is frozen)")
    depth = source.resolve_depth(tokenizer)
    z_Bdhw = tokenizer.cumulative(images_BCHW)[depth - 1]
    if source.kind == "semantic":
        return tokenizer.decode_semantic(z_Bdhw)
    return z_Bdhw.flatten(2).transpose(1, 2).contiguous()


class ImageFeatures(nn.Module):
    """A frozen EvoTok tokenizer plus a feature source: images -> features (B, N, C), no gradients. Stays in eval
    mode whatever ``train()`` is called with."""

    def __init__(self, tokenizer: nn.Module, source: FeatureSource):
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.source = source
        self.depth = source.resolve_depth(tokenizer)
        self.width, self.n_tokens = source.width(tokenizer), source.n_tokens(tokenizer)

    def train(self, mode: bool = True) -> "ImageFeatures":
        super().train(mode)
        self.tokenizer.eval()
        return self

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return extract_features(self.tokenizer, self.source, images_BCHW)


# ------------------------------------------------------------------------------------------ projector, splice


class Projector(nn.Module):
    """LLaVA's ``mlp2x_gelu``: Linear(in, hidden) - GELU - Linear(hidden, hidden), hidden = the LM's width."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_dim, self.hidden = int(in_dim), int(hidden)
        self.fc1 = nn.Linear(self.in_dim, self.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.hidden, self.hidden)

    def forward(self, features_BNC: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features_BNC)))


def splice_image_features(
    inputs_embeds_BTC: torch.Tensor, image_mask_BT: torch.Tensor, features_BNC: torch.Tensor,
) -> torch.Tensor:
    """Janus-style fixed-length scatter: a copy of ``inputs_embeds_BTC`` whose placeholder positions hold the
    features, image i of ``features_BNC`` going to the i-th row that has placeholders. Every row has either no
    placeholder or exactly N; gradients flow into the features."""
    B, T, C = inputs_embeds_BTC.shape
    if image_mask_BT.shape != (B, T):
        raise BridgeError(f"image mask {tuple(image_mask_BT.shape)} does not match the embeddings' (B, T)={(B, T)}")
    mask = image_mask_BT.bool()
    per_row = mask.sum(-1)
    rows = per_row > 0
    if features_BNC is None:
        if rows.any():
            raise BridgeError(f"{int(rows.sum())} row(s) have image placeholders but no image features were given")
        return inputs_embeds_BTC
    if features_BNC.ndim != 3 or features_BNC.shape[-1] != C:
        raise BridgeError(f"image features must be (B, N, C={C}), got {tuple(features_BNC.shape)}")
    n_img, N = features_BNC.shape[:2]
    bad = [(b, int(n)) for b, n in enumerate(per_row.tolist()) if n not in (0, N)]
    if bad:
        raise BridgeError(f"each row needs 0 or exactly N={N} image placeholders; rows (index, count) {bad[:4]}")
    if int(rows.sum()) != n_img:
        raise BridgeError(f"{int(rows.sum())} row(s) have image placeholders but {n_img} image(s) of features were given")
    out = inputs_embeds_BTC.clone()
    out[mask] = features_BNC.reshape(n_img * N, C).to(out.dtype)
    return out


# ------------------------------------------------------------------------------------------ the multimodal LM


class MLLMOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over the labelled tokens (HF shifts the labels)
    logits_BTV: torch.Tensor


class Generated(NamedTuple):
    tokens_BT: torch.Tensor  # new tokens, the stop token included; pad id after it
    logprobs_BT: torch.Tensor  # log-probability of each chosen token; 0 after the stop token
    lengths_B: torch.Tensor  # new tokens before the stop token (the answer's length)


class MultimodalLM(nn.Module):
    """A HF causal LM, a projector and, optionally, the frozen image feature source.

    ``forward(batch, features_BNC)`` and ``generate(batch, features_BNC)`` take the raw (unprojected) features,
    cached or from :meth:`image_features`. The feature source, when held, is a submodule (it moves with
    ``.to()`` and its weights are in ``state_dict``) but it is frozen and in no parameter group."""

    def __init__(self, lm: nn.Module, projector: Projector, ids: SpecialIds, features: Optional[ImageFeatures] = None):
        super().__init__()
        hidden = lm.get_input_embeddings().embedding_dim
        if projector.hidden != hidden:
            raise BridgeError(f"projector output {projector.hidden} != the LM's hidden size {hidden}")
        if features is not None and features.width != projector.in_dim:
            raise BridgeError(f"projector input {projector.in_dim} != the feature width {features.width}")
        self.lm, self.projector, self.features, self.ids = lm, projector, features, ids
        self.stop_ids = tuple(sorted({ids.im_end, ids.eos}))

    def image_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            raise BridgeError("this MultimodalLM holds no tokenizer: pass precomputed features instead of images")
        return self.features(images_BCHW)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group, for per-group learning rates (the frozen tokenizer is in none)."""
        return {"projector": list(self.projector.parameters()), "lm": list(self.lm.parameters())}

    def embed(self, batch: LMBatch, features_BNC: Optional[torch.Tensor]) -> torch.Tensor:
        """The LM's input embeddings (B, T, hidden) with the projected features at the placeholders."""
        embeds_BTC = self.lm.get_input_embeddings()(batch.input_ids_BT)
        projected = None if features_BNC is None else self.projector(features_BNC.to(embeds_BTC.dtype))
        return splice_image_features(embeds_BTC, batch.image_mask_BT, projected)

    def forward(self, batch: LMBatch, features_BNC: Optional[torch.Tensor] = None) -> MLLMOutput:
        """Teacher-forced pass; the loss is HF's (labels shifted inside, mean over labelled tokens; NaN when a
        batch has none)."""
        out = self.lm(
            inputs_embeds=self.embed(batch, features_BNC), attention_mask=batch.attention_mask_BT,
            position_ids=batch.position_ids_BT, labels=batch.labels_BT, use_cache=False,
        )
        return MLLMOutput(out.loss, out.logits)

    @torch.no_grad()
    def generate(self, batch: LMBatch, features_BNC: Optional[torch.Tensor] = None, max_new_tokens: int = 16) -> Generated:
        """Greedy decoding (temperature 0 = argmax) of left-padded prompts with a KV cache; a row stops at
        ``<|im_end|>`` (or the eos token). Row b's tokens do not depend on the other rows."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        mask_BT = batch.attention_mask_BT
        if not bool(mask_BT[:, -1].all()):
            raise BridgeError("generate needs left-padded prompts: collate_encoded(..., side='left')")
        B = mask_BT.shape[0]
        device = mask_BT.device
        stop = torch.tensor(self.stop_ids, device=device)
        pos_BT = position_ids_from_mask(mask_BT)
        out = self.lm(
            inputs_embeds=self.embed(batch, features_BNC), attention_mask=mask_BT, position_ids=pos_BT,
            use_cache=True, logits_to_keep=1,
        )
        next_pos_B1 = pos_BT[:, -1:] + 1
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        lengths_B = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        tokens, logprobs = [], []
        for step in range(max_new_tokens):
            logp_BV = out.logits[:, -1].float().log_softmax(-1)
            best_B, tok_B = logp_BV.max(-1)
            tok_B = tok_B.masked_fill(done_B, self.ids.pad)
            tokens.append(tok_B)
            logprobs.append(best_B.masked_fill(done_B, 0.0))
            hit_B = ~done_B & torch.isin(tok_B, stop)
            lengths_B[hit_B] = step
            done_B |= hit_B
            if bool(done_B.all()) or step == max_new_tokens - 1:
                break
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(B, 1)], dim=1)
            out = self.lm(
                input_ids=tok_B[:, None], attention_mask=mask_BT, position_ids=next_pos_B1,
                cache=out.cache, use_cache=True,
            )
            next_pos_B1 = next_pos_B1 + 1
        return Generated(torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), lengths_B)


def build_mllm(lm: nn.Module, tokenizer, feature_width: int, features: Optional[ImageFeatures] = None) -> MultimodalLM:
    """A MultimodalLM with a fresh projector (seed the caller's RNG first) from ``feature_width`` (C of the
    features: ``FeatureSource.width(evotok)``) to the LM's hidden size."""
    hidden = lm.get_input_embeddings().embedding_dim
    return MultimodalLM(lm, Projector(feature_width, hidden), special_ids(tokenizer), features)


def decode_generated(tokenizer, generated: Generated) -> list[str]:
    """The answers' text (up to, not including, the stop token)."""
    return [tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
            for row, n in zip(generated.tokens_BT, generated.lengths_B)]

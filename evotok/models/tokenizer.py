"""The EvoTok tokenizer: encoder -> residual quantizer (L = max(Lpix, Lsem) depths) -> pixel decoder on
z_Lpix and semantic decoder on z_Lsem (DESIGN.md §1).

Sizes are presets: functions returning a :class:`TokenizerArch`, gathered in ``PRESETS``;
``model.preset`` picks one. ``model.lpix`` / ``model.lsem`` change only where the two decoders attach
and the quantizer's total depth, never any other parameter.

Symbols: L depths, K codes per depth, d code dimension, (h, w) latent grid, T = h*w tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from evotok.config import Config, QuantizerConfig
from evotok.models.decoders import PixelDecoder, SemanticDecoder
from evotok.models.encoders import CNNEncoder, ViTEncoder
from evotok.models.grids import resize_token_grid  # re-exported: the model resizes teacher tokens with it
from evotok.models.presets import PRESETS, TokenizerArch, get_arch  # noqa: F401  (re-exported)


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, H, W) pixels from z_Lpix, [0, 1] scale, not clamped
    semantic: torch.Tensor  # (B, h*w, teacher_width) from z_Lsem
    quant: "object"  # the quantizer's QuantizerOutput (z_cum (L,B,d,h,w), codes (B,h,w,L), commit_loss, usage_L, perplexity_L)


class EvoTok(nn.Module):
    """Encoder, residual quantizer, pixel decoder (at depth lpix), semantic decoder (at depth lsem)."""

    def __init__(
        self, arch: TokenizerArch, quantizer: QuantizerConfig, lpix: int, lsem: int, resolution: int,
        teacher_width: int, teacher_grid: Sequence[int], encoder_weights: str = "", encoder_normalization=None,
    ):
        super().__init__()
        from evotok.models.quantizer import ResidualQuantizer

        for name, v in (("model.lpix", lpix), ("model.lsem", lsem)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.arch, self.lpix, self.lsem, self.depth = arch, lpix, lsem, max(lpix, lsem)
        self.resolution = resolution
        self.grid = arch.latent_grid(resolution)
        self.teacher_width, self.teacher_grid = int(teacher_width), tuple(int(g) for g in teacher_grid)
        d = quantizer.dim
        if arch.encoder == "cnn":
            self.encoder: nn.Module = CNNEncoder(
                d, arch.enc_ch, arch.enc_ch_mult, arch.enc_res_blocks, arch.enc_mid_blocks,
            )
        elif arch.encoder == "vit":
            self.encoder = ViTEncoder(arch.vit_arch, d, arch.vit_hidden, resolution, weights=encoder_weights,
                                      normalization=encoder_normalization)
            if tuple(self.encoder.grid) != self.grid:
                raise ValueError(f"encoder grid {self.encoder.grid} != {self.grid} from data.resolution={resolution}")
        else:
            raise ValueError(f"TokenizerArch.encoder must be 'cnn' or 'vit', got {arch.encoder!r}")
        self.quantizer = ResidualQuantizer(quantizer, self.depth)
        self.pixel_decoder = PixelDecoder(
            d, arch.dec_post_ch, arch.dec_ch, arch.dec_ch_mult, arch.dec_res_blocks, arch.dec_mid_blocks, arch.dec_mid_attn,
            attn_levels=arch.dec_attn_levels,
        )
        if self.pixel_decoder.upsample * self.grid[0] != resolution:
            raise ValueError(
                f"pixel decoder upsamples {self.grid} by {self.pixel_decoder.upsample}, which is not data.resolution={resolution}"
            )
        self.semantic_decoder = SemanticDecoder(
            d, self.grid, arch.sem_width, arch.sem_depth, arch.sem_heads, self.teacher_width, style=arch.sem_style,
        )

    # ------------------------------------------------------------------------------------ checks
    def check_images(self, images_BCHW: torch.Tensor) -> None:
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images_BCHW.shape)}")
        H, W = images_BCHW.shape[-2:]
        if (H, W) != (self.resolution, self.resolution):
            raise ValueError(
                f"images are {H}x{W} but this tokenizer was trained at data.resolution={self.resolution}; "
                f"resize them to {self.resolution}x{self.resolution}"
            )

    def _check_depth(self, depth: int) -> int:
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth must be in 1..{self.depth} (L = max(lpix, lsem)), got {depth}")
        return depth

    # ------------------------------------------------------------------------------------ encode
    def latent(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent (B, d, h, w)."""
        self.check_images(images_BCHW)
        return self.encoder(images_BCHW)

    def quantize(self, images_BCHW: torch.Tensor):
        """The quantizer's full output for a batch of images in [0, 1]."""
        return self.quantizer(self.latent(images_BCHW))

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w, L), int64."""
        return self.quantize(images_BCHW).codes

    def cumulative(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """z_l = q_1 + ... + q_l for every depth: (L, B, d, h, w)."""
        return self.quantize(images_BCHW).z_cum

    def as_latent(self, codes_or_z: torch.Tensor, depth: int) -> torch.Tensor:
        """Codes (B, h, w, L') -> z_depth via the codebooks; a float (B, d, h, w) is returned as is."""
        if codes_or_z.is_floating_point():
            if codes_or_z.ndim != 4:
                raise ValueError(f"a latent must be (B, d, h, w), got {tuple(codes_or_z.shape)}")
            return codes_or_z
        self._check_depth(depth)
        if codes_or_z.ndim != 4 or codes_or_z.shape[-1] < depth:
            raise ValueError(f"codes must be (B, h, w, L') with L' >= depth={depth}, got {tuple(codes_or_z.shape)}")
        return self.quantizer.decode_codes(codes_or_z[..., :depth], depth=depth)

    # ------------------------------------------------------------------------------------ decode
    def decode_pixels(self, codes_or_z: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] scale (not clamped) from codes at ``depth`` (default lpix) or from z."""
        return self.pixel_decoder(self.as_latent(codes_or_z, self.lpix if depth is None else depth))

    def decode_semantic(self, codes_or_z: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
        """Semantic tokens (B, h*w, teacher_width) from codes at ``depth`` (default lsem) or from z."""
        return self.semantic_decoder(self.as_latent(codes_or_z, self.lsem if depth is None else depth))

    def semantic_target(self, teacher_tokens_BTC: torch.Tensor) -> torch.Tensor:
        """The teacher's patch tokens area-resized to the latent grid: (B, h*w, teacher_width)."""
        return resize_token_grid(teacher_tokens_BTC, self.teacher_grid, self.grid)

    def forward(self, images_BCHW: torch.Tensor) -> TokenizerOutput:
        q = self.quantize(images_BCHW)
        recon = self.pixel_decoder(q.z_cum[self.lpix - 1])
        semantic = self.semantic_decoder(q.z_cum[self.lsem - 1])
        return TokenizerOutput(recon, semantic, q)


def encoder_normalization(cfg: Config):
    """The ViT encoder's input normalisation (a :class:`~evotok.models.teacher.Normalization`; None for CNN
    encoders, which map [0, 1] to [-1, 1] themselves): ``model.encoder_mean`` / ``model.encoder_std`` when set;
    else the teacher's when the tower is the teacher's arch (the paper initialises the encoder from the
    teacher's weights); else the tower arch's own."""
    from evotok.models.teacher import Normalization, resolve_normalization, teacher_normalization

    arch = get_arch(cfg.model.preset)
    if arch.encoder != "vit":
        return None
    m = cfg.model
    if m.encoder_mean:
        return Normalization(tuple(map(float, m.encoder_mean)), tuple(map(float, m.encoder_std)),
                             "config (model.encoder_mean / model.encoder_std)")
    if arch.vit_arch == cfg.teacher.arch:
        n = teacher_normalization(cfg)
        return n._replace(source=f"the teacher's ({n.source})")
    return resolve_normalization(arch.vit_arch, keys="model.encoder")


def build_tokenizer(cfg: Config, teacher_width: int, teacher_grid: Sequence[int]) -> EvoTok:
    """The tokenizer of ``cfg`` (preset, lpix, lsem, quantizer, data.resolution, model.encoder_weights and the
    encoder's normalisation)."""
    return EvoTok(
        get_arch(cfg.model.preset), cfg.model.quantizer, cfg.model.lpix, cfg.model.lsem, cfg.data.resolution,
        teacher_width, teacher_grid, encoder_weights=cfg.model.encoder_weights,
        encoder_normalization=encoder_normalization(cfg),
    )

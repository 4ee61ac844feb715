"""The EvoTok tokenizer: encoder -> residual quantizer (L = max(Lpix, Lsem) depths) -> pixel decoder on
z_Lpix and semantic decoder on z_Lsem (DESIGN.md §1).

Sizes are presets: functions returning a :class:`TokenizerArch`, gathered in ``PRESETS``;
``model.preset`` picks one. ``model.lpix`` / ``model.lsem`` change only where the two decoders attach
and the quantizer's total depth, never any other parameter.

Symbols: L depths, K codes per depth, d code dimension, (h, w) latent grid, T = h*w tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from evotok.config import Config, QuantizerConfig
from evotok.models.decoders import PixelDecoder, SemanticDecoder
from evotok.models.encoders import CNNEncoder, ViTEncoder


@dataclass(frozen=True)
class TokenizerArch:
    """Architecture sizes of one preset (the code dimension d comes from model.quantizer.dim)."""

    encoder: str  # "cnn" | "vit"
    # CNN encoder (VQGAN-style): downsampling 2**(len(enc_ch_mult)-1)
    enc_ch: int = 64
    enc_ch_mult: tuple[int, ...] = (1, 2, 2)
    enc_res_blocks: int | tuple[int, ...] = 1
    enc_mid_blocks: int = 1
    # ViT encoder: an open_clip vision tower (penultimate state) + Linear(width, vit_hidden)-Tanh-Linear(vit_hidden, d)
    vit_arch: str = ""
    vit_hidden: int = 1024
    vit_patch: int = 16
    # pixel decoder: 1x1 conv d -> dec_post_ch, then VQGAN-style CNN decoder
    dec_post_ch: int = 128
    dec_ch: int = 64
    dec_ch_mult: tuple[int, ...] = (1, 2, 2)
    dec_res_blocks: int | tuple[int, ...] = 1
    dec_mid_blocks: int = 1
    dec_mid_attn: bool = False
    # semantic decoder: ViT with patch 1 on the latent grid, then Linear-Tanh-Linear to the teacher width
    sem_width: int = 128
    sem_depth: int = 2
    sem_heads: int = 4

    def latent_grid(self, resolution: int) -> tuple[int, int]:
        factor = self.vit_patch if self.encoder == "vit" else 2 ** (len(self.enc_ch_mult) - 1)
        if resolution % factor:
            raise ValueError(f"data.resolution={resolution} is not a multiple of the encoder's downsampling {factor}")
        return resolution // factor, resolution // factor


def tiny() -> TokenizerArch:
    """Embedded default: 32 px -> 8x8 x d. Sized like the calibrated plain conv RVQ autoencoder (DESIGN §2):
    one ResBlock at 8x8 on each side, plain stride-2 convs / upsample+conv at 16 and 32 px, and a
    one-block width-48 semantic ViT. The narrower decoder reads less semantics out of the coarse z_1 and runs more
    steps in the same time (10-min runs, batch 32, K=32; PSNR at Lpix, CLIPSIM_sem gap = depth 16 - depth 1):
    width 96: 24.3 dB, gap 0.15; width 64: 24.2-24.45 dB, gap 0.16-0.23 over two teacher runs; width 48:
    24.4 dB, gap 0.22 with the teacher run that gave 0.16 at width 64."""
    return TokenizerArch(
        encoder="cnn", enc_ch=32, enc_ch_mult=(1, 2, 4), enc_res_blocks=0, enc_mid_blocks=1,
        dec_post_ch=64, dec_ch=16, dec_ch_mult=(1, 2, 4), dec_res_blocks=0, dec_mid_blocks=1,
        sem_width=48, sem_depth=1, sem_heads=4,
    )


def paper() -> TokenizerArch:
    """DESIGN §1 reference: SigLIP2-L/16 tower at 256 px -> 16x16x32; VQGAN decoder (1,1,2,2,4);
    3-block width-1024 semantic ViT."""
    return TokenizerArch(
        encoder="vit", vit_arch="ViT-L-16-SigLIP2-256", vit_hidden=1024, vit_patch=16,
        dec_post_ch=256, dec_ch=128, dec_ch_mult=(1, 1, 2, 2, 4), dec_res_blocks=2, dec_mid_blocks=2, dec_mid_attn=True,
        sem_width=1024, sem_depth=3, sem_heads=16,
    )


def tiny_vit() -> TokenizerArch:
    """The paper's structure at embedded scale: the embedded teacher's ViT tower (32 px, patch 8) as the
    encoder (init from ``model.encoder_weights``, e.g. the teacher run), 4x4 x d latent, x8 CNN decoder."""
    return TokenizerArch(
        encoder="vit", vit_arch="evotok-teacher-tiny-avg", vit_hidden=128, vit_patch=8,
        dec_post_ch=64, dec_ch=16, dec_ch_mult=(1, 2, 4, 4), dec_res_blocks=0, dec_mid_blocks=1,
        sem_width=96, sem_depth=1, sem_heads=4,
    )


PRESETS: dict[str, Callable[[], TokenizerArch]] = {"tiny": tiny, "tiny_vit": tiny_vit, "paper": paper}


def get_arch(preset: str) -> TokenizerArch:
    if preset not in PRESETS:
        raise ValueError(f"model.preset '{preset}' is not a tokenizer preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]()


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, H, W) pixels from z_Lpix, [0, 1] scale, not clamped
    semantic: torch.Tensor  # (B, h*w, teacher_width) from z_Lsem
    quant: "object"  # the quantizer's QuantizerOutput (z_cum (L,B,d,h,w), codes (B,h,w,L), commit_loss, usage_L, perplexity_L)


def resize_token_grid(tokens_BTC: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """Area-resize a token grid (B, gh*gw, C) to (B, h*w, C); identity when the grids agree.

    ``F.adaptive_avg_pool2d`` is an area average when shrinking and a replication when growing."""
    src, dst = tuple(src_grid), tuple(dst_grid)
    if src == dst:
        return tokens_BTC
    B, T, C = tokens_BTC.shape
    if T != src[0] * src[1]:
        raise ValueError(f"teacher tokens: {T} tokens do not form the teacher grid {src}")
    x = tokens_BTC.transpose(1, 2).reshape(B, C, src[0], src[1])
    return F.adaptive_avg_pool2d(x, dst).flatten(2).transpose(1, 2)


class EvoTok(nn.Module):
    """Encoder, residual quantizer, pixel decoder (at depth lpix), semantic decoder (at depth lsem)."""

    def __init__(
        self, arch: TokenizerArch, quantizer: QuantizerConfig, lpix: int, lsem: int, resolution: int,
        teacher_width: int, teacher_grid: Sequence[int], encoder_weights: str = "",
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
            self.encoder = ViTEncoder(arch.vit_arch, d, arch.vit_hidden, resolution, weights=encoder_weights)
            if tuple(self.encoder.grid) != self.grid:
                raise ValueError(f"encoder grid {self.encoder.grid} != {self.grid} from data.resolution={resolution}")
        else:
            raise ValueError(f"TokenizerArch.encoder must be 'cnn' or 'vit', got {arch.encoder!r}")
        self.quantizer = ResidualQuantizer(quantizer, self.depth)
        self.pixel_decoder = PixelDecoder(
            d, arch.dec_post_ch, arch.dec_ch, arch.dec_ch_mult, arch.dec_res_blocks, arch.dec_mid_blocks, arch.dec_mid_attn,
        )
        if self.pixel_decoder.upsample * self.grid[0] != resolution:
            raise ValueError(
                f"pixel decoder upsamples {self.grid} by {self.pixel_decoder.upsample}, which is not data.resolution={resolution}"
            )
        self.semantic_decoder = SemanticDecoder(d, self.grid, arch.sem_width, arch.sem_depth, arch.sem_heads, self.teacher_width)

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


def build_tokenizer(cfg: Config, teacher_width: int, teacher_grid: Sequence[int]) -> EvoTok:
    """The tokenizer of ``cfg`` (preset, lpix, lsem, quantizer, data.resolution, model.encoder_weights)."""
    return EvoTok(
        get_arch(cfg.model.preset), cfg.model.quantizer, cfg.model.lpix, cfg.model.lsem, cfg.data.resolution,
        teacher_width, teacher_grid, encoder_weights=cfg.model.encoder_weights,
    )

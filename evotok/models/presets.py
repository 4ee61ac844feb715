"""Tokenizer size presets: a frozen dataclass of architecture sizes per preset name, gathered in ``PRESETS``.

No torch import: the config layer validates ``model.preset`` and ``data.resolution`` against these at load
time, and ``evotok.models.tokenizer`` builds the modules from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    # pixel decoder: 1x1 conv d -> dec_post_ch, then VQGAN-style CNN decoder (evotok.models.decoders.PixelDecoder)
    dec_post_ch: int = 128
    dec_ch: int = 64
    dec_ch_mult: tuple[int, ...] = (1, 2, 2)
    dec_res_blocks: int | tuple[int, ...] = 1
    dec_mid_blocks: int = 1
    dec_mid_attn: bool = False
    dec_attn_levels: tuple[int, ...] = ()  # levels (indices into dec_ch_mult) with attention after each ResBlock
    # semantic decoder: ViT with patch 1 on the latent grid, then Linear-Tanh-Linear to the teacher width;
    # style "plain" or "beit" (the reference's BEiT-v2 ViT: CLS token, q/v biases, floor head dim, BEiT init)
    sem_width: int = 128
    sem_depth: int = 2
    sem_heads: int = 4
    sem_style: str = "plain"

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each side."""
        return self.vit_patch if self.encoder == "vit" else 2 ** (len(self.enc_ch_mult) - 1)

    @property
    def upsample(self) -> int:
        """The pixel decoder's upsampling factor."""
        return 2 ** (len(self.dec_ch_mult) - 1)

    def check_resolution(self, resolution: int, preset: str = "") -> None:
        """ValueError naming ``data.resolution`` unless the encoder and the pixel decoder fit it."""
        name = f"preset {preset!r}" if preset else "this preset"
        if resolution % self.downsample:
            raise ValueError(
                f"config key 'data.resolution' = {resolution} is not a multiple of the encoder downsampling of "
                f"{name} ({self.downsample})"
            )
        if self.upsample != self.downsample:
            raise ValueError(
                f"{name}: the pixel decoder upsamples by {self.upsample} but the encoder downsamples by "
                f"{self.downsample}"
            )

    def latent_grid(self, resolution: int) -> tuple[int, int]:
        self.check_resolution(resolution)
        return resolution // self.downsample, resolution // self.downsample


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
    """DESIGN §1, block for block as the paper's reference code (VisionXLab/EvoTok, evotok/tokenizer/vq_model/:
    evotok.py, pixel_model.py, vqkd_model.py; parameter counts in evotok.models.reference): SigLIP2-L/16 tower
    at 256 px (penultimate state) -> Linear(1024,1024)-Tanh-Linear(1024,32): 16x16x32; VQGAN decoder
    ch 128 x (1,1,2,2,4), num_res_blocks 2 (= 3 ResBlocks per up level, VQGAN's num_res_blocks + 1), mid
    Res-Attn-Res, attention after each ResBlock at 16x16; BEiT-v2 semantic ViT: 3 blocks, width 1024, 12 heads."""
    return TokenizerArch(
        encoder="vit", vit_arch="ViT-L-16-SigLIP2-256", vit_hidden=1024, vit_patch=16,
        dec_post_ch=256, dec_ch=128, dec_ch_mult=(1, 1, 2, 2, 4), dec_res_blocks=3, dec_mid_blocks=2, dec_mid_attn=True,
        dec_attn_levels=(4,),
        sem_width=1024, sem_depth=3, sem_heads=12, sem_style="beit",
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
        raise ValueError(f"config key 'model.preset' = {preset!r} is not a tokenizer preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]()

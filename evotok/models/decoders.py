"""Tokenizer decoders: the pixel decoder (1x1 conv then a VQGAN-style CNN) and the semantic decoder
(a small ViT with patch size 1 on the latent grid, then Linear-Tanh-Linear to the teacher width)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from evotok.models.encoders import ResBlock, group_norm, mid_stack, per_level


class PixelDecoder(nn.Module):
    """z (B, d, h, w) -> images (B, 3, h*2**(levels-1), ...) in [0, 1] scale (not clamped).

    1x1 conv d -> ``post_ch``, conv_in to ch*ch_mult[-1], mid ResBlock(s) (+ attention), then levels
    from the deepest: ``num_res_blocks`` (int or per level) ResBlocks and a nearest x2 upsample + conv (all but the last),
    norm, SiLU, conv3x3 to RGB. ``ch_mult`` is read shallow-to-deep as in VQGAN.
    """

    def __init__(
        self, in_dim: int, post_ch: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int | Sequence[int],
        mid_blocks: int = 1, mid_attn: bool = False, out_ch: int = 3,
    ):
        super().__init__()
        blocks = per_level(num_res_blocks, len(ch_mult))
        self.post_quant = nn.Conv2d(in_dim, post_ch, 1)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(post_ch, c, 3, padding=1)
        self.mid = mid_stack(c, mid_blocks, mid_attn)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            for _ in range(blocks[i]):
                layers.append(ResBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
            if i > 0:
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                layers.append(nn.Conv2d(c, ch * ch_mult[i - 1], 3, padding=1))
                c = ch * ch_mult[i - 1]
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)
        self.upsample = 2 ** (len(ch_mult) - 1)

    def forward(self, z_Bdhw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant(z_Bdhw))
        h = self.up(self.mid(h))
        return self.conv_out(F.silu(self.norm_out(h))) * 0.5 + 0.5


class Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"semantic decoder width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x_BTw: torch.Tensor) -> torch.Tensor:
        B, T, W = x_BTw.shape
        q, k, v = self.qkv(self.norm1(x_BTw)).reshape(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, W)
        x_BTw = x_BTw + self.proj(a)
        return x_BTw + self.mlp(self.norm2(x_BTw))


class SemanticDecoder(nn.Module):
    """z (B, d, h, w) -> tokens (B, h*w, out_dim): patch-1 embedding, learned positions, ``depth`` blocks,
    LayerNorm, then Linear(width, width)-Tanh-Linear(width, out_dim)."""

    def __init__(self, in_dim: int, grid: tuple[int, int], width: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1], width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))

    def forward(self, z_Bdhw: torch.Tensor) -> torch.Tensor:
        x = self.embed(z_Bdhw.flatten(2).transpose(1, 2)) + self.pos
        return self.head(self.norm(self.blocks(x)))

"""Tokenizer decoders: the pixel decoder (1x1 conv then a VQGAN-style CNN) and the semantic decoder
(a small ViT with patch size 1 on the latent grid, then Linear-Tanh-Linear to the teacher width)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from evotok.models.encoders import AttnBlock, ResBlock, group_norm, mid_stack, per_level


class PixelDecoder(nn.Module):
    """z (B, d, h, w) -> images (B, 3, h*2**(levels-1), ...) in [0, 1] scale (not clamped).

    VQGAN's decoder (taming-transformers; the paper's reference ``pixel_model.Decoder``): 1x1 conv d ->
    ``post_ch``, conv_in to ch*ch_mult[-1], mid ResBlock(s) (+ attention after the first), then levels from the
    deepest: ``num_res_blocks`` (int or per level) ResBlocks, the first changing the channel count to
    ch*ch_mult[i], each followed by self-attention on the levels in ``attn_levels`` (indices into ``ch_mult``,
    shallow to deep), then a nearest x2 upsample + conv3x3 (all but the last level). The upsample conv keeps the
    channel count when the next level has ResBlocks (they change it, as in VQGAN) and changes it itself when the
    next level has none. Norm, SiLU, conv3x3 to RGB. Its raw output o is the image on [-1, 1] (what the
    reference's losses see); ``forward`` returns o / 2 + 1 / 2, the [0, 1] scale the suite's images use.
    """

    def __init__(
        self, in_dim: int, post_ch: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int | Sequence[int],
        mid_blocks: int = 1, mid_attn: bool = False, out_ch: int = 3, attn_levels: Sequence[int] = (),
    ):
        super().__init__()
        blocks = per_level(num_res_blocks, len(ch_mult))
        bad = [i for i in attn_levels if not 0 <= i < len(ch_mult)]
        if bad:
            raise ValueError(f"pixel decoder attention levels {bad} are not levels of ch_mult {tuple(ch_mult)}")
        self.post_quant = nn.Conv2d(in_dim, post_ch, 1)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(post_ch, c, 3, padding=1)
        self.mid = mid_stack(c, mid_blocks, mid_attn)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            for _ in range(blocks[i]):
                layers.append(ResBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
                if i in attn_levels:
                    layers.append(AttnBlock(c))
            if i > 0:
                nxt = c if blocks[i - 1] > 0 else ch * ch_mult[i - 1]
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                layers.append(nn.Conv2d(c, nxt, 3, padding=1))
                c = nxt
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)
        self.upsample = 2 ** (len(ch_mult) - 1)

    def forward(self, z_Bdhw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant(z_Bdhw))
        h = self.up(self.mid(h))
        return self.conv_out(F.silu(self.norm_out(h))) * 0.5 + 0.5

    def structure(self) -> list[str]:
        """One line per stage, deepest first: the blocks and channel counts (for ``--dry-run``)."""
        def name(m: nn.Module) -> str:
            if isinstance(m, ResBlock):
                return f"Res {m.conv1.in_channels}->{m.conv1.out_channels}"
            if isinstance(m, AttnBlock):
                return "Attn"
            if isinstance(m, nn.Conv2d):
                return f"Conv {m.in_channels}->{m.out_channels}"
            return "Up x2" if isinstance(m, nn.Upsample) else type(m).__name__

        lines = [f"post_quant 1x1 {self.post_quant.in_channels}->{self.post_quant.out_channels}, "
                 f"conv_in {self.conv_in.in_channels}->{self.conv_in.out_channels}",
                 "mid: " + ", ".join(name(m) for m in self.mid)]
        level: list[str] = []
        for m in self.up:
            level.append(name(m))
            if isinstance(m, nn.Conv2d):  # the conv after an upsample closes a level
                lines.append("level: " + ", ".join(level))
                level = []
        lines.append("level: " + ", ".join(level + [f"GN, SiLU, Conv {self.conv_out.in_channels}->{self.conv_out.out_channels}"]))
        return lines


class Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + GELU MLP).

    ``style="plain"``: qkv with biases, ``width`` divisible by ``heads``. ``style="beit"`` (the reference's semantic
    decoder, BEiT v2's ``Block``): head dimension ``width // heads`` rounded down (1024 / 12 heads -> 85, an
    attention width of 1020), a bias on q and v only, LayerNorm eps 1e-6.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, style: str = "plain"):
        super().__init__()
        if style not in ("plain", "beit"):
            raise ValueError(f"semantic decoder style must be 'plain' or 'beit', got {style!r}")
        if style == "plain" and width % heads:
            raise ValueError(f"semantic decoder width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        inner = heads * self.head_dim
        eps = 1e-6 if style == "beit" else 1e-5
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * inner, bias=style == "plain")
        if style == "beit":
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(inner, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x_BTw: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTw.shape
        qkv = self.qkv(self.norm1(x_BTw))
        if self.qkv.bias is None:
            q_bias = self.q_bias
            qkv = qkv + torch.cat([q_bias, torch.zeros_like(q_bias), self.v_bias])
        q, k, v = qkv.reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        x_BTw = x_BTw + self.proj(a)
        return x_BTw + self.mlp(self.norm2(x_BTw))


class SemanticDecoder(nn.Module):
    """z (B, d, h, w) -> tokens (B, h*w, out_dim): patch-1 embedding, learned positions, ``depth`` blocks,
    LayerNorm, then Linear(width, width)-Tanh-Linear(width, out_dim).

    ``style="beit"`` is the reference's BEiT-v2 ViT: a CLS token prepended (positions for h*w + 1 tokens), BEiT
    blocks (see :class:`Block`), the final LayerNorm on the patch tokens (its ``fc_norm``), and BEiT's init
    (truncated normal std 0.02, zero biases, each block's output projections scaled by 1 / sqrt(2 * block
    number)). ``style="plain"`` (the embedded default) has no CLS token and PyTorch's default init.
    """

    def __init__(self, in_dim: int, grid: tuple[int, int], width: int, depth: int, heads: int, out_dim: int,
                 style: str = "plain"):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(in_dim, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if style == "beit" else None
        n_pos = grid[0] * grid[1] + (self.cls is not None)
        self.pos = nn.Parameter(torch.randn(1, n_pos, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, style=style) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6 if style == "beit" else 1e-5)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))
        if style == "beit":
            self._beit_init()

    @torch.no_grad()
    def _beit_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        for i, blk in enumerate(self.blocks):
            blk.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp[2].weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, z_Bdhw: torch.Tensor) -> torch.Tensor:
        x = self.embed(z_Bdhw.flatten(2).transpose(1, 2))
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos)
        if self.cls is not None:
            x = x[:, 1:]
        return self.head(self.norm(x))

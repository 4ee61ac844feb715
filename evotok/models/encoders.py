"""Tokenizer encoders: a VQGAN-style CNN (embedded default) and an open_clip ViT tower (paper scale).

Both map images in [0, 1] (B, 3, H, W) to a latent grid ``z_Bdhw`` of dimension d (= the quantizer's
code dimension). Building blocks shared with the pixel decoder live here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def per_level(num_res_blocks: int | Sequence[int], levels: int) -> tuple[int, ...]:
    """An int (same for every level) or one count per level, shallow to deep."""
    if isinstance(num_res_blocks, int):
        return (num_res_blocks,) * levels
    out = tuple(int(n) for n in num_res_blocks)
    if len(out) != levels:
        raise ValueError(f"{len(out)} res-block counts for {levels} levels")
    return out


class ResBlock(nn.Module):
    """VQGAN residual block: (norm, SiLU, conv3x3) x 2 plus a 1x1 shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """VQGAN single-head spatial self-attention (used in the mid block of the paper-size decoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def mid_stack(channels: int, blocks: int, attn: bool) -> nn.Sequential:
    """The middle of a VQGAN-style encoder or decoder: ResBlocks, self-attention after the first."""
    layers: list[nn.Module] = []
    for j in range(blocks):
        layers.append(ResBlock(channels, channels))
        if attn and j == 0:
            layers.append(AttnBlock(channels))
    return nn.Sequential(*layers)


class CNNEncoder(nn.Module):
    """VQGAN-style encoder: conv_in, per level ``num_res_blocks`` (one int, or one per level) ResBlocks then a stride-2 conv (all but
    the last level), mid ResBlock(s), norm, SiLU, 1x1 conv to ``out_dim``. Downsampling 2**(levels-1)."""

    def __init__(
        self, out_dim: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int | Sequence[int], mid_blocks: int = 1,
        mid_attn: bool = False, in_ch: int = 3,
    ):
        super().__init__()
        blocks = per_level(num_res_blocks, len(ch_mult))
        self.conv_in = nn.Conv2d(in_ch, ch * ch_mult[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = ch * ch_mult[0]
        for i, m in enumerate(ch_mult):
            for _ in range(blocks[i]):
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i < len(ch_mult) - 1:
                nxt = ch * ch_mult[i + 1]
                layers.append(nn.Conv2d(c, nxt, 3, stride=2, padding=1))
                c = nxt
        self.down = nn.Sequential(*layers)
        self.mid = mid_stack(c, mid_blocks, mid_attn)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_dim, 1)
        self.downsample = 2 ** (len(ch_mult) - 1)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images_BCHW * 2.0 - 1.0)
        h = self.mid(self.down(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class ViTEncoder(nn.Module):
    """An open_clip vision tower's penultimate hidden state, then Linear(w, hidden)-Tanh-Linear(hidden, d).

    The tower's last block, head/pooling and post-norm are unused (we read the penultimate state) and
    frozen (``requires_grad=False``), as in the paper. Images in [0, 1] are normalised with ``normalization``
    (the tokenizer passes the teacher's when the tower is the teacher's arch, see
    :func:`evotok.models.tokenizer.encoder_normalization`; None: the arch's own, by
    :func:`evotok.models.teacher.resolve_normalization`). Works with open_clip's native ``VisionTransformer`` and
    with timm towers (SigLIP2).
    """

    def __init__(self, arch: str, out_dim: int, hidden: int, image_size: int, weights: str = "", normalization=None):
        super().__init__()
        import open_clip
        from open_clip.model import _build_vision_tower

        from evotok.models.teacher import register_open_clip_configs, resolve_normalization

        register_open_clip_configs()  # the embedded teacher archs (explicit, idempotent)
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"model preset encoder arch '{arch}' is not an open_clip model name")
        vision_cfg = dict(cfg["vision_cfg"])
        vision_cfg["image_size"] = image_size
        self.visual = _build_vision_tower(cfg["embed_dim"], vision_cfg)
        self.normalization = normalization if normalization is not None else resolve_normalization(arch, keys="model.encoder")
        self.register_buffer("mean", torch.tensor(self.normalization.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.normalization.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if weights:
            self.load_tower_weights(weights)
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:  # timm VisionTransformer
            width = trunk.embed_dim
            frozen = [trunk.blocks[-1], trunk.norm, getattr(trunk, "attn_pool", None), getattr(trunk, "fc_norm", None),
                      trunk.head, getattr(self.visual, "head", None)]
            self.grid = tuple(trunk.patch_embed.grid_size)
        else:  # open_clip VisionTransformer
            width = self.visual.transformer.width
            frozen = [self.visual.transformer.resblocks[-1], self.visual.ln_post, getattr(self.visual, "attn_pool", None)]
            self.grid = tuple(self.visual.grid_size)
            if getattr(self.visual, "proj", None) is not None:
                self.visual.proj.requires_grad_(False)
        for m in frozen:
            if isinstance(m, nn.Module):
                m.requires_grad_(False)
        self.width = width
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        for m in self.head:  # the reference's init of this head (truncated normal std 0.02, zero bias)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def load_tower_weights(self, path: str) -> None:
        """Initialise the tower from an open_clip weights file (.pt/.bin/.safetensors state dict) or from a
        teacher run folder / teacher .ckpt (the embedded default)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"model.encoder_weights: encoder init weights {p} do not exist")
        if p.is_dir() or p.suffix == ".ckpt":
            from evotok.models.teacher import teacher_from_run

            sd = teacher_from_run(p).clip.state_dict()
        elif p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")} or sd
        missing, _ = self.visual.load_state_dict(sd, strict=False)
        if missing:
            raise ValueError(f"model.encoder_weights: {p} lacks {len(missing)} vision-tower tensors, e.g. {missing[:3]}")

    def tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Penultimate hidden state of the patch tokens, (B, gh*gw, width)."""
        x = (images_BCHW - self.mean) / self.std
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:
            h = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(x))))
            for blk in trunk.blocks[:-1]:
                h = blk(h)
            return h[:, trunk.num_prefix_tokens:]
        v = self.visual
        h = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1)
        h = torch.cat([cls, h], dim=1) + v.positional_embedding.to(h.dtype)
        h = v.patch_dropout(h)
        h = v.ln_pre(h)
        for blk in v.transformer.resblocks[:-1]:
            h = blk(h)
        return h[:, 1:]

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        t_BTw = self.tokens(images_BCHW)
        z_BTd = self.head(t_BTw)
        gh, gw = self.grid
        return z_BTd.transpose(1, 2).reshape(z_BTd.shape[0], -1, gh, gw)

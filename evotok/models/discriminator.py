"""PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``)."""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator(nn.Module):
    """conv4x4 s2 + LeakyReLU, then ``layers - 1`` conv4x4 s2 + BatchNorm + LeakyReLU (channels doubling,
    capped at 8x), one conv4x4 s1 + BatchNorm + LeakyReLU, and a conv4x4 s1 to one logit per patch.

    Input images in [0, 1]; they are mapped to [-1, 1] inside.
    """

    def __init__(self, layers: int = 3, channels: int = 64, in_ch: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"loss.disc_layers must be >= 1, got {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_ch, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.apply(_init)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h', w')."""
        return self.main(images_BCHW * 2.0 - 1.0)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)

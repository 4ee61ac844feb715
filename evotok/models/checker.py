"""The GenEval-style checker: a small CNN reading EvoShapes factor labels (shape, count, colour, texture,
background) off an image, one classification head per factor. It scores generated images in
``evotok eval geneval``: an image is correct for a prompt when every factor the prompt names reads as named."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

FACTORS = ("shape", "count", "color", "texture", "background")


class CheckerOutput(NamedTuple):
    logits: dict[str, torch.Tensor]  # factor -> (B, classes)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Checker(nn.Module):
    """Three stride-2 stages of two 3x3 convs (width, 2 width, 4 width), global average and max pooling, and one
    linear head per factor (classes from evotok.data.evoshapes.FACTORS)."""

    def __init__(self, width: int, classes: dict[str, int]):
        super().__init__()
        self.classes = dict(classes)
        self.body = nn.Sequential(_block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                  _block(2 * width, 4 * width))
        self.heads = nn.ModuleDict({f: nn.Linear(8 * width, n) for f, n in self.classes.items()})

    def forward(self, images_BCHW: torch.Tensor) -> CheckerOutput:
        x = self.body(images_BCHW * 2 - 1)
        pooled = torch.cat([x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))], dim=1)
        return CheckerOutput({f: head(pooled) for f, head in self.heads.items()})

    @torch.no_grad()
    def read(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """The predicted class index per factor, (B,) each (call eval() first)."""
        return {f: v.argmax(-1) for f, v in self(images_BCHW).logits.items()}


def build_checker(width: int, preset: str = "evoshapes") -> Checker:
    """A checker with one head per factor, sized by the class counts of EvoShapes ``preset`` (``data.preset``)."""
    from evotok.data.evoshapes import factors

    names = factors(preset)
    return Checker(width, {f: len(names[f]) for f in FACTORS})

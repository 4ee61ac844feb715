"""Tokenizer losses (DESIGN.md §1), all weights from ``cfg.loss``.

generator total = recon_weight * recon + lpips_weight * lpips + gan_weight * gan_g (from step gan_start)
                + commit_weight * commit + sem_weight * sem

- recon: mean squared (``l2``) or absolute (``l1``) error on the [-1, 1] scale, as the reference computes it
  (VisionXLab/EvoTok ``modules/vq_loss.py``: images normalised with 0.5 / 0.5), so ``recon_weight: 1.0`` means
  what it means there; on the suite's [0, 1] images that is 4x (l2) or 2x (l1) the [0, 1]-scale error.
- lpips: the ``lpips`` package's VGG LPIPS; its backbone weights come from the local file
  ``loss.lpips_weights`` (never downloaded); inputs are mapped to [-1, 1].
- gan_g / disc: hinge losses of a PatchGAN: gan_g = -mean(D(x_hat)); disc = gan_weight * 0.5 *
  (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))) -- taming's / the reference's ``hinge_d_loss`` with its 0.5,
  weighted by ``gan_weight`` as the reference weights both sides (``disc_weight``); no adaptive weight.
- commit: from the quantizer (mean over depths of ||x - sg(z_l)||^2).
- sem ("cosine+fold"), with p, t the predicted and target tokens (B, T, C) and F = ``loss.sem_folds``:
      sem = mean_{b,t}(1 - cos(p_bt, t_bt)) + mean_{b,t,f}(1 - cos(p_bt^f, t_bt^f))
  where p^f, t^f are the F equal consecutive chunks of the channel dimension (C must divide by F).
  The second term is the mean over chunks, so both terms lie in [0, 2].
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from evotok.config import LossConfig


class LossTerms(NamedTuple):
    """Generator-side loss terms (weighted sum in ``total``; the others unweighted, detached-ready)."""

    total: torch.Tensor
    recon: torch.Tensor
    lpips: torch.Tensor
    gan_g: torch.Tensor
    commit: torch.Tensor
    sem: torch.Tensor


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean error between [0, 1]-scale images, measured on the [-1, 1] scale (x -> 2x - 1)."""
    if kind == "l2":
        return F.mse_loss(recon * 2 - 1, target * 2 - 1)
    if kind == "l1":
        return F.l1_loss(recon * 2 - 1, target * 2 - 1)
    raise ValueError(f"loss.recon must be 'l2' or 'l1', got {kind!r}")


def cosine_fold_loss(pred_BTC: torch.Tensor, target_BTC: torch.Tensor, folds: int = 4) -> torch.Tensor:
    """(1 - cos) over the whole feature plus the mean of (1 - cos) over ``folds`` equal chunks (see module doc)."""
    C = pred_BTC.shape[-1]
    if folds < 1 or C % folds:
        raise ValueError(f"loss.sem_folds={folds} must divide the teacher width {C}")
    p, t = pred_BTC.float(), target_BTC.float()
    whole = 1.0 - F.cosine_similarity(p, t, dim=-1)
    chunks = 1.0 - F.cosine_similarity(p.unflatten(-1, (folds, C // folds)), t.unflatten(-1, (folds, C // folds)), dim=-1)
    return whole.mean() + chunks.mean()


def token_cosine(pred_BTC: torch.Tensor, target_BTC: torch.Tensor) -> torch.Tensor:
    """Per-image mean token cosine similarity (B,) (CLIPSIM_sem when target = teacher tokens)."""
    return F.cosine_similarity(pred_BTC.float(), target_BTC.float(), dim=-1).mean(-1)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): taming's and the reference's hinge."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class LPIPSLoss(nn.Module):
    """VGG LPIPS from the ``lpips`` package, backbone loaded from a local file, frozen.

    ``weights`` may hold a torchvision VGG16 state dict (``features.N.*`` keys; extra classifier keys are
    ignored) or a full ``lpips.LPIPS`` state dict (``net.sliceK.N.*`` and ``linK.*``). The linear
    calibration layers ship inside the ``lpips`` package itself.
    """

    def __init__(self, weights: str):
        super().__init__()
        path = Path(weights) if weights else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"loss.lpips_weight > 0 needs the LPIPS VGG16 backbone weights file loss.lpips_weights, "
                f"but {'it is empty' if path is None else f'{path} does not exist'}; "
                f"set loss.lpips_weights=PATH (a torchvision vgg16 state dict) or loss.lpips_weight=0"
            )
        try:
            import lpips
        except ImportError:
            raise ImportError(
                "loss.lpips_weight > 0 needs the 'lpips' package: pip install -c constraints.txt lpips"
            ) from None
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        if any(k.startswith("features.") for k in sd):
            # torchvision vgg16 'features.i' -> lpips 'net.sliceK.i' (slices split at 4, 9, 16, 23, 30)
            bounds = [(1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30)]
            mapped = {}
            for k, v in sd.items():
                if not k.startswith("features."):
                    continue
                idx = int(k.split(".")[1])
                for s, lo, hi in bounds:
                    if lo <= idx < hi:
                        mapped[f"slice{s}.{k[len('features.'):]}"] = v
            missing, _ = net.net.load_state_dict(mapped, strict=False)
        else:
            missing, _ = net.load_state_dict(sd, strict=False)
            missing = [m for m in missing if m.startswith("net.")]
        if missing:
            raise ValueError(f"loss.lpips_weights: {path} lacks VGG16 tensors, e.g. {missing[:3]}")
        net.eval().requires_grad_(False)
        self.net = net

    def train(self, mode: bool = True) -> "LPIPSLoss":  # stays in eval mode (dropout off)
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.net(recon.float() * 2 - 1, target.float() * 2 - 1).mean()


class TokenizerLoss(nn.Module):
    """Generator loss terms for one batch (the discriminator is passed in, it is not a submodule)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        reconstruction_loss(torch.zeros(1), torch.zeros(1), cfg.recon)  # validate loss.recon early
        self.lpips: Optional[LPIPSLoss] = LPIPSLoss(cfg.lpips_weights) if cfg.lpips_weight > 0 else None

    def disc_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The discriminator's loss: ``gan_weight * hinge_d_loss`` (see the module doc)."""
        return self.cfg.gan_weight * hinge_d_loss(logits_real, logits_fake)

    def gan_active(self, step: int) -> bool:
        return self.cfg.gan_weight > 0 and step >= self.cfg.gan_start

    def forward(
        self, images: torch.Tensor, recon: torch.Tensor, semantic: torch.Tensor, target: torch.Tensor,
        commit: torch.Tensor, step: int, disc: Optional[nn.Module] = None,
    ) -> LossTerms:
        c = self.cfg
        zero = recon.new_zeros(()).float()
        rec = reconstruction_loss(recon.float(), images.float(), c.recon)
        lp = self.lpips(recon, images) if self.lpips is not None else zero
        gan = hinge_g_loss(disc(recon)) if (disc is not None and self.gan_active(step)) else zero
        sem = cosine_fold_loss(semantic, target, c.sem_folds) if c.sem_weight > 0 else zero
        commit = commit.float()
        total = c.recon_weight * rec + c.lpips_weight * lp + c.gan_weight * gan + c.commit_weight * commit + c.sem_weight * sem
        return LossTerms(total, rec, lp, gan, commit, sem)

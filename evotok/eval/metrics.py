"""Reconstruction and representation metrics, as plain functions and small accumulators.

- ``psnr`` / ``ssim``: per image, images (B, 3, H, W) in [0, 1].
- rFID: torchmetrics' ``FrechetInceptionDistance`` over a pluggable feature extractor (an
  ``nn.Module`` mapping [0, 1] images to (B, F)): the teacher's pooled embedding (``TeacherPooled``,
  the embedded default) or torch-fidelity's InceptionV3 2048-d pool features from a local weights
  file (``InceptionPool``, for numbers comparable to the literature). ``FIDPerDepth`` extracts the
  real features once and scores every depth against them.
- ``clipsim_pix`` / ``clipsim_sem``: DESIGN §1 (Fig. 5b).
- ``CodeHistogram``: codebook usage and perplexity per depth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PSNR_CAP_DB = 100.0  # identical images: PSNR is +inf; capped so that averages and JSON stay finite


# ---------------------------------------------------------------------------------------- pixels


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, data_range: float = 1.0, max_db: Optional[float] = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB, (B,): 10 log10(data_range^2 / mse). Identical images give ``max_db``
    (or +inf with ``max_db=None``)."""
    mse_B = (x_BCHW.double() - y_BCHW.double()).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse_B)  # mse 0 -> +inf
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out.float()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x_BCHW: torch.Tensor,
    y_BCHW: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM (B,) with a Gaussian window (Wang et al. 2004), averaged over channels and over
    the valid (unpadded) window positions; matches ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
    Images smaller than the window use a window of their size."""
    x, y = x_BCHW.double(), y_BCHW.double()
    C = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(size, sigma, x.device, x.dtype)
    wx = g.view(1, 1, 1, size).expand(C, 1, 1, size)
    wy = g.view(1, 1, size, 1).expand(C, 1, size, 1)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------ rFID


class TeacherPooled(nn.Module):
    """FID feature extractor: the teacher's L2-normalised pooled embedding of [0, 1] images."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.num_features = int(teacher.embed_dim)

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.teacher.pooled(images_BCHW)


class InceptionPool(nn.Module):
    """FID feature extractor: torch-fidelity's InceptionV3 ('inception-v3-compat', the TF-FID port)
    2048-d pool features, weights from a local file (``eval.inception_weights``); [0, 1] images in,
    quantised to uint8 like the reference implementation, resized to 299 inside."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path).expanduser() if weights_path else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"Inception weights file {str(path) if path else '(empty)'!r} (config key eval.inception_weights) does not "
                f"exist: put torch-fidelity's weights-inception-2015-12-05-6726825d.pth there (nothing is downloaded), "
                f"or use eval.fid_features=teacher"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ImportError(
                "eval.fid_features=inception needs the torch-fidelity package (pip install -c constraints.txt torch-fidelity)"
            ) from None
        self.net = FeatureExtractorInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = (images_BCHW.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(x)[0].reshape(x.shape[0], -1)


class _Precomputed(nn.Module):
    """Pass-through 'extractor' so that torchmetrics' FID accumulates features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return feats_BF


def make_fid(feature: nn.Module):
    """torchmetrics FrechetInceptionDistance over ``feature`` (an nn.Module with ``num_features``, taking
    [0, 1] images). ``update(images, real=...)`` then ``compute()``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False)


def fid_from_features(real_NF: torch.Tensor, fake_NF: torch.Tensor) -> float:
    """Frechet distance between two feature sets (torchmetrics' implementation)."""
    fid = make_fid(_Precomputed(real_NF.shape[1]))
    fid.update(real_NF, real=True)
    fid.update(fake_NF, real=False)
    return float(fid.compute())


class FIDPerDepth:
    """rFID for L reconstructions of the same real images: real features are extracted once."""

    def __init__(self, feature: nn.Module, depth: int):
        self.feature = feature
        self.depth = depth
        self.metrics = [make_fid(_Precomputed(int(feature.num_features))) for _ in range(depth)]
        self._real_added = False

    def to(self, device) -> "FIDPerDepth":
        self.feature.to(device)
        self.metrics = [m.to(device) for m in self.metrics]
        return self

    @torch.no_grad()
    def update(self, real_BCHW: torch.Tensor, fakes: Sequence[torch.Tensor]) -> None:
        """``fakes[l]``: the reconstruction from z_{l+1}, (B, 3, H, W) in [0, 1]."""
        self.update_features(self.feature(real_BCHW), [self.feature(f) for f in fakes])

    @torch.no_grad()
    def update_features(self, real_BF: torch.Tensor, fakes_BF: Sequence[torch.Tensor]) -> None:
        """As ``update`` with features already extracted by ``self.feature``."""
        if len(fakes_BF) != self.depth:
            raise ValueError(f"expected {self.depth} reconstructions, got {len(fakes_BF)}")
        real = real_BF.double()
        for m, fake in zip(self.metrics, fakes_BF):
            m.update(real, real=True)
            m.update(fake.double(), real=False)

    def compute(self) -> list[float]:
        """rFID per depth; NaN where fewer than 2 images were seen."""
        out = []
        for m in self.metrics:
            if int(m.real_features_num_samples) < 2 or int(m.fake_features_num_samples) < 2:
                out.append(float("nan"))
            else:
                out.append(float(m.compute()))
        return out


# -------------------------------------------------------------------------------------- CLIPSIM


def clipsim_pix(pooled_rec_BE: torch.Tensor, pooled_orig_BE: torch.Tensor) -> torch.Tensor:
    """Per-image cosine (B,) between teacher embeddings of the reconstruction and of the original."""
    return F.cosine_similarity(pooled_rec_BE.float(), pooled_orig_BE.float(), dim=-1)


def resize_tokens(tokens_BTc: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Area-resize a token grid (B, gh*gw, c) -> (B, h*w, c) (identity when the grids agree)."""
    if tuple(src_grid) == tuple(dst_grid):
        return tokens_BTc
    B, T, c = tokens_BTc.shape
    if T != src_grid[0] * src_grid[1]:
        raise ValueError(f"{T} tokens do not fill a {src_grid[0]}x{src_grid[1]} grid")
    x = tokens_BTc.transpose(1, 2).reshape(B, c, *src_grid)
    x = F.interpolate(x, size=tuple(dst_grid), mode="area")
    return x.flatten(2).transpose(1, 2)


def clipsim_sem(
    sem_BTc: torch.Tensor,
    target_BTc: torch.Tensor,
    sem_grid: Optional[tuple[int, int]] = None,
    target_grid: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Per-image (B,) mean over tokens of the cosine between the semantic decoder's output and the
    teacher's patch tokens of the original; the target is area-resized to ``sem_grid`` when the grids differ."""
    if sem_grid is not None and target_grid is not None:
        target_BTc = resize_tokens(target_BTc, target_grid, sem_grid)
    if sem_BTc.shape != target_BTc.shape:
        raise ValueError(f"semantic output {tuple(sem_BTc.shape)} and target {tuple(target_BTc.shape)} differ; pass the grids")
    return F.cosine_similarity(sem_BTc.float(), target_BTc.float(), dim=-1).mean(1)


# ----------------------------------------------------------------------------------- codebooks


class CodeHistogram:
    """Counts of each code at each depth over a whole split: (L, K)."""

    def __init__(self, depth: int, codebook_size: int):
        self.counts_LK = torch.zeros(depth, codebook_size, dtype=torch.float64)

    def update(self, codes_NL: torch.Tensor) -> None:
        """``codes_NL``: integer codes, depth last: (N, L) or any (..., L)."""
        L, K = self.counts_LK.shape
        codes = codes_NL.reshape(-1, L).long().cpu()
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes outside [0, {K})")
        offsets = torch.arange(L) * K
        self.counts_LK += torch.bincount((codes + offsets).flatten(), minlength=L * K).view(L, K).double()

    def usage(self) -> list[float]:
        """Per depth: the fraction of the K codes used at least once."""
        return usage_from_counts(self.counts_LK)

    def perplexity(self) -> list[float]:
        """Per depth: exp(entropy) of the code distribution (K for uniform use, 1 for a single code)."""
        return perplexity_from_counts(self.counts_LK)


def usage_from_counts(counts_LK: torch.Tensor) -> list[float]:
    return ((counts_LK > 0).double().mean(1)).tolist()


def perplexity_from_counts(counts_LK: torch.Tensor) -> list[float]:
    out = []
    for row in counts_LK.double():
        total = row.sum()
        if total <= 0:
            out.append(float("nan"))
            continue
        p = row[row > 0] / total
        out.append(math.exp(float(-(p * p.log()).sum())))
    return out

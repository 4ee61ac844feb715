"""Reconstruction and representation metrics, as plain functions and small accumulators.

One implementation of each: the analysis package and the tokenizer's training loop call these.

- ``psnr`` / ``ssim``: per image, images (B, 3, H, W) in [0, 1]; torchmetrics' functional
  implementations (PSNR in float64, SSIM in float32 or the input's wider dtype).
- rFID: torchmetrics' ``FrechetInceptionDistance`` over a pluggable feature extractor (an
  ``nn.Module`` mapping [0, 1] images to (B, F)): the teacher's pooled embedding (``TeacherPooled``,
  the embedded default) or torch-fidelity's InceptionV3 2048-d pool features from a local weights
  file (``InceptionPool``, for numbers comparable to the literature). ``FIDPerDepth`` extracts the
  real features once and scores every depth against them; ``fid_from_features`` scores two feature
  sets. Each extractor's ``description`` names its feature space (metrics.json ``extractors``).
- ``clipsim_pix`` / ``clipsim_sem``: DESIGN §1 (Fig. 5b).
- ``CodeHistogram``: codebook usage and perplexity per depth over a split
  (:mod:`evotok.models.codestats`, shared with the quantizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evotok.models.codestats import code_counts, perplexity_from_counts, usage_from_counts
from evotok.models.grids import resize_token_grid
from evotok.models.losses import token_cosine

PSNR_CAP_DB = 100.0  # identical images: PSNR is +inf; capped so that averages and JSON stay finite
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004; torchmetrics derives the Gaussian window 11 from sigma 1.5
PIXEL_SPACE = "pixels in [0,1] (torchmetrics)"  # the 'extractor' of psnr / ssim


def _at_least_float32(*tensors: torch.Tensor) -> torch.dtype:
    """The tensors' common dtype, promoted to at least float32 (half -> float32, float64 stays)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------------------------- pixels


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, data_range: float = 1.0, max_db: Optional[float] = PSNR_CAP_DB) -> torch.Tensor:
    """Per-image PSNR in dB, (B,): 10 log10(data_range^2 / mse), torchmetrics'
    ``peak_signal_noise_ratio`` over (C, H, W) in float64. Identical images give ``max_db`` (or +inf
    with ``max_db=None``)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    out = peak_signal_noise_ratio(
        x_BCHW.double(), y_BCHW.double(), data_range=float(data_range), reduction="none", dim=(1, 2, 3)
    )  # mse 0 -> +inf
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out.float()


def ssim(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (B,) with a Gaussian window 11, sigma 1.5 (Wang et al. 2004), averaged over
    channels and over the valid window positions: torchmetrics' ``structural_similarity_index_measure``
    with its map cropped by the window radius. torchmetrics reflect-pads the images and averages the
    whole map; the crop drops the positions whose window reaches into the padding, which matches
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` and this function's earlier numbers. Computed in float32 (float64
    for float64 input): within 2e-6 of skimage's float64 on [0, 1] images, and 6x faster on CPU.

    Images smaller than the window (side < 11) use the largest odd window k that fits, with
    sigma = (k - 1) / 7 so that torchmetrics' window (2 * int(3.5 sigma + 0.5) + 1) is exactly k."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(SSIM_WINDOW, x_BCHW.shape[-1], x_BCHW.shape[-2])
    if size % 2 == 0:
        size -= 1
    sigma = SSIM_SIGMA if size == SSIM_WINDOW else max((size - 1) / 7.0, 0.1)  # 0.1: a 1-pixel window
    dtype = _at_least_float32(x_BCHW, y_BCHW)
    _, map_BCHW = structural_similarity_index_measure(
        x_BCHW.to(dtype), y_BCHW.to(dtype), gaussian_kernel=True, sigma=sigma, data_range=float(data_range),
        reduction="none", return_full_image=True,
    )
    r = (size - 1) // 2
    valid = map_BCHW[..., r: map_BCHW.shape[-2] - r, r: map_BCHW.shape[-1] - r]
    return valid.flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------ rFID


class TeacherPooled(nn.Module):
    """FID feature extractor: the teacher's L2-normalised pooled embedding of [0, 1] images."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.num_features = int(teacher.embed_dim)
        arch = getattr(teacher, "arch", "") or "?"
        self.description = f"teacher pooled embeddings (open_clip {arch}, L2-normalised, {self.num_features}-d)"

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
        self.description = f"Inception-v3 pool3 2048-d features (torch-fidelity weights {path.name})"

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


def fid_from_features(real_NF: torch.Tensor | np.ndarray, fake_NF: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F), tensors or
    arrays, in float64 (torchmetrics' implementation, unbiased covariances): the one FID of the suite.
    Needs at least 2 rows in each set."""
    real = torch.as_tensor(real_NF).double()
    fake = torch.as_tensor(fake_NF, device=real.device).double()
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, F) and (M, F); got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 feature rows per set; got {real.shape[0]} and {fake.shape[0]}")
    fid = make_fid(_Precomputed(real.shape[1])).to(real.device)
    fid.update(real, real=True)
    fid.update(fake, real=False)
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
    """Per-image cosine (B,) between teacher embeddings of the reconstruction and of the original
    (broadcasting over leading axes: (L, B, E) against (B, E) gives (L, B)); float32, or float64 for
    float64 input."""
    dtype = _at_least_float32(pooled_rec_BE, pooled_orig_BE)
    return F.cosine_similarity(pooled_rec_BE.to(dtype), pooled_orig_BE.to(dtype), dim=-1)


def clipsim_sem(
    sem_BTc: torch.Tensor,
    target_BTc: torch.Tensor,
    sem_grid: Optional[tuple[int, int]] = None,
    target_grid: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Per-image (B,) mean over tokens of the cosine between the semantic decoder's output and the
    teacher's patch tokens of the original; the target is resized to ``sem_grid`` with
    :func:`evotok.models.grids.resize_token_grid` (the model's own training target) when the grids differ."""
    if sem_grid is not None and target_grid is not None:
        target_BTc = resize_token_grid(target_BTc, target_grid, sem_grid)
    if sem_BTc.shape != target_BTc.shape:
        raise ValueError(f"semantic output {tuple(sem_BTc.shape)} and target {tuple(target_BTc.shape)} differ; pass the grids")
    return token_cosine(sem_BTc, target_BTc)  # the tokenizer's validation CLIPSIM_sem is the same function


# ----------------------------------------------------------------------------------- codebooks


class CodeHistogram:
    """Counts of each code at each depth over a whole split: ``counts_LK`` (L, K) float64 on the CPU."""

    def __init__(self, depth: int, codebook_size: int):
        self.counts_LK = torch.zeros(depth, codebook_size, dtype=torch.float64)

    def update(self, codes_NL: torch.Tensor) -> None:
        """``codes_NL``: integer codes, depth last: (N, L) or any (..., L); counted on their device."""
        L, K = self.counts_LK.shape
        self.counts_LK += code_counts(codes_NL, L, K).cpu()

    def usage(self) -> list[float]:
        """Per depth: the fraction of the K codes used at least once."""
        return usage_from_counts(self.counts_LK).tolist()

    def perplexity(self) -> list[float]:
        """Per depth: exp(entropy) of the code distribution (K for uniform use, 1 for a single code,
        NaN for a depth with no codes counted)."""
        return perplexity_from_counts(self.counts_LK).tolist()

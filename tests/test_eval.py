"""Reconstruction metrics: PSNR, SSIM, rFID, CLIPSIM, token-grid resize, codebook usage/perplexity, evaluate_recon."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evotok.eval.metrics import (
    PSNR_CAP_DB,
    CodeHistogram,
    FIDPerDepth,
    InceptionPool,
    TeacherPooled,
    clipsim_pix,
    clipsim_sem,
    fid_from_features,
    psnr,
    ssim,
)
from evotok.models.codestats import code_counts, perplexity_from_counts, usage_from_counts, usage_perplexity
from evotok.models.grids import resize_token_grid


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images so that SSIM is not dominated by noise
    base = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_capped_or_inf():
    x = _images()
    assert torch.all(psnr(x, x) == PSNR_CAP_DB)
    assert torch.all(torch.isinf(psnr(x, x, max_db=None)))


def test_psnr_matches_definition_per_image():
    x = _images()
    g = torch.Generator().manual_seed(1)
    sigmas = torch.tensor([0.01, 0.05, 0.1, 0.2]).view(-1, 1, 1, 1)
    y = x + sigmas * torch.randn(x.shape, generator=g)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    expected = 10 * torch.log10(1.0 / mse)
    got = psnr(y, x)
    assert got.shape == (4,)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    assert torch.all(got[:-1] > got[1:])  # more noise, lower PSNR


# ------------------------------------------------------------------------------------------- SSIM


def test_ssim_identity_and_monotone_in_noise():
    x = _images()
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    values = [float(ssim(x + s * noise, x).mean()) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]


def _skimage_ssim(x, y, sigma=1.5):
    from skimage.metrics import structural_similarity

    return [
        structural_similarity(
            x[i].permute(1, 2, 0).numpy().astype(np.float64), y[i].permute(1, 2, 0).numpy().astype(np.float64),
            gaussian_weights=True, sigma=sigma, use_sample_covariance=False, data_range=1.0, channel_axis=2,
        )
        for i in range(len(x))
    ]


@pytest.mark.parametrize("size", [32, 11])
def test_ssim_matches_skimage(size):
    """torchmetrics' SSIM map cropped by the window radius is skimage's (both Gaussian 11 / sigma 1.5, valid
    positions only): the same numbers up to float32 rounding (about 1e-6), so the old 1e-4 tolerance stands.
    torchmetrics' own mean over the whole reflect-padded map differs by far more (checked below), which is
    why ssim() crops."""
    pytest.importorskip("skimage")
    x = _images(n=2, size=size, seed=3)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    ours = ssim(y, x)
    assert ours.shape == (2,)
    ref = _skimage_ssim(x, y)
    for i in range(2):
        assert abs(float(ours[i]) - ref[i]) < 1e-4
    if size == 32:
        from torchmetrics.functional.image import structural_similarity_index_measure

        padded = structural_similarity_index_measure(y.double(), x.double(), data_range=1.0, reduction="none")
        assert float((padded - ours.double()).abs().max()) > 1e-3


def test_ssim_small_images_use_the_largest_odd_window():
    """8 px < 11: window 7 with sigma 6/7, which is exactly skimage's Gaussian window for that sigma."""
    pytest.importorskip("skimage")
    x = _images(n=2, size=8, seed=5)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    ours = ssim(y, x)
    for i, ref in enumerate(_skimage_ssim(x, y, sigma=6 / 7)):
        assert abs(float(ours[i]) - ref) < 1e-4


# -------------------------------------------------------------------------------------------- FID


def test_fid_self_zero_and_shift_equals_squared_mean_distance():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    assert abs(fid_from_features(a, a)) < 1e-6
    shift = torch.full((8,), 0.5, dtype=torch.float64)
    # same covariance: the trace term vanishes and FID = ||mu_a - mu_b||^2 = 8 * 0.25
    assert fid_from_features(a, a + shift) == pytest.approx(2.0, rel=1e-4)
    b = torch.randn(2000, 8, generator=g, dtype=torch.float64) * 2.0  # different covariance
    assert fid_from_features(a, b) > 1.0


def test_fid_of_1d_gaussian_sets_is_the_closed_form():
    """1-D: FID = (mu1 - mu2)^2 + s1^2 + s2^2 - 2 s1 s2 = (mu1 - mu2)^2 + (s1 - s2)^2 (unbiased std)."""
    rng = np.random.default_rng(7)
    a = rng.normal(0.0, 1.0, (500, 1))
    b = rng.normal(3.0, 2.0, (400, 1))
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert 9.0 < want < 11.0  # about 3^2 + 1^2
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-9)  # numpy arrays in, float out
    assert isinstance(fid_from_features(a, b), float)
    assert abs(fid_from_features(torch.from_numpy(a), torch.from_numpy(a))) < 1e-9
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(a[:1], b)


def test_fid_per_depth_with_a_feature_module():
    torch.manual_seed(0)
    feature = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    feature.num_features = 6
    fid = FIDPerDepth(feature, depth=2)
    for seed in range(3):
        x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        fid.update(x, [x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1)])
    exact, noisy = fid.compute()
    assert abs(exact) < 1e-6 and noisy > 1e-3


def test_fid_teacher_features_and_tiny_batches(random_teacher):
    feature = TeacherPooled(random_teacher)
    assert feature.num_features == random_teacher.embed_dim
    fid = FIDPerDepth(feature, depth=1)
    x = _images(n=1)
    fid.update(x, [x])
    assert math.isnan(fid.compute()[0])  # one image: no covariance, reported as NaN (null in JSON)


def test_inception_missing_weights_names_key_and_path(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError) as e:
        InceptionPool(missing)
    assert str(missing) in str(e.value) and "eval.inception_weights" in str(e.value)


def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch):
    """The torch-fidelity path with a random (but complete) weights file: 2048-d features, no download."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as m:  # build once without weights to write a full random state dict
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    feature = InceptionPool(weights)
    x = _images(n=2)
    feats = feature(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert torch.equal(feats, feature((x * 255).round() / 255))  # 8-bit quantised before the network
    from evotok.eval.recon import metric_extractors

    assert feature.description == "Inception-v3 pool3 2048-d features (torch-fidelity weights inception.pth)"
    ext = metric_extractors(feature.description, "evotok-teacher-tiny-avg", "realphotos/")
    assert ext["realphotos/rfid"] == "Fréchet distance of Inception-v3 pool3 2048-d features (torch-fidelity weights inception.pth)"


# ---------------------------------------------------------------------------------------- CLIPSIM


def test_clipsim_pix_is_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(clipsim_pix(a, b), torch.tensor([1 / math.sqrt(2), -1.0]))


def test_clipsim_sem_per_token_mean_and_grid_resize():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sem = torch.stack([e0, e0, e0, e1]).unsqueeze(0)  # (1, 4 tokens = 2x2 grid, 2)
    assert torch.allclose(clipsim_sem(sem, sem), torch.ones(1))
    assert torch.allclose(clipsim_sem(sem, torch.stack([e0] * 4).unsqueeze(0)), torch.tensor([0.75]))
    # a 1x1 teacher grid is area-resized (replicated) to the 2x2 latent grid
    target = e0.view(1, 1, 2)
    assert torch.allclose(clipsim_sem(sem, target, sem_grid=(2, 2), target_grid=(1, 1)), torch.tensor([0.75]))
    # shrinking is an area average
    assert torch.allclose(resize_token_grid(sem, (2, 2), (1, 1)), torch.tensor([[[0.75, 0.25]]]))
    with pytest.raises(ValueError):
        clipsim_sem(sem, target)


def test_resize_token_grid_area_identity_and_bad_grid():
    grid = torch.arange(16, dtype=torch.float64).reshape(4, 4)  # row-major 4x4 grid, one channel
    tokens = grid.reshape(1, 16, 1)
    down = resize_token_grid(tokens, (4, 4), (2, 2))
    # each 2x2 block averaged: [[0,1,4,5], [2,3,6,7], [8,9,12,13], [10,11,14,15]]
    assert down.shape == (1, 4, 1)
    assert down.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    up = resize_token_grid(down, (2, 2), (4, 4)).reshape(4, 4)  # growing replicates
    assert torch.equal(up[:2, :2], torch.full((2, 2), 2.5, dtype=torch.float64)) and up[3, 3] == 12.5
    assert resize_token_grid(tokens, (4, 4), (4, 4)) is tokens
    with pytest.raises(ValueError, match=r"15 tokens do not fill the source grid 4x4"):
        resize_token_grid(tokens[:, :15], (4, 4), (2, 2))


# -------------------------------------------------------------------------------------- codebooks


def test_code_histogram_usage_and_perplexity():
    hist = CodeHistogram(depth=3, codebook_size=4)
    codes = torch.tensor([[0, 0, 2], [1, 1, 2], [0, 2, 2], [1, 3, 2]])  # (N=4, L=3)
    hist.update(codes[:2])
    hist.update(codes[2:].view(1, 2, 1, 3))  # any (..., L) layout
    assert hist.counts_LK.sum().item() == 12
    assert hist.usage() == pytest.approx([0.5, 1.0, 0.25])
    assert hist.perplexity() == pytest.approx([2.0, 4.0, 1.0])
    with pytest.raises(ValueError):
        hist.update(torch.tensor([[0, 4, 0]]))


def test_usage_and_perplexity_from_counts():
    K = 8
    counts_LK = torch.zeros(3, K, dtype=torch.float64)
    counts_LK[0] = 5.0  # uniform use
    counts_LK[1, 3] = 7.0  # one code
    # row 2: nothing counted
    usage, perplexity = usage_perplexity(counts_LK)
    assert torch.equal(usage, usage_from_counts(counts_LK)) and usage.tolist() == [1.0, 1 / K, 0.0]
    assert perplexity[0].item() == pytest.approx(K) and perplexity[1].item() == pytest.approx(1.0)
    assert math.isnan(perplexity[2].item())
    torch.testing.assert_close(perplexity, perplexity_from_counts(counts_LK), equal_nan=True)
    # integer counts and the histogram of codes give the same numbers
    codes_NL = torch.tensor([[0, 3], [1, 3], [2, 3], [3, 3]])
    c = code_counts(codes_NL, 2, 4)
    assert c.dtype == torch.float64 and c.tolist() == [[1, 1, 1, 1], [0, 0, 0, 4]]
    assert perplexity_from_counts(c.long()).tolist() == pytest.approx([4.0, 1.0])
    with pytest.raises(ValueError, match=r"codes outside \[0, 4\)"):
        code_counts(torch.tensor([[0, -1]]), 2, 4)


def test_code_histogram_reports_nan_perplexity_for_an_empty_depth():
    hist = CodeHistogram(depth=2, codebook_size=4)
    assert hist.usage() == [0.0, 0.0]
    assert all(math.isnan(p) for p in hist.perplexity())


# ------------------------------------------------------------------------------ evaluate_recon


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tokenizer trained for a few steps (L = 3) against a random-init teacher."""
    from evotok.config import load_config
    from evotok.lit.train import train

    root = tmp_path_factory.mktemp("tok")
    cfg = load_config(None, [
        f"run.dir={root / 'runs'}", "run.name=t", f"data.cache_dir={root / 'cache'}",
        "data.train_size=128", "data.val_size=40", "data.test_size=8", "data.batch_size=16",
        "model.preset=tiny", "model.lpix=2", "model.lsem=3", "model.quantizer.codebook_size=32",
        "teacher.random_init=true", "loss.gan_start=100000", "loss.lpips_weight=0",
        "trainer.max_steps=6", "trainer.val_every_n_steps=6", "trainer.threads=1", "trainer.progress_bar=false",
    ])
    return train(cfg, "tokenizer")


def test_evaluate_recon_writes_per_depth_metrics(tokenizer_run, tmp_path, random_teacher):
    from evotok.eval.recon import PER_DEPTH_NAMES, evaluate_recon
    from evotok.runs import read_metrics

    out = tmp_path / "results" / "recon.json"
    rec = evaluate_recon(tokenizer_run.path, max_images=24, out=out, batch_size=16, progress=False)
    metrics = read_metrics(tokenizer_run)
    for name in PER_DEPTH_NAMES:
        assert len(rec["per_depth"][name]) == 3, name
        assert metrics["per_depth"][name] == pytest.approx(rec["per_depth"][name], nan_ok=True)
    assert rec["recon_eval"]["num_images"] == 24
    pd = rec["per_depth"]
    assert all(0 < u <= 1 for u in pd["usage"]) and all(1 <= p <= 32 for p in pd["perplexity"])
    assert all(0 < v < 100 for v in pd["psnr"]) and all(-1 <= v <= 1 for v in pd["ssim"])
    assert all(-1 <= v <= 1 for v in pd["clipsim_pix"] + pd["clipsim_sem"])
    assert all(v >= 0 for v in pd["rfid"])
    assert json.loads(out.read_text())["per_depth"]["psnr"] == pytest.approx(pd["psnr"])
    # every per-depth metric it wrote says its feature space, in the record and in metrics.json
    arch, E = random_teacher.arch, random_teacher.embed_dim
    for ext in (rec["extractors"], metrics["extractors"], json.loads(out.read_text())["extractors"]):
        assert set(rec["per_depth"]) <= set(ext)
        assert ext["rfid"] == f"Fréchet distance of teacher pooled embeddings (open_clip {arch}, L2-normalised, {E}-d)"
        assert arch in ext["clipsim_pix"] and arch in ext["clipsim_sem"] and "patch tokens" in ext["clipsim_sem"]
        assert ext["psnr"] == ext["ssim"] == "pixels in [0,1] (torchmetrics)"
        assert ext["usage"] == ext["perplexity"] == "code histogram over the split"


def test_evaluate_recon_realphotos_prefix_and_extractors_merge(tokenizer_run):
    from evotok.eval.recon import evaluate_recon
    from evotok.runs import read_metrics, write_metrics

    names = {f"realphotos/{n}" for n in ("rfid", "psnr", "ssim", "clipsim_pix", "clipsim_sem", "usage", "perplexity")}
    rec = evaluate_recon(tokenizer_run.path, split="test", max_images=8, data_overrides=["data.source=realphotos"],
                         progress=False, write=False)
    assert set(rec["per_depth"]) == names and set(rec["extractors"]) == names
    assert len(rec["per_depth"]["realphotos/psnr"]) == 3
    # an evaluation keeps the extractors of the metrics written before it (write_metrics replaces the key)
    old = read_metrics(tokenizer_run)
    write_metrics(tokenizer_run, old["stage"], old["step"], extra={"extractors": {**old.get("extractors", {}), "earlier/x": "kept"}})
    evaluate_recon(tokenizer_run.path, split="test", max_images=8, data_overrides=["data.source=realphotos"],
                   progress=False)
    ext = read_metrics(tokenizer_run)["extractors"]
    assert ext["earlier/x"] == "kept" and names <= set(ext)
    assert ext["realphotos/rfid"].startswith("Fréchet distance of teacher pooled embeddings")


def test_format_table_prints_rfid_with_three_significant_digits():
    from evotok.eval.recon import format_table

    table = format_table({"rfid": [0.0077634, 6.2e-05, 6.25e-05], "psnr": [20.0, 21.5, 22.25]})
    rows = table.splitlines()
    assert rows[0].split() == ["depth", "rfid", "psnr"]
    assert [r.split()[1] for r in rows[1:]] == ["0.00776", "6.2e-05", "6.25e-05"]
    assert [r.split()[2] for r in rows[1:]] == ["20.0000", "21.5000", "22.2500"]

"""End to end: a real tiny tokenizer trained for a few steps -> cached features -> the whole figure set."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("evotok.api", reason="evotok.api (load_tokenizer) has not landed yet")

N_IMAGES = 48  # = data.val_size: the extracted images are exactly the val split, in order
LPIX, LSEM = 2, 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from threadpoolctl import threadpool_limits

    from evotok.config import load_config
    from evotok.lit.train import train

    tmp = tmp_path_factory.mktemp("analysis_e2e")
    cfg = load_config(None, [
        f"run.dir={tmp}", "run.name=tiny", "trainer.max_steps=4", "trainer.val_every_n_steps=4",
        "trainer.ckpt_every_n_steps=4", "trainer.progress_bar=false", "trainer.accelerator=cpu",
        "teacher.random_init=true", f"data.cache_dir={tmp}/cache", "data.train_size=64",
        f"data.val_size={N_IMAGES}", "data.test_size=16", "data.batch_size=16",
        f"model.lpix={LPIX}", f"model.lsem={LSEM}", "model.quantizer.codebook_size=32",
        "loss.lpips_weight=0", "loss.gan_start=100000",
    ])
    with threadpool_limits(1):
        run = train(cfg, "tokenizer", argv=["test"])
    return run, cfg


@pytest.mark.slow  # trains a model: about 50 s alone, up to 2 min on a busy 2-core machine
def test_tiny_checkpoint_to_figure_set(tiny_run, tmp_path):
    import torch
    from threadpoolctl import threadpool_limits

    from analysis.extract import default_path, extract, load_features
    from analysis.make_figures import make_figures
    from evotok.api import load_tokenizer
    from evotok.data import build_dataset

    run, cfg = tiny_run
    kw = dict(n_images=N_IMAGES, n_positions=150, depths=(1, 2, 3, 16), k=4, tsne_points=240, tsne_max_iter=250,
              device="cpu", probes=False)  # the probes have their own tests (tests/test_probes.py)
    with threadpool_limits(1):
        index = make_figures([run.path], tmp_path / "figs", **kw)

    # the cached features: shapes, labels, and numbers that agree with the model and the data
    npz = default_path(run.path, "val", N_IMAGES)
    assert npz.is_file()
    f = load_features(npz)
    L, d = max(LPIX, LSEM), cfg.model.quantizer.dim
    assert (f["lpix"], f["lsem"], f["L"]) == (LPIX, LSEM, L)
    assert f["pooled_LBd"].shape == (L, N_IMAGES, d) and f["positions_LPd"].shape == (L, 150, d)
    assert f["recon_teacher_LBE"].shape[:2] == (L, N_IMAGES) and f["clipsim_sem_LB"].shape == (L, N_IMAGES)
    assert f["images_BHWC"].shape == (N_IMAGES, 32, 32, 3) and f["images_BHWC"].dtype == np.uint8
    assert set(f["labels"]) == {"shape", "count", "color", "texture", "background"}
    ds = build_dataset(cfg.data, "val")
    x = torch.stack([ds[i]["image"] for i in range(4)])
    np.testing.assert_array_equal(f["images_BHWC"][:4], (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert [ds[i]["labels"]["shape"] for i in range(4)] == f["labels"]["shape"][:4].tolist()
    tok = load_tokenizer(run.path)
    tok = tok.eval() if hasattr(tok, "eval") else tok
    with torch.no_grad():
        z = tok.cumulative(x)
    np.testing.assert_allclose(f["pooled_LBd"][:, :4], z.mean(dim=(-2, -1)).numpy(), rtol=1e-4, atol=1e-5)
    # PSNR at Lpix from the features = the trainer's validation PSNR on the same images and weights
    metrics = json.loads(run.metrics.read_text())
    val_psnr = metrics["scalars"].get("val/psnr", metrics["scalars"].get("val_psnr"))
    assert f["psnr_LB"][LPIX - 1].mean() == pytest.approx(val_psnr, abs=0.05)

    # the figure set
    out = tmp_path / "figs"
    assert index == out / "index.html"
    html = index.read_text()
    for stem in ("tiny/tsne", "tiny/clusters", "tiny/nmi", "depth_curves"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
        assert f'src="{stem}.png"' in html
    nmi = json.loads((out / "nmi.json").read_text())["tiny"]["nmi"]
    assert set(nmi) == set(f["labels"]) and all(len(v) == L and all(0 <= x <= 1 for x in v) for v in nmi.values())
    table = (out / "ablation.md").read_text().strip().splitlines()
    assert len(table) == 3 and table[2].startswith(f"| tiny | {LPIX} | {LSEM} |") and "–" not in table[2].split("|")[4:6]
    assert "depths [16] exceed L=3" in html

    # cache: reused while the checkpoint is unchanged, recomputed when it changes
    mtime = npz.stat().st_mtime_ns
    assert extract(run.path, n_images=N_IMAGES, n_positions=150, device="cpu") == npz
    assert npz.stat().st_mtime_ns == mtime
    ckpt = run.best_ckpt if run.best_ckpt.is_file() else run.last_ckpt
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert extract(run.path, n_images=N_IMAGES, n_positions=150, device="cpu") == npz
    assert npz.stat().st_mtime_ns != mtime

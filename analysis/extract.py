"""Extract per-depth features from a tokenizer checkpoint once, into one cached ``.npz``.

This is the only analysis step that loads a checkpoint; every figure is drawn from the arrays it
writes. Default file: ``<run>/analysis/features_<split>_<n_images>.npz``. The file stores a cache key
(checkpoint path, mtime and size, the resolved data config, split, sizes, seed, format version); a
second call with the same key returns the file untouched, any difference recomputes it.

Arrays in the file (L = depth, B = images, P = sampled latent positions, d = code dim,
E = teacher pooled width, W = teacher token width):

==========================  ==========================================================================
``pooled_LBd``              z_l averaged over the latent grid, per image and depth
``positions_LPd``           z_l at P random (image, position) pairs, the same pairs at every depth
``position_index_P2``       those pairs: (image index, flat position index h * w)
``recon_teacher_LBE``       teacher pooled features of the image reconstructed from z_l (pixel decoder)
``orig_teacher_BE``         teacher pooled features of the original
``orig_tokens_BW``          teacher token features of the original, averaged over tokens
``sem_LBW``                 semantic decoder output from z_l, averaged over tokens
``clipsim_sem_LB``          per-token cosine(semantic decoder(z_l), teacher tokens of the original), mean per image
``clipsim_pix_LB``          cosine(teacher(recon from z_l), teacher(original)) per image
``psnr_LB``                 PSNR (dB, [0,1] range, capped at 100) of the reconstruction from z_l, per image
``images_BHWC``             the images as uint8 (longest side at most ``max_image_px``), for cluster grids
``label_<factor>``          factor labels per image (-1 = unknown); ``factors`` lists the factor names
``lpix``, ``lsem``, ``L``   the model's supervision depths and total depth
``cache_key``               JSON text of the cache key
==========================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

FORMAT_VERSION = 1


def default_path(run_path: str | Path, split: str, n_images: int) -> Path:
    return Path(run_path) / "analysis" / f"features_{split}_{n_images}.npz"


def apply_data_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """``cfg`` with data overrides applied; the ``data.`` prefix is optional."""
    from evotok.config import with_overrides

    return with_overrides(cfg, [o if o.startswith("data.") else f"data.{o}" for o in overrides])


def cache_key(ckpt: Path, data_cfg: Any, split: str, n_images: int, n_positions: int, seed: int,
              max_image_px: int) -> str:
    st = Path(ckpt).stat()
    data = dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else dict(data_cfg)
    # batch size and workers do not change what is extracted
    for k in ("batch_size", "num_workers"):
        data.pop(k, None)
    key = {
        "format": FORMAT_VERSION,
        "ckpt": str(Path(ckpt).resolve()),
        "ckpt_mtime_ns": st.st_mtime_ns,
        "ckpt_size": st.st_size,
        "data": data,
        "split": split,
        "n_images": int(n_images),
        "n_positions": int(n_positions),
        "seed": int(seed),
        "max_image_px": int(max_image_px),
    }
    return json.dumps(key, sort_keys=True, default=str)


def stored_key(path: Path) -> Optional[str]:
    """The cache key inside an existing features file, or None when it is absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return str(f["cache_key"]) if "cache_key" in f.files else None
    except (OSError, ValueError, KeyError):
        return None


def load_features(path: str | Path) -> dict[str, Any]:
    """All arrays of a features file, plus ``labels`` ({factor: labels_B}), ``factors`` (list of names) and
    ``lpix``, ``lsem``, ``L`` as ints."""
    with np.load(path, allow_pickle=False) as f:
        out: dict[str, Any] = {k: f[k] for k in f.files}
    out["factors"] = [str(x) for x in out.get("factors", np.array([], dtype=str))]
    out["labels"] = {name: out[f"label_{name}"] for name in out["factors"] if f"label_{name}" in out}
    for k in ("lpix", "lsem", "L"):
        out[k] = int(out[k])
    out["cache_key"] = str(out["cache_key"])
    return out


def _select_items(ds: Any, n: int, seed: int) -> Iterable[dict]:
    """``n`` items: a seeded random subset (in index order) of a map-style dataset, else the first ``n``."""
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        size = len(ds)
        if size < n:
            raise ValueError(f"the split has {size} images, fewer than n_images={n}")
        idx = np.arange(size) if size == n else np.sort(np.random.default_rng(seed).choice(size, n, replace=False))
        return (ds[int(i)] for i in idx)

    def first():
        count = 0
        for item in ds:
            if count >= n:
                return
            count += 1
            yield item
    return first()


def _batches(items: Iterable[dict], batch_size: int):
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _factor_names() -> list[str]:
    try:
        from evotok.data.evoshapes import FACTORS

        return list(FACTORS)
    except ImportError:
        return []


def extract(
    run_or_ckpt: str | Path,
    split: str = "val",
    n_images: int = 512,
    n_positions: int = 2000,
    out: str | Path | None = None,
    data_overrides: Sequence[str] = (),
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    max_image_px: int = 96,
    force: bool = False,
) -> Path:
    """Extract the per-depth arrays (module docstring) of ``n_images`` images of ``split`` and return the
    ``.npz`` path; reuse the file when its cache key matches (``force=True`` recomputes)."""
    from evotok.runs import resolve_run

    run, ckpt = resolve_run(run_or_ckpt)
    cfg = apply_data_overrides(run.load_config(), data_overrides)
    path = Path(out) if out is not None else default_path(run.path, split, n_images)
    key = cache_key(ckpt, cfg.data, split, n_images, n_positions, seed, max_image_px)
    if not force and path.is_file() and stored_key(path) == key:
        return path
    arrays = _compute(ckpt, cfg, split, n_images, n_positions, seed, batch_size, device, max_image_px)
    arrays["cache_key"] = np.array(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: a killed extraction never leaves half a file behind
    return path


def _compute(ckpt: Path, cfg: Any, split: str, n_images: int, n_positions: int, seed: int, batch_size: int,
             device: str, max_image_px: int) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    from evotok.api import load_tokenizer
    from evotok.data import build_dataset
    from evotok.eval.metrics import clipsim_pix, clipsim_sem, psnr
    from evotok.models.grids import resize_token_grid

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(ckpt)
    tok = tok.to(device).eval() if hasattr(tok, "to") else tok
    from evotok.api import load_run_teacher

    teacher = load_run_teacher(ckpt)  # the run's own teacher, found through its upstream record and verified
    teacher = teacher.to(device).eval() if hasattr(teacher, "to") else teacher
    lpix, lsem, L = int(tok.lpix), int(tok.lsem), int(tok.depth)

    ds = build_dataset(cfg.data, split)
    factors = _factor_names()
    labels: dict[str, list[int]] = {f: [] for f in factors}
    rng = np.random.default_rng(seed)
    pos_sel: Optional[np.ndarray] = None  # (P, 2) image index, flat position
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in (
        "pooled", "recon_teacher", "orig_teacher", "orig_tokens", "sem", "clipsim_sem", "clipsim_pix", "psnr", "images")}
    positions: list[np.ndarray] = []
    seen = 0
    with torch.no_grad():
        for batch in _batches(_select_items(ds, n_images, seed), batch_size):
            x = torch.stack([torch.as_tensor(b["image"], dtype=torch.float32) for b in batch]).to(device)
            B = x.shape[0]
            for b in batch:
                lab = b.get("labels") or {}
                for f in lab:
                    if f not in labels:
                        labels[f] = [-1] * seen
                for f in labels:
                    labels[f].append(int(lab.get(f, -1)))
            z = tok.cumulative(x)  # (L, B, d, h, w)
            if z.shape[0] != L:
                raise RuntimeError(f"tokenizer.cumulative returned {z.shape[0]} depths, the model has depth {L}")
            _, _, d, h, w = z.shape
            if pos_sel is None:
                total = n_images * h * w
                flat = np.sort(rng.choice(total, size=min(n_positions, total), replace=False))
                pos_sel = np.stack([flat // (h * w), flat % (h * w)], axis=1)
            chunks["pooled"].append(z.mean(dim=(-2, -1)).float().cpu().numpy())
            mine = pos_sel[(pos_sel[:, 0] >= seen) & (pos_sel[:, 0] < seen + B)]
            zf = z.flatten(-2)  # (L, B, d, h*w)
            bi = torch.as_tensor(mine[:, 0] - seen, device=zf.device)
            pi = torch.as_tensor(mine[:, 1], device=zf.device)
            positions.append(zf[:, bi, :, pi].permute(1, 0, 2).float().cpu().numpy() if len(mine) else
                             np.zeros((L, 0, d), np.float32))
            # teacher targets of the original: pooled, and tokens on the latent grid
            orig_pooled = teacher.pooled(x).float()
            tokens = teacher.image_features(x).float()  # (B, T, W)
            if hasattr(tok, "semantic_target"):
                tokens = tok.semantic_target(tokens).float()  # the training target: area-resized to (h, w)
            elif tokens.shape[1] != h * w:
                side = int(round(tokens.shape[1] ** 0.5))
                if side * side != tokens.shape[1]:
                    raise RuntimeError(f"teacher returned {tokens.shape[1]} tokens, not a square grid")
                tokens = resize_token_grid(tokens, (side, side), (h, w))
            chunks["orig_teacher"].append(orig_pooled.cpu().numpy())
            chunks["orig_tokens"].append(tokens.mean(1).cpu().numpy())
            rt, sm, cs, cp, ps = [], [], [], [], []
            for l in range(1, L + 1):
                rec = tok.decode_pixels(z[l - 1], l).float().clamp(0, 1)
                rp = teacher.pooled(rec).float()
                rt.append(rp.cpu().numpy())
                cp.append(clipsim_pix(rp, orig_pooled).cpu().numpy())
                ps.append(psnr(rec, x).cpu().numpy())
                sem = tok.decode_semantic(z[l - 1], l).float()  # (B, h*w, W)
                sm.append(sem.mean(1).cpu().numpy())
                cs.append(clipsim_sem(sem, tokens).cpu().numpy())
            chunks["recon_teacher"].append(np.stack(rt))
            chunks["sem"].append(np.stack(sm))
            chunks["clipsim_sem"].append(np.stack(cs))
            chunks["clipsim_pix"].append(np.stack(cp))
            chunks["psnr"].append(np.stack(ps))
            xi = x
            if max(x.shape[-2:]) > max_image_px:
                scale = max_image_px / max(x.shape[-2:])
                xi = F.interpolate(x, scale_factor=scale, mode="area")
            chunks["images"].append((xi.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
            seen += B
    if seen < n_images:
        raise ValueError(f"split '{split}' yielded {seen} images, fewer than n_images={n_images}")
    arrays: dict[str, np.ndarray] = {
        "pooled_LBd": np.concatenate(chunks["pooled"], axis=1),
        "positions_LPd": np.concatenate(positions, axis=1),
        "position_index_P2": pos_sel.astype(np.int64),
        "recon_teacher_LBE": np.concatenate(chunks["recon_teacher"], axis=1),
        "orig_teacher_BE": np.concatenate(chunks["orig_teacher"], axis=0),
        "orig_tokens_BW": np.concatenate(chunks["orig_tokens"], axis=0),
        "sem_LBW": np.concatenate(chunks["sem"], axis=1),
        "clipsim_sem_LB": np.concatenate(chunks["clipsim_sem"], axis=1),
        "clipsim_pix_LB": np.concatenate(chunks["clipsim_pix"], axis=1),
        "psnr_LB": np.concatenate(chunks["psnr"], axis=1),
        "images_BHWC": np.concatenate(chunks["images"], axis=0),
        "factors": np.array(list(labels), dtype=str),
        "lpix": np.array(lpix),
        "lsem": np.array(lsem),
        "L": np.array(L),
        "split": np.array(split),
    }
    for f, v in labels.items():
        arrays[f"label_{f}"] = np.asarray(v, dtype=np.int64)
    return arrays

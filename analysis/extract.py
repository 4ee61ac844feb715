"""Extract per-depth features from a tokenizer checkpoint once, into one cached ``.npz``.

This is the only analysis step that loads a checkpoint; every figure is drawn from the arrays it
writes. Default file: ``<run>/analysis/features_<split>_<n_images>.npz``. The file stores a cache key
(checkpoint path, mtime and size, the resolved data config, split, sizes, seed, format version); a
second call with the same key returns the file untouched, any difference recomputes it.

Symbols: L = depth, B = images, P = sampled latent positions, d = code dim, E = teacher pooled width,
W = teacher token width, (h, w) = latent grid, T = h * w.

**Feature views.** Four per-depth views of an image, each pooled three ways and sampled per position:

========  ===============================================================================  =====
view      what                                                                             width
========  ===============================================================================  =====
``z``     cumulative z_l = q_1 + ... + q_l (the trajectory)                                d
``q``     the residual q_l = z_l - z_(l-1) of depth l alone (z_0 = 0)                      d
``sem``   the semantic decoder's output tokens from z_l                                    W
``recon`` the teacher's penultimate tokens of the pixel decoder's reconstruction from z_l  W
          (area-resized to the latent grid like the semantic target)
========  ===============================================================================  =====

=========  =========================================================================================
pooling    per image, over the T latent positions
=========  =========================================================================================
``mean``   the average
``max``    the per-channel maximum
``fg``     foreground-weighted average: weights = fraction of foreground pixels in each latent cell
           (``fg_Bhw``), so that background area does not dominate; for images without a known mask
           (``fg_known_B`` false) and images whose mask is empty it is the ``max`` pooling instead
``pos``    not pooled: the P sampled (image, position) pairs of ``position_index_P2``, the same at
           every depth and in every view
=========  =========================================================================================

Foreground masks: an EvoShapes image (item ``source == "evoshapes"`` with a ``background`` label) has
a flat background of a known colour (``evotok.data.evoshapes.BG_RGB``) plus pixel noise; a pixel is
foreground where some channel differs from that colour by more than ``FG_THRESHOLD`` (0.15 on [0, 1];
the closest object shade differs by 0.29, pixel noise has sigma 0.02), and ``fg_Bhw`` is the area
average of that pixel mask over each latent cell. Other sources have no mask (NaN).

:func:`view_array` returns any (view, pooling) as one array, ``(L, B, C)`` pooled or ``(L, P, C)`` for
``pos``; :data:`VIEW_ARRAYS` names the stored array of each. Arrays in the file:

==========================  ==========================================================================
``pooled_LBd``              z, mean pooling (the Fig. 6 / NMI feature of format 1)
``z_max_LBd``               z, max pooling
``z_fg_LBd``                z, fg pooling
``positions_LPd``           z at the P positions
``q_mean_LBd``              q, mean pooling (likewise ``q_max_LBd``, ``q_fg_LBd``)
``q_pos_LPd``               q at the P positions
``sem_LBW``                 sem, mean pooling (likewise ``sem_max_LBW``, ``sem_fg_LBW``)
``sem_pos_LPW``             sem at the P positions
``recon_mean_LBW``          recon, mean pooling (likewise ``recon_max_LBW``, ``recon_fg_LBW``)
``recon_pos_LPW``           recon at the P positions
``position_index_P2``       the sampled pairs: (image index, flat position index y * w + x)
``position_fg_P``           foreground fraction of each sampled position's latent cell (NaN: unknown)
``fg_Bhw``                  foreground fraction of every latent cell (NaN: no mask for that image)
``fg_known_B``              whether the image has a foreground mask
``latent_hw``               (h, w)
``recon_teacher_LBE``       teacher pooled features of the image reconstructed from z_l (pixel decoder)
``orig_teacher_BE``         teacher pooled features of the original
``orig_tokens_BW``          teacher token features of the original, averaged over tokens
``clipsim_sem_LB``          per-token cosine(semantic decoder(z_l), teacher tokens of the original), mean per image
``clipsim_pix_LB``          cosine(teacher(recon from z_l), teacher(original)) per image
``psnr_LB``                 PSNR (dB, [0,1] range, capped at 100) of the reconstruction from z_l, per image
``images_BHWC``             the images as uint8 (longest side at most ``max_image_px``), for cluster grids
``label_<factor>``          factor labels per image (-1 = unknown); ``factors`` lists the factor names
``lpix``, ``lsem``, ``L``   the model's supervision depths and total depth
``cache_key``               JSON text of the cache key
==========================  ==========================================================================

Size: about 4 bytes x L x (3 B + P) x (2 d + 2 W); 70 MB for the tiny run at 512 images and P = 2000.
"""


from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

FORMAT_VERSION = 2  # 2: the q / sem / recon views, max and fg poolings, foreground masks

VIEWS = ("z", "q", "sem", "recon")
POOLINGS = ("mean", "max", "fg")
POSITION = "pos"  # the per-position "pooling"
FG_THRESHOLD = 0.15  # max over channels of |pixel - background colour| above which a pixel is foreground

# (view, pooling) -> the stored array (module docstring)
VIEW_ARRAYS: dict[tuple[str, str], str] = {
    ("z", "mean"): "pooled_LBd", ("z", "max"): "z_max_LBd", ("z", "fg"): "z_fg_LBd", ("z", POSITION): "positions_LPd",
    ("q", "mean"): "q_mean_LBd", ("q", "max"): "q_max_LBd", ("q", "fg"): "q_fg_LBd", ("q", POSITION): "q_pos_LPd",
    ("sem", "mean"): "sem_LBW", ("sem", "max"): "sem_max_LBW", ("sem", "fg"): "sem_fg_LBW",
    ("sem", POSITION): "sem_pos_LPW",
    ("recon", "mean"): "recon_mean_LBW", ("recon", "max"): "recon_max_LBW", ("recon", "fg"): "recon_fg_LBW",
    ("recon", POSITION): "recon_pos_LPW",
}


def view_array(feats: Mapping[str, Any], view: str, pooling: str = "mean") -> np.ndarray:
    """The ``(L, B, C)`` array of ``view`` pooled by ``pooling`` (``(L, P, C)`` for ``pooling="pos"``); a
    features file of an older format that lacks it raises a KeyError saying to re-extract."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if pooling not in (*POOLINGS, POSITION):
        raise ValueError(f"pooling must be one of {(*POOLINGS, POSITION)}, got {pooling!r}")
    name = VIEW_ARRAYS[(view, pooling)]
    if name not in feats:
        raise KeyError(f"the features have no '{name}' ({view}, {pooling}): re-extract them (format {FORMAT_VERSION})")
    return np.asarray(feats[name])


def available_views(feats: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (view, pooling) pairs whose arrays ``feats`` holds, in VIEW_ARRAYS order."""
    return [vp for vp, name in VIEW_ARRAYS.items() if name in feats]



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

    from evotok.api import load_run_teacher, load_tokenizer
    from evotok.data import build_dataset

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(ckpt)
    teacher = load_run_teacher(ckpt)  # the run's own teacher, found through its upstream record and verified
    ds = build_dataset(cfg.data, split)
    return compute_arrays(tok, teacher, _select_items(ds, n_images, seed), n_images, n_positions=n_positions,
                          seed=seed, batch_size=batch_size, device=device, max_image_px=max_image_px, split=split)


def background_rgb(item: Mapping[str, Any]) -> Optional[np.ndarray]:
    """The flat background colour (3,) of a data item in [0, 1], or None when the source has none known."""
    lab = item.get("labels") or {}
    if item.get("source") != "evoshapes" or int(lab.get("background", -1)) < 0:
        return None
    from evotok.data.evoshapes import BG_RGB

    return BG_RGB[int(lab["background"])]


def foreground_fraction(x_BCHW, bg_B3, known_B, grid: tuple[int, int], threshold: float = FG_THRESHOLD):
    """(B, h, w) fraction of foreground pixels per latent cell (module docstring); NaN rows where not known."""
    import torch
    import torch.nn.functional as F

    diff = (x_BCHW - bg_B3[:, :, None, None]).abs().amax(dim=1, keepdim=True)  # (B, 1, H, W)
    fg = F.adaptive_avg_pool2d((diff > threshold).float(), grid)[:, 0]
    return torch.where(known_B[:, None, None], fg, torch.full_like(fg, float("nan")))


def pool_tokens(x_LBTC, fg_BT):
    """(mean, max, fg) poolings over T of (L, B, T, C) with foreground weights (B, T) (NaN = no mask): each
    (L, B, C); fg falls back to max for images without a mask or with an empty one."""
    import torch

    mean, mx = x_LBTC.mean(dim=2), x_LBTC.amax(dim=2)
    w = torch.nan_to_num(fg_BT, nan=0.0).to(x_LBTC.dtype)
    wsum = w.sum(dim=1)  # (B,)
    fg = (x_LBTC * w[None, :, :, None]).sum(dim=2) / wsum.clamp_min(1e-12)[None, :, None]
    use = (wsum > 0)[None, :, None]
    return mean, mx, torch.where(use, fg, mx)


def compute_arrays(tok: Any, teacher: Any, items: Iterable[dict], n_images: int, n_positions: int = 2000,
                   seed: int = 0, batch_size: int = 64, device: str = "cpu", max_image_px: int = 96,
                   split: str = "val") -> dict[str, np.ndarray]:
    """Every array of the module docstring for the first ``n_images`` of ``items`` (data items with an
    ``image`` in [0, 1] and ``labels``), from a tokenizer and its teacher (no files read or written)."""
    import torch
    import torch.nn.functional as F

    from evotok.eval.metrics import clipsim_pix, clipsim_sem, psnr
    from evotok.models.grids import resize_token_grid

    tok = tok.to(device).eval() if hasattr(tok, "to") else tok
    teacher = teacher.to(device).eval() if hasattr(teacher, "to") else teacher
    lpix, lsem, L = int(tok.lpix), int(tok.lsem), int(tok.depth)

    factors = _factor_names()
    labels: dict[str, list[int]] = {f: [] for f in factors}
    rng = np.random.default_rng(seed)
    pos_sel: Optional[np.ndarray] = None  # (P, 2) image index, flat position
    grid: Optional[tuple[int, int]] = None
    pooled_names = [VIEW_ARRAYS[(v, p)] for v in VIEWS for p in POOLINGS]
    pos_names = [VIEW_ARRAYS[(v, POSITION)] for v in VIEWS]
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in (
        *pooled_names, *pos_names, "recon_teacher", "orig_teacher", "orig_tokens", "clipsim_sem", "clipsim_pix",
        "psnr", "images", "fg", "fg_known", "position_fg")}

    def to_grid(tokens_BTW):
        if hasattr(tok, "semantic_target"):
            return tok.semantic_target(tokens_BTW).float()  # the training target: area-resized to (h, w)
        if tokens_BTW.shape[1] != grid[0] * grid[1]:
            side = int(round(tokens_BTW.shape[1] ** 0.5))
            if side * side != tokens_BTW.shape[1]:
                raise RuntimeError(f"teacher returned {tokens_BTW.shape[1]} tokens, not a square grid")
            return resize_token_grid(tokens_BTW, (side, side), grid).float()
        return tokens_BTW.float()

    seen = 0
    with torch.no_grad():
        for batch in _batches(items, batch_size):
            batch = batch[:max(0, n_images - seen)]
            if not batch:
                break
            x = torch.stack([torch.as_tensor(b["image"], dtype=torch.float32) for b in batch]).to(device)
            B = x.shape[0]
            for b in batch:
                lab = b.get("labels") or {}
                for f in lab:
                    if f not in labels:
                        labels[f] = [-1] * seen
                for f in labels:
                    labels[f].append(int(lab.get(f, -1)))
            z = tok.cumulative(x).float()  # (L, B, d, h, w)
            if z.shape[0] != L:
                raise RuntimeError(f"tokenizer.cumulative returned {z.shape[0]} depths, the model has depth {L}")
            _, _, d, h, w = z.shape
            if pos_sel is None:
                grid = (h, w)
                total = n_images * h * w
                flat = np.sort(rng.choice(total, size=min(n_positions, total), replace=False))
                pos_sel = np.stack([flat // (h * w), flat % (h * w)], axis=1)
            # foreground masks on the latent grid
            bgs = [background_rgb(b) for b in batch]
            known = torch.tensor([g is not None for g in bgs], device=device)
            bg = torch.as_tensor(np.stack([g if g is not None else np.zeros(3, np.float32) for g in bgs]),
                                 dtype=torch.float32, device=device)
            fg_Bhw = foreground_fraction(x, bg, known, (h, w))
            fg_BT = fg_Bhw.flatten(1)
            chunks["fg"].append(fg_Bhw.cpu().numpy())
            chunks["fg_known"].append(known.cpu().numpy())
            mine = pos_sel[(pos_sel[:, 0] >= seen) & (pos_sel[:, 0] < seen + B)]
            bi = torch.as_tensor(mine[:, 0] - seen, device=device)
            pi = torch.as_tensor(mine[:, 1], device=device)
            chunks["position_fg"].append(fg_BT[bi, pi].cpu().numpy())

            def add_view(view: str, x_LBTC):
                for p, arr in zip(POOLINGS, pool_tokens(x_LBTC, fg_BT)):
                    chunks[VIEW_ARRAYS[(view, p)]].append(arr.cpu().numpy())
                chunks[VIEW_ARRAYS[(view, POSITION)]].append(x_LBTC[:, bi, pi].cpu().numpy())

            z_LBTd = z.flatten(-2).transpose(-1, -2)  # (L, B, h*w, d)
            q_LBTd = z_LBTd.clone()
            q_LBTd[1:] -= z_LBTd[:-1]
            add_view("z", z_LBTd)
            add_view("q", q_LBTd)
            # teacher targets of the original: pooled, and tokens on the latent grid
            orig_pooled = teacher.pooled(x).float()
            tokens = to_grid(teacher.image_features(x).float())  # (B, h*w, W)
            chunks["orig_teacher"].append(orig_pooled.cpu().numpy())
            chunks["orig_tokens"].append(tokens.mean(1).cpu().numpy())
            rt, rtok, sm, cs, cp, ps = [], [], [], [], [], []
            for l in range(1, L + 1):
                rec = tok.decode_pixels(z[l - 1], l).float().clamp(0, 1)
                if hasattr(teacher, "encode"):  # tokens and pooled embedding in one pass (identical to the two calls)
                    enc = teacher.encode(rec)
                    rp, rtokens = enc.pooled_BE.float(), enc.tokens_BTc
                else:
                    rp, rtokens = teacher.pooled(rec).float(), teacher.image_features(rec)
                rt.append(rp.cpu().numpy())
                rtok.append(to_grid(rtokens.float()))
                cp.append(clipsim_pix(rp, orig_pooled).cpu().numpy())
                ps.append(psnr(rec, x).cpu().numpy())
                sem = tok.decode_semantic(z[l - 1], l).float()  # (B, h*w, W)
                sm.append(sem)
                cs.append(clipsim_sem(sem, tokens).cpu().numpy())
            add_view("sem", torch.stack(sm))
            add_view("recon", torch.stack(rtok))
            chunks["recon_teacher"].append(np.stack(rt))
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
    arrays: dict[str, np.ndarray] = {name: np.concatenate(chunks[name], axis=1) for name in (*pooled_names, *pos_names)}
    arrays.update({
        "position_index_P2": pos_sel.astype(np.int64),
        "position_fg_P": np.concatenate(chunks["position_fg"]).astype(np.float32),
        "fg_Bhw": np.concatenate(chunks["fg"]).astype(np.float32),
        "fg_known_B": np.concatenate(chunks["fg_known"]).astype(bool),
        "latent_hw": np.array(grid, dtype=np.int64),
        "recon_teacher_LBE": np.concatenate(chunks["recon_teacher"], axis=1),
        "orig_teacher_BE": np.concatenate(chunks["orig_teacher"], axis=0),
        "orig_tokens_BW": np.concatenate(chunks["orig_tokens"], axis=0),
        "clipsim_sem_LB": np.concatenate(chunks["clipsim_sem"], axis=1),
        "clipsim_pix_LB": np.concatenate(chunks["clipsim_pix"], axis=1),
        "psnr_LB": np.concatenate(chunks["psnr"], axis=1),
        "images_BHWC": np.concatenate(chunks["images"], axis=0),
        "factors": np.array(list(labels), dtype=str),
        "lpix": np.array(lpix),
        "lsem": np.array(lsem),
        "L": np.array(L),
        "split": np.array(split),
    })
    for f, v in labels.items():
        arrays[f"label_{f}"] = np.asarray(v, dtype=np.int64)
    return arrays

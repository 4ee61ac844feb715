"""Codes caches: a data split encoded once by a frozen tokenizer into a memory-mapped ``.npy`` of codes
(N, h, w, L), so the generation stage never re-encodes images (``evotok data codes --run TOKENIZER_RUN``).

A cache lives in the tokenizer's run folder, ``<run>/codes/<split>-<key>.npy``, with a ``.json`` beside it that
records the tokenizer checkpoint's fingerprint, the data config it was made from and its shape. ``key`` hashes
what selects the images (source, root, resolution, split sizes, seed, generator parameters), so other data
settings get their own file. Opening a cache checks the fingerprint against the tokenizer the caller uses: a
cache made by another (e.g. a retrained) tokenizer is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from evotok.errors import UserError

FORMAT = "evotok-codes-v1"
# data keys that change which images a split holds (not how they are batched or read)
_SELECTING = ("source", "root", "image_root", "resolution", "seed", "train_size", "val_size", "test_size",
              "heldout_fraction", "noise_sigma")


class CodesFileError(UserError, ValueError):
    """A codes cache that is missing or was made by another tokenizer or from other data."""


def data_key(data_cfg: Any, split: str) -> str:
    data = dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else dict(data_cfg)
    sel = {k: data.get(k) for k in _SELECTING}
    return hashlib.sha1(json.dumps({"split": split, **sel}, sort_keys=True).encode()).hexdigest()[:12]


def codes_path(tokenizer_run: Path, data_cfg: Any, split: str) -> Path:
    return Path(tokenizer_run) / "codes" / f"{split}-{data_key(data_cfg, split)}.npy"


def build_codes(tokenizer_run: str | Path, data_cfg: Any = None, split: str = "train", batch_size: int = 256,
                device: str = "cpu", progress: bool = True) -> Path:
    """Encode ``split`` (of ``data_cfg``, default the tokenizer's own data config) with the run's tokenizer."""
    import torch
    from torch.utils.data import DataLoader

    from evotok.api import load_tokenizer
    from evotok.data.sources import build_dataset
    from evotok.handover import fingerprint_file
    from evotok.runs import resolve_run

    run, ckpt = resolve_run(tokenizer_run)
    tok = load_tokenizer(ckpt, device=device)
    data_cfg = data_cfg if data_cfg is not None else tok.config.data  # type: ignore[attr-defined]
    ds = build_dataset(data_cfg, split)
    n = len(ds)
    h, w = tok.grid
    out = codes_path(run.path, data_cfg, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if tok.quantizer.cfg.codebook_size <= np.iinfo(np.int16).max else np.int32
    tmp = out.with_suffix(".partial.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, h, w, tok.depth))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=lambda items: (
        torch.stack([it["image"] for it in items]), [it["index"] for it in items]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"encode {split}", unit="img")
    with torch.no_grad():
        for images, index in loader:
            arr[np.asarray(index)] = tok.encode(images.to(device)).cpu().numpy().astype(dtype)
            if bar is not None:
                bar.update(len(index))
    if bar is not None:
        bar.close()
    arr.flush()
    del arr
    tmp.replace(out)
    meta = {"format": FORMAT, "split": split, "shape": [n, h, w, int(tok.depth)], "dtype": np.dtype(dtype).name,
            "tokenizer_checkpoint": str(ckpt.resolve()), "tokenizer_fingerprint": fingerprint_file(ckpt),
            "data": dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else dict(data_cfg)}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"codes of {n:,} {split} images: {out}")
    return out


def open_codes(tokenizer_run: str | Path, fingerprint: str, data_cfg: Any, split: str) -> np.ndarray:
    """The memory-mapped codes (N, h, w, L) of ``split``, checked against the tokenizer ``fingerprint`` the
    caller uses (a hand-over record's)."""
    path = codes_path(Path(tokenizer_run), data_cfg, split)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise CodesFileError(
            f"no codes cache of split '{split}' for this data config in {Path(tokenizer_run) / 'codes'}: run "
            f"`evotok data codes --run {tokenizer_run} --split {split}` (with the same data.* overrides)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("tokenizer_fingerprint") != fingerprint:
        raise CodesFileError(
            f"codes cache {path} was encoded by a tokenizer with fingerprint {str(meta.get('tokenizer_fingerprint'))[:19]}..., "
            f"this run's tokenizer has {fingerprint[:19]}...: rebuild it with `evotok data codes --run {tokenizer_run} "
            f"--split {split}`"
        )
    return np.load(path, mmap_mode="r")


def ensure_codes(tokenizer_run: str | Path, fingerprint: str, data_cfg: Any, split: str,
                 progress: bool = True) -> np.ndarray:
    """:func:`open_codes`, building the cache first when it does not exist yet (a stale one is still refused)."""
    if not codes_path(Path(tokenizer_run), data_cfg, split).is_file():
        build_codes(tokenizer_run, data_cfg, split, progress=progress)
    return open_codes(tokenizer_run, fingerprint, data_cfg, split)


def lookup(codes: np.ndarray, index: "Optional[Any]") -> "Any":
    """Rows ``index`` of a codes cache as an int64 tensor (B, h, w, L)."""
    import torch

    idx = np.asarray(index.cpu() if hasattr(index, "cpu") else index, dtype=np.int64)
    return torch.from_numpy(np.asarray(codes[idx], dtype=np.int64))

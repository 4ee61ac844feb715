"""Image sources besides EvoShapes: image folders, LLaVA JSON, WebDataset tar shards, real photos.

All yield the common item schema (see evotok.data). Real images are resized (shorter side) and
centre-cropped to ``data.resolution``; with ``data.augment`` the train split uses a random crop of a
resize to 0-25% larger (as the paper's reference code) plus a horizontal flip. Train/val/test membership comes from a hash of each
sample's key (relative path, record id, tar key), with split fractions proportional to
``data.train_size : data.val_size : data.test_size`` (the sizes themselves only bound EvoShapes); a WebDataset
config with a separate validation source (``data.val_root``) uses no hash split (docs/data_sharding.md).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import tarfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from evotok.data import LABEL_KEYS, DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
SOURCES = ("evoshapes", "folder", "llava", "webdataset", "realphotos")
_WARN_FIRST = 5  # files listed in a skip warning
_PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------ splits


def _unit_hash(key: str, seed: int = 0) -> float:
    """A deterministic number in [0, 1) from a string key."""
    h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(key: str, data_cfg: Any) -> str:
    """train / val / test for a sample key; fractions follow the configured split sizes. The hash
    does not use data.seed, so a sample stays in its split whatever the seed."""
    sizes = np.array([data_cfg.train_size, data_cfg.val_size, data_cfg.test_size], dtype=np.float64)
    if sizes.sum() <= 0:
        raise DataError("config keys 'data.train_size', 'data.val_size', 'data.test_size' are all 0")
    edges = np.cumsum(sizes / sizes.sum())
    u = _unit_hash(key)
    return ("train", "val", "test")[int(np.searchsorted(edges, u, side="right").clip(0, 2))]


def _check_split(split: str, source: str) -> None:
    allowed = ("train", "val", "test", "all") if source == "folder" else ("train", "val", "test")
    if split not in allowed:
        raise DataError(f"source '{source}' has splits {', '.join(allowed)}; got '{split}' (only evoshapes has 'heldout')")


# ----------------------------------------------------------------------------------- image decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit/int/float scaled, alpha composited on white, palette expanded."""
    img = ImageOps.exif_transpose(img) if hasattr(img, "getexif") else img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "RGBa", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_rgb(src: str | Path | BinaryIO) -> Image.Image:
    """Decode fully (raises on truncation) and convert to RGB."""
    with Image.open(src) as img:
        img.load()
        return to_rgb(img)


def verify_image(src: str | Path | BinaryIO) -> Optional[str]:
    """Cheap header/structure check with PIL verify; returns an error text or None."""
    try:
        with Image.open(src) as img:
            img.verify()
        return None
    except _PIL_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def image_to_tensor(img: Image.Image, resolution: int, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """Resize the shorter side and crop to (3, R, R) float in [0, 1]; ``rng`` => random crop + flip from a
    resize of the shorter side to a random size in [R, ceil(R / 0.8)] (the reference's ``random_crop_arr``,
    ADM's: crops of 80-100% of the shorter side), else centre crop. Images smaller than R (even 1x1) are
    upscaled."""
    target = resolution if rng is None else int(rng.integers(resolution, math.ceil(resolution / 0.8) + 1))
    w, h = img.size
    scale = target / min(w, h)
    nw, nh = max(target, int(round(w * scale))), max(target, int(round(h * scale)))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None if max(w, h) < 4 * max(nw, nh) else 2.0)
    if rng is None:
        x0, y0 = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        x0, y0 = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    img = img.crop((x0, y0, x0 + resolution, y0 + resolution))
    if rng is not None and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def make_item(image: torch.Tensor, index: int, source: str, *, labels: Optional[dict] = None, caption: str = "",
              caption_sem: str = "", qa: Optional[list] = None, conversations: Optional[list] = None,
              task: str = "") -> dict:
    """An item in the common schema; unknown labels are -1."""
    lab = {k: -1 for k in LABEL_KEYS}
    if labels:
        lab.update({k: int(v) for k, v in labels.items() if k in lab})
    return {"image": image, "labels": lab, "caption": caption, "caption_sem": caption_sem, "qa": list(qa or []),
            "conversations": list(conversations or []), "task": task, "index": int(index), "source": source}


# ------------------------------------------------------------------------------------- bad files


class BadFiles:
    """Counts skipped inputs and warns once per stage (scan, load), listing the first few."""

    def __init__(self, on_bad_file: str, source: str) -> None:
        if on_bad_file not in ("skip", "error"):
            raise DataError(f"config key 'data.on_bad_file' = {on_bad_file!r} is not one of skip, error")
        self.on_bad_file, self.source = on_bad_file, source
        self.items: list[tuple[str, str]] = []
        self._warned_load = False

    def __len__(self) -> int:
        return len(self.items)

    def add(self, name: str, why: str) -> None:
        """Record a bad input; raises DataError under on_bad_file='error'."""
        if self.on_bad_file == "error":
            raise DataError(f"bad input file '{name}' ({why}) in source '{self.source}'; "
                            f"set config key data.on_bad_file=skip to skip such files")
        self.items.append((name, why))

    def warn_scan(self) -> None:
        if self.items:
            warnings.warn(self._text(self.items, "skipped"), stacklevel=3)

    def add_at_load(self, name: str, why: str) -> None:
        self.add(name, why)
        if not self._warned_load:
            self._warned_load = True
            warnings.warn(self._text([(name, why)], "failed to decode at load time, substituted") +
                          " (further load failures are counted in .bad_files without warning)", stacklevel=3)

    def _text(self, items: Sequence[tuple[str, str]], what: str) -> str:
        first = "; ".join(f"{n} ({w})" for n, w in items[:_WARN_FIRST])
        more = f" and {len(items) - _WARN_FIRST} more" if len(items) > _WARN_FIRST else ""
        return (f"data source '{self.source}': {len(items)} bad input file(s) {what} "
                f"(data.on_bad_file=skip): {first}{more}")


def _aug_rng(owner: Any, index: Any = None, epoch: Optional[int] = None) -> np.random.Generator:
    """Augmentation RNG of one sample. When the epoch is known (``epoch``, or an index drawn by
    :class:`evotok.data.datamodule.EpochShuffle`, which carries it), a generator of (data.seed, epoch, index)
    alone: the same crop and flip in any worker, any number of workers, and after a resume. Otherwise a stream:
    in a DataLoader worker seeded from the worker's seed, in the main process owned by the dataset."""
    epoch = getattr(index, "epoch", None) if epoch is None else epoch
    if epoch is not None and index is not None:
        return np.random.default_rng(np.random.SeedSequence([owner.seed, int(epoch), int(index), 104729]))
    info = get_worker_info()
    seed = info.seed if info is not None else None
    if seed is not None:
        if getattr(owner, "_aug_seed", None) != seed:
            owner._aug_seed, owner._aug_gen = seed, np.random.default_rng(seed % 2**63)
        return owner._aug_gen
    if getattr(owner, "_main_gen", None) is None:
        owner._main_gen = np.random.default_rng(np.random.SeedSequence([owner.seed, 104729]))
    return owner._main_gen


class _ImageFileDataset(Dataset):
    """Shared loading logic for datasets that read image files from disk."""

    source = ""

    def __init__(self, data_cfg: Any, split: str) -> None:
        _check_split(split, self.source)
        self.split, self.resolution, self.seed = split, int(data_cfg.resolution), int(data_cfg.seed)
        self.augment = bool(data_cfg.augment) and split == "train"
        self.bad_files = BadFiles(data_cfg.on_bad_file, self.source)
        self.paths: list[Path] = []

    def _validate(self, paths: Sequence[Path], names: Sequence[str]) -> list[int]:
        """Indices of paths whose header verifies; bad ones go to bad_files."""
        keep = []
        for i, (p, n) in enumerate(zip(paths, names)):
            why = "missing file" if not p.is_file() else verify_image(p)
            if why is None:
                keep.append(i)
            else:
                self.bad_files.add(n, why)
        self.bad_files.warn_scan()
        return keep

    def _load(self, i: int) -> tuple[int, torch.Tensor]:
        """(index actually used, image tensor); a file that fails to decode is replaced by the next one. ``i``
        may carry its epoch (EpochShuffle's indices): the augmentation is then a function of (seed, epoch, i)."""
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            try:
                img = open_rgb(self.paths[j])
            except _PIL_ERRORS as e:
                self.bad_files.add_at_load(str(self.paths[j]), f"{type(e).__name__}: {e}")
                continue
            return j, image_to_tensor(img, self.resolution, _aug_rng(self, i) if self.augment else None)
        raise DataError(f"source '{self.source}': no file of split '{self.split}' could be decoded")

    def image_or_none(self, i: int) -> Optional[torch.Tensor]:
        """The image of file ``i`` itself (never a substitute), or None when it fails to decode (counted in
        ``bad_files``; under data.on_bad_file=error, DataError naming the file)."""
        try:
            img = open_rgb(self.paths[i])
        except _PIL_ERRORS as e:
            self.bad_files.add(str(self.paths[i]), f"{type(e).__name__}: {e}")
            return None
        return image_to_tensor(img, self.resolution, None)

    def __len__(self) -> int:
        return len(self.paths)


# -------------------------------------------------------------------------------------------- folder


def _root(data_cfg: Any, source: str) -> Path:
    if not data_cfg.root:
        raise DataError(f"config key 'data.root' is empty; source '{source}' needs it")
    return Path(data_cfg.root).expanduser()


class ImageFolder(_ImageFileDataset):
    """Recursive image folder (jpg/jpeg/png/webp, any case); a sibling ``<stem>.txt`` is the caption. Split
    ``all`` holds every file (encoding a whole folder)."""

    source = "folder"

    def __init__(self, data_cfg: Any, split: str = "train") -> None:
        super().__init__(data_cfg, split)
        root = _root(data_cfg, self.source)
        if not root.is_dir():
            raise DataError(f"config key 'data.root': folder '{root}' does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise DataError(f"config key 'data.root': no images ({', '.join(IMAGE_EXTS)}) under '{root}'")
        rel = [p.relative_to(root).as_posix() for p in files]
        mine = [i for i, r in enumerate(rel) if split == "all" or split_of(r, data_cfg) == split]
        keep = self._validate([files[i] for i in mine], [str(files[i]) for i in mine])
        self.root = root
        self.paths = [files[mine[i]] for i in keep]
        self.rel_paths = [rel[mine[i]] for i in keep]
        if not self.paths:
            raise DataError(f"config key 'data.root': no readable image of split '{split}' under '{root}' "
                            f"({len(files)} image files, {len(mine)} in this split, {len(self.bad_files)} bad; "
                            f"split fractions follow data.train_size/val_size/test_size)")

    def __getitem__(self, i: int) -> dict:
        j, image = self._load(i)
        txt = self.paths[j].with_suffix(".txt")
        cap = txt.read_text(errors="replace").strip() if txt.is_file() else ""
        return make_item(image, i, self.source, caption=cap)


# --------------------------------------------------------------------------------------------- LLaVA


def _strip_image(text: str) -> str:
    return text.replace("<image>", "").strip()


def parse_llava_record(rec: Any) -> tuple[str, list[dict], str]:
    """(image, conversations, task) of one LLaVA record; raises ValueError when malformed."""
    if not isinstance(rec, dict):
        raise ValueError("record is not an object")
    image, conv = rec.get("image"), rec.get("conversations")
    if not isinstance(image, str) or not image:
        raise ValueError("record has no 'image' string")
    if not isinstance(conv, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in conv):
        raise ValueError("'conversations' is not a list of {from, value}")
    conv = [{"from": "human" if t["from"] in ("human", "user") else "gpt", "value": str(t["value"])} for t in conv]
    task = "understanding"
    for t in conv:
        if "<image>" in t["value"]:
            task = "understanding" if t["from"] == "human" else "generation"
            break
    return image, conv, task


class LlavaJSON(_ImageFileDataset):
    """A LLaVA JSON file: a list of {"id", "image", "conversations"}. Images are resolved against
    ``data.image_root`` (default: the JSON's folder)."""

    source = "llava"

    def __init__(self, data_cfg: Any, split: str = "train") -> None:
        super().__init__(data_cfg, split)
        path = _root(data_cfg, self.source)
        if not path.is_file():
            raise DataError(f"config key 'data.root': LLaVA JSON file '{path}' does not exist")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"config key 'data.root': cannot parse LLaVA JSON '{path}': {e.msg} at line {e.lineno} "
                            f"column {e.colno}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"config key 'data.root': LLaVA JSON '{path}' is not UTF-8 text ({e})") from None
        if not isinstance(records, list):
            raise DataError(f"config key 'data.root': LLaVA JSON '{path}' must hold a list of records, "
                            f"got {type(records).__name__}")
        image_root = Path(data_cfg.image_root).expanduser() if data_cfg.image_root else path.parent
        if not image_root.is_dir():
            raise DataError(f"config key 'data.image_root': folder '{image_root}' does not exist")
        parsed = []
        for k, rec in enumerate(records):
            key = str(rec.get("id", k)) if isinstance(rec, dict) else str(k)
            if split_of(key, data_cfg) != split:
                continue
            try:
                image, conv, task = parse_llava_record(rec)
            except ValueError as e:
                self.bad_files.add(f"{path}[{k}]", str(e))
                continue
            parsed.append((key, image_root / image, conv, task))
        keep = self._validate([p[1] for p in parsed], [f"{p[1]} (record id {p[0]})" for p in parsed])
        if not keep:
            raise DataError(f"config key 'data.root': LLaVA JSON '{path}' has no usable record of split '{split}' "
                            f"({len(records)} records, {len(self.bad_files)} bad; images resolved against "
                            f"data.image_root = '{image_root}')")
        self.json_path = path
        self.ids = [parsed[i][0] for i in keep]
        self.paths = [parsed[i][1] for i in keep]
        self.conversations = [parsed[i][2] for i in keep]
        self.tasks = [parsed[i][3] for i in keep]

    def text(self, i: int) -> str:
        """The record's turns without the image token (for the text-only LM stage)."""
        return "\n".join(_strip_image(t["value"]) for t in self.conversations[i])

    def __getitem__(self, i: int) -> dict:
        j, image = self._load(i)
        i = int(i)
        conv, task = self.conversations[j], self.tasks[j]
        qa = [{"type": "", "question": _strip_image(h["value"]), "answer": _strip_image(g["value"])}
              for h, g in zip(conv[::2], conv[1::2]) if h["from"] == "human" and g["from"] == "gpt"]
        cap = ""
        if task == "generation":
            cap = next((_strip_image(t["value"]) for t in conv if t["from"] == "human"), "")
        return make_item(image, i, self.source, caption=cap, qa=qa, conversations=conv, task=task)


# ---------------------------------------------------------------------------------------- WebDataset


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern ('shards/train-{000..009}.tar'), ';'/'::' also separate patterns."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in pattern.replace("::", ";").split(";"):
        if part.strip():
            out.extend(braceexpand(part.strip()))
    return out


INDEX_NAME = "index.json"  # per shard folder: {"__kind__": "wids-shard-index-v1", "shardlist": [{"url", "nsamples"}]}
INDEX_KIND = "wids-shard-index-v1"  # webdataset's wids index format, so other readers can use it too
SHUFFLE_BUFFER = 1000  # raw (undecoded) samples per consumer; decoded when drawn


def val_root_of(data_cfg: Any) -> str:
    """The separate validation source (``data.val_root``), or '' when the config has none: then train / val /
    test come from a hash split of ``data.root``."""
    return str(getattr(data_cfg, "val_root", "") or "")


def root_for_split(data_cfg: Any, split: str) -> tuple[str, str, bool]:
    """(pattern, config key it came from, hash-split?) for ``split``. With a separate validation source,
    train reads all of data.root and val / test read all of data.val_root; no sample is held out."""
    vr = val_root_of(data_cfg)
    if not vr:
        return str(data_cfg.root or ""), "data.root", True
    return (str(data_cfg.root or ""), "data.root", False) if split == "train" else (vr, "data.val_root", False)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _consumer() -> tuple[int, int]:
    """(index, total) of this reader over distributed ranks x DataLoader workers."""
    rank, world = _dist_rank_world()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


def _sample_key(name: str) -> Optional[str]:
    d, _, base = name.rpartition("/")
    stem, dot, _ = base.partition(".")
    if not dot or base.startswith("."):
        return None
    return f"{d}/{stem}" if d else stem


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) in tar order, WebDataset convention: key = path up to the first dot
    of the basename."""
    key, cur = None, {}
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k = _sample_key(m.name)
            if k is None:
                continue
            ext = m.name.rpartition("/")[2].partition(".")[2]
            if k != key and key is not None:
                yield key, cur
                cur = {}
            key = k
            f = tf.extractfile(m)
            cur[ext.lower()] = f.read() if f is not None else b""
    if key is not None:
        yield key, cur


def tar_keys(path: str) -> list[str]:
    """The sample keys of a shard in tar order, from the member headers only (no image is read)."""
    keys: list[str] = []
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            k = _sample_key(m.name) if m.isfile() else None
            if k is not None and (not keys or keys[-1] != k):
                keys.append(k)
    return keys


def read_index(folder: str | Path) -> dict[str, int]:
    """{absolute shard path: sample count} of ``folder/index.json``; {} when there is none."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return {}
    try:
        idx = json.loads(path.read_text(encoding="utf-8"))
        return {str((path.parent / e["url"]).resolve()): int(e["nsamples"]) for e in idx["shardlist"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"shard index '{path}' is not a {INDEX_KIND} file ({type(e).__name__}: {e})") from None


def write_index(out_dir: str | Path, counts: Sequence[tuple[str, int]], name: str = "") -> Path:
    """Write ``out_dir/index.json`` for shards (file name relative to out_dir, sample count)."""
    out = Path(out_dir) / INDEX_NAME
    out.write_text(json.dumps({"__kind__": INDEX_KIND, "wids_version": 1, "name": name,
                               "shardlist": [{"url": u, "nsamples": int(n)} for u, n in counts]}, indent=1))
    return out


def write_shards(samples: Iterator[tuple[str, dict[str, bytes]]], out_dir: str | Path, per_shard: int,
                 prefix: str = "train") -> Path:
    """Pack (key, {ext: bytes}) samples into ``out_dir/<prefix>-000000.tar`` ... of ``per_shard`` samples
    (the last one smaller) and write their index; returns the index path."""
    if per_shard < 1:
        raise DataError(f"--per-shard must be >= 1, got {per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: list[tuple[str, int]] = []
    tf: Optional[tarfile.TarFile] = None
    try:
        for key, sample in samples:
            if tf is None or counts[-1][1] >= per_shard:
                if tf is not None:
                    tf.close()
                counts.append((f"{prefix}-{len(counts):06d}.tar", 0))
                tf = tarfile.open(out / counts[-1][0], "w")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
            counts[-1] = (counts[-1][0], counts[-1][1] + 1)
    finally:
        if tf is not None:
            tf.close()
    if not counts:
        raise DataError(f"no samples to write to '{out}'")
    return write_index(out, counts, name=prefix)


def consumer_ranges(counts: Sequence[int], rank: int, world: int, worker: int, num_workers: int,
                    batch_size: int) -> list[tuple[int, int, int]]:
    """This consumer's part of one epoch: [(position in ``counts``, first, stop)] sample ranges.

    ``counts`` are the per-shard sample counts in this epoch's shard order, seen as one stream of N samples.
    With world > 1 every rank gets the same B = N // (world * batch_size) full batches: rank r reads stream
    positions [r*B*bs, (r+1)*B*bs) and the last N - world*B*bs are dropped this epoch (a different tail each
    epoch, as the order is reshuffled). With one rank nothing is dropped (the last batch may be partial).
    Inside a rank, batch i goes to DataLoader worker i % num_workers (the order in which the loader collects
    them), so each worker yields whole batches and reads one contiguous range."""
    n, bs = int(sum(counts)), int(batch_size)
    per_rank = (n // (world * bs)) * bs if world > 1 else n
    n_batches = -(-per_rank // bs)
    sizes = [bs] * n_batches
    if n_batches:
        sizes[-1] = per_rank - (n_batches - 1) * bs
    quota = [sum(sizes[w::num_workers]) for w in range(num_workers)]
    lo = rank * per_rank + sum(quota[:worker])
    hi = lo + quota[worker]
    out, start = [], 0
    for pos, c in enumerate(counts):
        a, b = max(lo, start), min(hi, start + c)
        if a < b:
            out.append((pos, a - start, b - start))
        start += c
    return out


class WebDatasetShards(IterableDataset):
    """Streaming reader of WebDataset tar shards (``data.root`` = path or brace pattern; val / test read
    ``data.val_root`` when the config has one). Image under jpg/jpeg/png/webp, optional txt (caption) and
    json ({"caption", "labels", "conversations"}).

    Per epoch, every rank computes the same shard order (shuffled from data.seed and the epoch for train)
    and the same per-shard counts (the folder's index.json, else counted from the tar headers), and
    :func:`consumer_ranges` gives each (rank, worker) a disjoint contiguous range: no sample is read
    twice in an epoch and, under DDP, every rank yields the same number of ``data.batch_size`` batches
    (see docs/data_sharding.md). Train draws samples from a shuffle buffer. ``len()`` is this rank's sample
    count. Rank and world size come from torch.distributed when the dataset is built (or ``rank`` /
    ``world_size``); the epoch from :meth:`set_epoch`, then one more per pass of a persistent worker. A
    sample that fails to decode is counted (data.on_bad_file) and skipped; with world_size > 1 the
    consumer's next good sample is yielded once more in its place, so batch counts stay equal."""

    source = "webdataset"

    def __init__(self, data_cfg: Any, split: str = "train", *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shuffle_buffer: int = SHUFFLE_BUFFER) -> None:
        _check_split(split, self.source)
        pattern, key, self.hash_split = root_for_split(data_cfg, split)
        if not pattern:
            raise DataError(f"config key '{key}' is empty; source '{self.source}' needs a shard path or pattern")
        self.shards = expand_shards(pattern)
        missing = [s for s in self.shards if not Path(s).is_file()]
        if not self.shards or missing:
            raise DataError(f"config key '{key}': shard file(s) not found: {', '.join(missing[:5]) or pattern}")
        self._cfg = data_cfg
        self.split, self.resolution, self.seed = split, int(data_cfg.resolution), int(data_cfg.seed)
        self.batch_size = int(data_cfg.batch_size)
        self.augment = bool(data_cfg.augment) and split == "train"
        self.shuffle = split == "train"
        self.shuffle_buffer = int(shuffle_buffer)
        self.bad_files = BadFiles(data_cfg.on_bad_file, self.source)
        self._explicit = (rank, world_size)
        self.rank, self.world_size = self._resolve_rank()
        self.epoch, self._passes = 0, 0
        self.counts = self._count()

    def _resolve_rank(self) -> tuple[int, int]:
        r, w = _dist_rank_world()
        rank = r if self._explicit[0] is None else int(self._explicit[0])
        world = w if self._explicit[1] is None else int(self._explicit[1])
        if not 0 <= rank < world:
            raise DataError(f"webdataset reader: rank {rank} is not in [0, world_size={world})")
        return rank, world

    def _count(self) -> list[int]:
        """Samples of this split per shard (self.shards order): the index when every shard is in one and no
        hash split applies, else the keys in the tar headers."""
        idx: dict[str, int] = {}
        for folder in {str(Path(s).resolve().parent) for s in self.shards}:
            idx.update(read_index(folder))
        counts = []
        for s in self.shards:
            n = idx.get(str(Path(s).resolve()))
            if n is None or self.hash_split:
                keys = tar_keys(s)
                n = sum(split_of(k, self._cfg) == self.split for k in keys) if self.hash_split else len(keys)
            counts.append(int(n))
        if self.world_size > 1 and sum(counts) < self.world_size * self.batch_size:
            raise DataError(f"split '{self.split}' has {sum(counts)} samples, fewer than world_size "
                            f"{self.world_size} x data.batch_size {self.batch_size}: no rank would get a batch")
        return counts

    def set_epoch(self, epoch: int) -> None:
        """Called in the main process before an epoch's workers start; also re-reads rank / world size."""
        self.epoch, self._passes = int(epoch), 0
        self.rank, self.world_size = self._resolve_rank()

    def __len__(self) -> int:
        n = sum(self.counts)
        return (n // (self.world_size * self.batch_size)) * self.batch_size if self.world_size > 1 else n

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into self.shards in the order epoch ``epoch`` streams them (the same on every rank)."""
        if not self.shuffle:
            return list(range(len(self.shards)))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 7]))
        return [int(i) for i in rng.permutation(len(self.shards))]

    def _decode(self, key: str, sample: dict[str, bytes], index: int, epoch: int) -> Optional[dict]:
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if ext is None:
            self.bad_files.add_at_load(key, "no jpg/jpeg/png/webp entry")
            return None
        try:
            img = open_rgb(io.BytesIO(sample[ext]))
        except _PIL_ERRORS as e:
            self.bad_files.add_at_load(f"{key}.{ext}", f"{type(e).__name__}: {e}")
            return None
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
                meta = meta if isinstance(meta, dict) else {}
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                self.bad_files.add_at_load(f"{key}.json", str(e))
        cap = sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else str(meta.get("caption", ""))
        conv, task = [], ""
        if isinstance(meta.get("conversations"), list):
            try:
                _, conv, task = parse_llava_record({"image": key, "conversations": meta["conversations"]})
            except ValueError:
                conv, task = [], ""
        labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else None
        image = image_to_tensor(img, self.resolution, _aug_rng(self, index, epoch) if self.augment else None)
        return make_item(image, index, self.source, labels=labels, caption=cap, conversations=conv, task=task)

    def _raw(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(stable index, key, raw sample) of this consumer's ranges, in stream order."""
        order = self.shard_order(epoch)
        base = np.concatenate([[0], np.cumsum(self.counts)])  # stable index = offset in the unshuffled list
        ranges = consumer_ranges([self.counts[i] for i in order], self.rank, self.world_size, worker, num_workers,
                                 self.batch_size)
        for pos, a, b in ranges:
            shard = self.shards[order[pos]]
            j = 0
            try:
                for key, sample in _tar_samples(shard):
                    if self.hash_split and split_of(key, self._cfg) != self.split:
                        continue
                    if a <= j < b:
                        yield int(base[order[pos]]) + j, key, sample
                    j += 1
                    if j >= b:
                        break
            except (tarfile.TarError, OSError, EOFError) as e:
                self.bad_files.add_at_load(shard, f"unreadable shard: {type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch + self._passes
        self._passes += 1
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, wid, 11]))
        raw = self._raw(epoch, wid, nw)
        if self.shuffle:
            raw = self._shuffled(raw, rng)
        last, owed = None, 0
        for index, key, sample in raw:
            item = self._decode(key, sample, index, epoch)
            if item is None:
                owed += self.world_size > 1  # keep every rank's batch count: the next good sample fills in
                continue
            last = item
            yield item
            while owed:
                owed -= 1
                yield last
        if owed and last is None:
            raise DataError(f"source '{self.source}': no sample of split '{self.split}' could be decoded "
                            f"by reader (rank {self.rank}, worker {wid})")
        for _ in range(owed):
            yield last  # type: ignore[misc]

    def _shuffled(self, raw: Iterator, rng: np.random.Generator) -> Iterator:
        buf: list = []
        for s in raw:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))


def _png(image_CHW: torch.Tensor) -> bytes:
    a = (image_CHW.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def shard_samples(data_cfg: Any, source: str, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a dataset, for :func:`write_shards`: EvoShapes as PNG + json {caption,
    labels, conversations}; an image folder as its original files (+ json {caption} from <stem>.txt)."""
    if source == "evoshapes":
        from evotok.data.evoshapes import EvoShapes

        ds = EvoShapes(data_cfg, split)
        for i in range(len(ds)):
            it = ds[i]
            meta = {"caption": it["caption"], "labels": it["labels"], "conversations": it["conversations"]}
            yield f"{split}-{i:08d}", {"png": _png(it["image"]), "json": json.dumps(meta).encode()}
    elif source == "folder":
        ds = ImageFolder(data_cfg, split)
        for i, p in enumerate(ds.paths):
            ext = p.suffix.lower().lstrip(".")
            txt = p.with_suffix(".txt")
            meta = {"caption": txt.read_text(errors="replace").strip() if txt.is_file() else "",
                    "path": ds.rel_paths[i]}
            yield f"{i:08d}", {ext: p.read_bytes(), "json": json.dumps(meta).encode()}
    else:
        raise DataError(f"evotok data shards: --source {source!r} is not one of evoshapes, folder")


# ------------------------------------------------------------------------------------- real photos

SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "camera", "coins", "moon", "brick", "grass", "gravel")
CROP_SCALES = (1, 2, 4)  # shorter side resized to scale * resolution, then tiled into crops


@functools.lru_cache(maxsize=1)
def load_photos() -> dict[str, np.ndarray]:
    """Photographs shipped in installed packages, as (H, W, 3) uint8; those that fail are left out.
    Memoised per process (package data never changes); callers must not modify the arrays."""
    out: dict[str, np.ndarray] = {}
    try:
        from sklearn.datasets import load_sample_images

        d = load_sample_images()
        for fn, img in zip(d.filenames, d.images):
            out[Path(fn).stem] = np.asarray(img, dtype=np.uint8)
    except Exception:  # noqa: BLE001 - optional package data
        pass
    try:
        from skimage import data as skdata

        for name in SKIMAGE_PHOTOS:
            try:
                a = np.asarray(getattr(skdata, name)())
            except Exception:  # noqa: BLE001 - some need network (pooch); skip those
                continue
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            out[name] = np.asarray(a[..., :3], dtype=np.uint8)
    except ImportError:
        pass
    return out


def photo_crops(photos: dict[str, np.ndarray], resolution: int) -> list[tuple[str, np.ndarray]]:
    """Deterministic crops: for each scale in CROP_SCALES, resize the shorter side to scale*R and tile
    the centred grid of non-overlapping RxR crops. Returns [(key, (R, R, 3) uint8)]."""
    out = []
    for name in sorted(photos):
        img = Image.fromarray(photos[name])
        w, h = img.size
        for s in CROP_SCALES:
            t = s * resolution
            if t > min(w, h):
                continue
            nw, nh = max(t, round(w * t / min(w, h))), max(t, round(h * t / min(w, h)))
            a = np.asarray(img.resize((nw, nh), Image.LANCZOS))
            nx, ny = nw // resolution, nh // resolution
            x0, y0 = (nw - nx * resolution) // 2, (nh - ny * resolution) // 2
            for r in range(ny):
                for c in range(nx):
                    y, x = y0 + r * resolution, x0 + c * resolution
                    out.append((f"{name}/s{s}/r{r}c{c}", a[y:y + resolution, x:x + resolution].copy()))
    return out


@functools.lru_cache(maxsize=4)
def _crops_at(resolution: int) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple(photo_crops(load_photos(), resolution))


class RealPhotos(Dataset):
    """Crops of the packaged photographs at data.resolution: a small real-image reconstruction set."""

    source = "realphotos"

    def __init__(self, data_cfg: Any, split: str = "test") -> None:
        _check_split(split, self.source)
        self.split, self.resolution = split, int(data_cfg.resolution)
        crops = _crops_at(self.resolution)
        if not crops:
            raise DataError("source 'realphotos': no packaged photograph could be loaded (scikit-learn / scikit-image)")
        mine = [(k, a) for k, a in crops if split_of(k, data_cfg) == split]
        self.keys = [k for k, _ in mine]
        self.images_NCHW = np.stack([a.transpose(2, 0, 1) for _, a in mine]) if mine else \
            np.zeros((0, 3, self.resolution, self.resolution), np.uint8)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        image = torch.from_numpy(self.images_NCHW[i].astype(np.float32) / 255.0)
        return make_item(image, i, self.source, caption=f"a photograph ({self.keys[i].split('/')[0]})")


# ------------------------------------------------------------------------------------------- factory

def build_dataset(data_cfg: Any, split: str = "train") -> Dataset:
    """The dataset of ``data_cfg.source`` for ``split`` (train | val | test, and heldout for evoshapes)."""
    source = data_cfg.source
    if source == "evoshapes":
        from evotok.data.evoshapes import EvoShapes

        return EvoShapes(data_cfg, split)
    builders = {"folder": ImageFolder, "llava": LlavaJSON, "webdataset": WebDatasetShards, "realphotos": RealPhotos}
    if source not in builders:
        raise DataError(f"config key 'data.source' = {source!r} is not one of {', '.join(SOURCES)}")
    return builders[source](data_cfg, split)

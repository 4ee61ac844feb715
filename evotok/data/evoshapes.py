"""EvoShapes: a procedural image set with semantic (shape, count) and low-level (colour, texture,
background) factors. Deterministic from (seed, split, index), rendered vectorised in numpy, cached
to disk as uint8 ``.npy`` files that are memory-mapped on read.

Layout: the image is a 2x2 grid of cells; ``count`` objects (1-3) sit in distinct cells, each
spanning 70-90% of its cell with position jitter. All objects of an image share shape, colour and
texture. Generation happens in fixed chunks of ``CHUNK`` indices, each with its own RNG stream
seeded by (seed, split, chunk), so item i never depends on the split size or on other requests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

# ------------------------------------------------------------------------------------- vocabulary

FACTORS: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart"],
    "count": ["one", "two", "three"],
    "color": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta"],
    "texture": ["solid", "striped", "dotted", "checkered"],
    "background": ["black", "white", "gray", "navy", "maroon", "teal"],
}
FACTOR_KEYS: tuple[str, ...] = ("shape", "count", "color", "texture", "background")  # label column order
SEMANTIC_FACTORS = ("shape", "count")
LOWLEVEL_FACTORS = ("color", "texture", "background")
QA_TYPES = ("shape", "color", "count", "texture", "background")
CAPTION_QUESTION = "Describe the image."  # the human turn of caption conversations (LLaVA-558k style)
CONVERSATION_KINDS = ("qa", "caption")
SPLITS = ("train", "val", "test", "heldout")

SHAPE_PLURALS = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
    "cross": "crosses", "diamond": "diamonds", "hexagon": "hexagons", "heart": "hearts",
}
FG_RGB = np.array(
    [[225, 35, 35], [245, 135, 20], [240, 215, 30], [40, 175, 60],
     [30, 200, 215], [40, 75, 225], [135, 55, 200], [225, 50, 190]], dtype=np.float32) / 255.0
BG_RGB = np.array(
    [[15, 15, 15], [240, 240, 240], [125, 125, 125], [20, 25, 85], [95, 20, 30], [0, 100, 100]],
    dtype=np.float32) / 255.0

GEN_VERSION = 1  # bump when rendering changes: it is part of every cache key and RNG stream
CHUNK = 1024  # indices per RNG stream
SUPERSAMPLE = 2  # anti-aliasing: SxS sub-pixels per pixel
FILL_RANGE = (0.7, 0.9)  # object extent as a fraction of the cell side
CELL_MARGIN_PX = 0.5  # objects keep this distance from their cell border (objects never touch)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "heldout": 3}


# ------------------------------------------------------------------------------------------ text


def _name(factor: str, labels: Mapping[str, int]) -> str:
    return FACTORS[factor][int(labels[factor])]


def caption(labels: Mapping[str, int]) -> str:
    """Full caption, e.g. 'two red striped stars on a navy background'."""
    n = int(labels["count"]) + 1
    shape = _name("shape", labels)
    noun = shape if n == 1 else SHAPE_PLURALS[shape]
    return (f"{_name('count', labels)} {_name('color', labels)} {_name('texture', labels)} {noun} "
            f"on a {_name('background', labels)} background")


def partial_caption(labels: Mapping[str, int], factors: Sequence[str]) -> str:
    """A caption naming only ``factors`` of the labels (the shape is always named), in the full caption's word
    order: {count, shape} -> 'two stars', {color, shape} -> 'red stars', all of FACTORS -> :func:`caption`. Without
    the count the noun is plural and no number is given."""
    unknown = set(factors) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown factor(s) {sorted(unknown)}; valid: {', '.join(FACTORS)}")
    shape = _name("shape", labels)
    n = int(labels["count"]) + 1 if "count" in factors else None
    words = [_name("count", labels)] if n is not None else []
    words += [_name(f, labels) for f in ("color", "texture") if f in factors]
    words.append(shape if n == 1 else SHAPE_PLURALS[shape])
    text = " ".join(words)
    return text + (f" on a {_name('background', labels)} background" if "background" in factors else "")


def semantic_caption(labels: Mapping[str, int]) -> str:
    """Caption naming only the semantic factors, e.g. 'two stars'."""
    n = int(labels["count"]) + 1
    shape = _name("shape", labels)
    return f"{_name('count', labels)} {shape if n == 1 else SHAPE_PLURALS[shape]}"


_QUESTIONS = {
    "shape": "What shape are the objects in the image?",
    "color": "What color are the objects in the image?",
    "count": "How many objects are in the image?",
    "texture": "What texture do the objects in the image have?",
    "background": "What color is the background?",
}


def qa_pairs(labels: Mapping[str, int]) -> list[dict]:
    """One question per type in QA_TYPES; answers are class names from FACTORS."""
    return [{"type": t, "question": _QUESTIONS[t], "answer": _name(t, labels)} for t in QA_TYPES]


def conversation(labels: Mapping[str, int], kind: str = "qa", order: int = 0) -> list[dict]:
    """LLaVA-style conversation of an item: ``qa`` = every question of :func:`qa_pairs` as one round each, the
    image in the first (LLaVA-665k style), the rounds in the ``order``-th rotation-and-shuffle of QA_TYPES (items
    pass their index: every question type comes first about equally often, so a model does not learn which type
    follows the image); ``caption`` = one round asking for the full caption (LLaVA-558k style)."""
    if kind == "caption":
        return [{"from": "human", "value": "<image>\n" + CAPTION_QUESTION}, {"from": "gpt", "value": caption(labels)}]
    if kind != "qa":
        raise ValueError(f"config key 'data.conversations' = {kind!r} is not one of {', '.join(CONVERSATION_KINDS)}")
    qa = qa_pairs(labels)
    perm = np.random.default_rng(int(order)).permutation(len(qa))
    out = []
    for i, q in enumerate(qa[j] for j in perm):
        out += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q["question"]},
                {"from": "gpt", "value": q["answer"]}]
    return out


def zero_shot_prompts(factor: str) -> list[str]:
    """One prompt per class of ``factor`` (label order). Shape and count use the semantic-caption
    vocabulary ('stars', 'two objects'); see zero_shot_prompt_sets for per-class ensembles."""
    if factor == "shape":
        return [SHAPE_PLURALS[s] for s in FACTORS["shape"]]
    if factor == "count":
        return [f"{w} {'object' if i == 0 else 'objects'}" for i, w in enumerate(FACTORS["count"])]
    if factor in ("color", "texture"):
        return [f"{c} objects" for c in FACTORS[factor]]
    if factor == "background":
        return [f"objects on a {c} background" for c in FACTORS[factor]]
    raise ValueError(f"unknown factor '{factor}'; valid: {', '.join(FACTORS)}")


def zero_shot_prompt_sets(factor: str) -> list[list[str]]:
    """Per class of a semantic factor, every semantic caption with that class (an ensemble whose
    text embeddings are averaged for CLIP zero-shot): shape 'star' -> ['one star', 'two stars', ...]."""
    if factor not in SEMANTIC_FACTORS:
        raise ValueError(f"zero_shot_prompt_sets supports {SEMANTIC_FACTORS}, got '{factor}'")
    other = "count" if factor == "shape" else "shape"
    out = []
    for c in range(len(FACTORS[factor])):
        out.append([semantic_caption({factor: c, other: o}) for o in range(len(FACTORS[other]))])
    return out


def labels_from_row(row: Sequence[int]) -> dict[str, int]:
    """A label row (FACTOR_KEYS order) as a dict."""
    return {k: int(v) for k, v in zip(FACTOR_KEYS, row)}


# ---------------------------------------------------------------------------------------- params


@dataclasses.dataclass(frozen=True)
class EvoShapesParams:
    """Every parameter that changes generated pixels or labels (all go into the cache key)."""

    seed: int = 0
    resolution: int = 32
    noise_sigma: float = 0.02
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 2:
            raise ValueError(f"config key 'data.resolution' must be even and >= 8 for evoshapes, got {self.resolution}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"config key 'data.heldout_fraction' must be in [0, 1), got {self.heldout_fraction}")
        if self.noise_sigma < 0:
            raise ValueError(f"config key 'data.noise_sigma' must be >= 0, got {self.noise_sigma}")

    @classmethod
    def from_data_config(cls, data_cfg: Any) -> "EvoShapesParams":
        return cls(seed=int(data_cfg.seed), resolution=int(data_cfg.resolution),
                   noise_sigma=float(data_cfg.noise_sigma), heldout_fraction=float(data_cfg.heldout_fraction))

    def key(self, split: str, size: int) -> str:
        """Short hash of every generation parameter, the split, its size and the generator version."""
        blob = json.dumps({**dataclasses.asdict(self), "split": split, "size": size, "version": GEN_VERSION,
                           "chunk": CHUNK, "ss": SUPERSAMPLE, "fill": FILL_RANGE, "margin": CELL_MARGIN_PX},
                          sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def heldout_pairs(seed: int, fraction: float) -> list[tuple[int, int]]:
    """(colour, shape) label pairs held out of train/val/test, chosen from the seed. Pairs use
    distinct colours and shapes where possible, so no colour or shape loses more than its share."""
    n_col, n_shape = len(FACTORS["color"]), len(FACTORS["shape"])
    n = int(round(fraction * n_col * n_shape))
    if n == 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, GEN_VERSION]))
    # Walk diagonals of a random colour x shape permutation: each diagonal uses every colour and
    # every shape once, so held-out pairs spread evenly over both factors.
    col_perm, shape_perm = rng.permutation(n_col), rng.permutation(n_shape)
    offsets = rng.permutation(n_shape)
    pairs: list[tuple[int, int]] = []
    for off in offsets:
        for i in range(n_col):
            pairs.append((int(col_perm[i]), int(shape_perm[(i + off) % n_shape])))
    return sorted(pairs[:n])


def allowed_pairs(seed: int, fraction: float, split: str) -> np.ndarray:
    """(P, 2) array of (colour, shape) pairs that ``split`` draws from."""
    held = set(heldout_pairs(seed, fraction))
    if split == "heldout":
        return np.array(sorted(held), dtype=np.int64).reshape(-1, 2)
    return np.array([(c, s) for c in range(len(FACTORS["color"])) for s in range(len(FACTORS["shape"]))
                     if (c, s) not in held], dtype=np.int64)


# ------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for shape ``shape`` at normalised coords (u right, v down; bbox about [-1,1]^2)."""
    name = FACTORS["shape"][shape]
    au, av = np.abs(u), np.abs(v)
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (au <= 0.85) & (av <= 0.85)
    if name == "triangle":  # apex up
        return (v <= 0.95) & (2.0 * au <= v + 1.0)
    if name == "star":  # five points, outer radius 1, inner 0.5
        v = v - 0.1  # centre the bounding box
        r = np.sqrt(u * u + v * v)
        sector = 2 * np.pi / 5
        phi = np.mod(np.arctan2(u, -v), sector)
        psi = np.minimum(phi, sector - phi)
        px, py = r * np.cos(psi), r * np.sin(psi)
        ri = 0.5
        dx, dy = ri * np.cos(sector / 2) - 1.0, ri * np.sin(sector / 2)
        return dx * py - dy * (px - 1.0) >= 0
    if name == "cross":
        a = 0.34
        return ((au <= a) & (av <= 1.0)) | ((av <= a) & (au <= 1.0))
    if name == "diamond":
        return au + av <= 1.0
    if name == "hexagon":
        s3 = 0.8660254
        return (av <= s3) & (s3 * au + 0.5 * av <= s3)
    if name == "heart":
        x, y = u * 1.16, -v * 1.16 + 0.06
        q = x * x + y * y - 1.0
        return q * q * q - x * x * y * y * y <= 0
    raise AssertionError(name)


class Generated(NamedTuple):
    images_NCHW: np.ndarray  # uint8
    labels_NF: np.ndarray  # int64, columns FACTOR_KEYS
    cells_N4: np.ndarray  # bool, occupied cells (top-left, top-right, bottom-left, bottom-right)


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n labels in [0, k), each class n//k or n//k+1 times, shuffled."""
    return rng.permutation((np.arange(n) + rng.integers(k)) % k)


def _render_chunk(params: EvoShapesParams, split: str, chunk: int) -> Generated:
    """All CHUNK items of one chunk; every random draw comes from this chunk's own stream."""
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, _SPLIT_IDS[split], chunk, GEN_VERSION]))
    n, res = CHUNK, params.resolution
    cell = res // 2
    pairs = allowed_pairs(params.seed, params.heldout_fraction, split)
    if len(pairs) == 0:
        raise ValueError(f"split '{split}' is empty: no (colour, shape) pairs (check data.heldout_fraction)")
    pair = pairs[_balanced(rng, n, len(pairs))]
    color, shape = pair[:, 0], pair[:, 1]
    count = _balanced(rng, n, 3)
    texture = _balanced(rng, n, len(FACTORS["texture"]))
    background = _balanced(rng, n, len(FACTORS["background"]))
    cells_N4 = rng.random((n, 4)).argsort(axis=1).argsort(axis=1) <= count[:, None]  # count+1 cells
    fill_N4 = rng.uniform(*FILL_RANGE, size=(n, 4)).astype(np.float32)
    jitter_N42 = rng.uniform(-1.0, 1.0, size=(n, 4, 2)).astype(np.float32)
    half = max(2, int(round(2 * res / 32)))  # texture half-period: period 4 px at 32 px
    phase_N2 = rng.integers(0, 2 * half, size=(n, 2))
    noise_NHWC = rng.standard_normal((n, res, res, 3), dtype=np.float32) if params.noise_sigma > 0 else None

    # Coverage of each cell by its object, from SxS sub-pixel samples.
    S = SUPERSAMPLE
    sub = (np.arange(cell * S, dtype=np.float32) + 0.5) / S  # sub-pixel centres in cell pixels
    h_N4 = fill_N4 * cell / 2  # half extent
    slack_N4 = np.maximum(cell / 2 - h_N4 - CELL_MARGIN_PX, 0.0)
    cx_N4 = cell / 2 + jitter_N42[..., 0] * slack_N4
    cy_N4 = cell / 2 + jitter_N42[..., 1] * slack_N4
    cover_N4cc = np.zeros((n, 4, cell, cell), dtype=np.float32)
    for s in np.unique(shape):
        idx = np.nonzero(shape == s)[0]
        u = (sub[None, None, None, :] - cx_N4[idx, :, None, None]) / h_N4[idx, :, None, None]
        v = (sub[None, None, :, None] - cy_N4[idx, :, None, None]) / h_N4[idx, :, None, None]
        m = _shape_mask(int(s), u, v).view(np.uint8)  # (n_s, 4, cS, cS)
        hits = sum(m[..., a::S, b::S] for a in range(S) for b in range(S))  # strided sums: fast
        cover_N4cc[idx] = hits.astype(np.float32) * (1.0 / (S * S))
    cover_N4cc *= cells_N4[:, :, None, None]
    cover_NHW = np.empty((n, res, res), dtype=np.float32)
    cover_NHW[:, :cell, :cell] = cover_N4cc[:, 0]
    cover_NHW[:, :cell, cell:] = cover_N4cc[:, 1]
    cover_NHW[:, cell:, :cell] = cover_N4cc[:, 2]
    cover_NHW[:, cell:, cell:] = cover_N4cc[:, 3]

    # Texture: 1 where the object shows its secondary shade.
    yy = np.arange(res)[None, :, None] + phase_N2[:, 1, None, None]
    xx = np.arange(res)[None, None, :] + phase_N2[:, 0, None, None]
    tex_NHW = np.zeros((n, res, res), dtype=bool)
    tname = np.array(FACTORS["texture"])[texture]
    sel = tname == "striped"
    tex_NHW[sel] = (((xx[sel] + yy[sel]) // half) % 2).astype(bool)
    sel = tname == "dotted"
    tex_NHW[sel] = ((xx[sel] % (2 * half)) < half) & ((yy[sel] % (2 * half)) < half)
    sel = tname == "checkered"
    tex_NHW[sel] = ((xx[sel] // half + yy[sel] // half) % 2).astype(bool)

    fg_N3 = FG_RGB[color]
    bg_N3 = BG_RGB[background]
    bg_dark = (bg_N3 @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) < 0.5
    sec_N3 = 0.5 * fg_N3 + 0.5 * np.where(bg_dark[:, None], 1.0, 0.0).astype(np.float32)
    # img = bg + cover * (object colour - bg), then noise, all in place on one float32 buffer
    img_NHWC = np.where(tex_NHW[..., None], (sec_N3 - bg_N3)[:, None, None, :], (fg_N3 - bg_N3)[:, None, None, :])
    img_NHWC *= cover_NHW[..., None]
    img_NHWC += bg_N3[:, None, None, :]
    if noise_NHWC is not None:
        noise_NHWC *= params.noise_sigma
        img_NHWC += noise_NHWC
    img_NHWC *= 255.0
    img_NHWC += 0.5  # round half up on the clip below
    np.clip(img_NHWC, 0.0, 255.0, out=img_NHWC)
    img_u8 = img_NHWC.astype(np.uint8)
    labels_NF = np.stack([shape, count, color, texture, background], axis=1).astype(np.int64)
    return Generated(np.ascontiguousarray(img_u8.transpose(0, 3, 1, 2)), labels_NF, cells_N4)


def generate(params: EvoShapesParams, split: str, start: int, stop: int) -> Generated:
    """Items [start, stop) of ``split``; item i is the same whatever range it is generated in."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if not 0 <= start <= stop:
        raise ValueError(f"bad range [{start}, {stop})")
    parts = []
    for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
        g = _render_chunk(params, split, chunk)
        lo, hi = max(start - chunk * CHUNK, 0), min(stop - chunk * CHUNK, CHUNK)
        parts.append(Generated(g.images_NCHW[lo:hi], g.labels_NF[lo:hi], g.cells_N4[lo:hi]))
    if not parts:
        r = params.resolution
        return Generated(np.zeros((0, 3, r, r), np.uint8), np.zeros((0, len(FACTOR_KEYS)), np.int64),
                         np.zeros((0, 4), bool))
    return Generated(*(np.concatenate(a) for a in zip(*parts)))


# ----------------------------------------------------------------------------------------- cache


def split_size(data_cfg: Any, split: str) -> int:
    """Number of items in a split; 'heldout' has data.test_size items (0 when nothing is held out)."""
    if split == "heldout":
        return int(data_cfg.test_size) if data_cfg.heldout_fraction > 0 and heldout_pairs(
            int(data_cfg.seed), float(data_cfg.heldout_fraction)) else 0
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    return int(getattr(data_cfg, f"{split}_size"))


def cache_path(cache_dir: str | Path, params: EvoShapesParams, split: str, size: int) -> Path:
    return Path(cache_dir) / f"evoshapes-r{params.resolution}-{split}-{size}-{params.key(split, size)}"


def build_cache(cache_dir: str | Path, params: EvoShapesParams, split: str, size: int) -> Path:
    """Generate a split into ``cache_dir`` unless it is already there; safe under concurrent callers
    (each writes a private folder, then renames it into place)."""
    final = cache_path(cache_dir, params, split, size)
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        res = params.resolution
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(size, 3, res, res))
        labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.int64, shape=(size, len(FACTOR_KEYS)))
        cells = np.lib.format.open_memmap(tmp / "cells.npy", mode="w+", dtype=bool, shape=(size, 4))
        for start in range(0, size, CHUNK):
            g = generate(params, split, start, min(start + CHUNK, size))
            images[start:start + len(g.labels_NF)] = g.images_NCHW
            labels[start:start + len(g.labels_NF)] = g.labels_NF
            cells[start:start + len(g.labels_NF)] = g.cells_N4
        for a in (images, labels, cells):
            a.flush()
        del images, labels, cells
        meta = {**dataclasses.asdict(params), "split": split, "size": size, "version": GEN_VERSION,
                "factors": FACTORS, "label_columns": list(FACTOR_KEYS)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class CachedSplit(NamedTuple):
    images_NCHW: np.ndarray  # uint8, memory-mapped
    labels_NF: np.ndarray
    cells_N4: np.ndarray


def load_cache(path: Path) -> CachedSplit:
    return CachedSplit(np.load(path / "images.npy", mmap_mode="r"), np.load(path / "labels.npy", mmap_mode="r"),
                       np.load(path / "cells.npy", mmap_mode="r"))


# --------------------------------------------------------------------------------------- dataset


class EvoShapes(Dataset):
    """Map-style dataset of one EvoShapes split; items follow the common schema (evotok.data).

    The split is generated on first use into ``data_cfg.cache_dir`` and memory-mapped afterwards.
    Arrays are reopened lazily in each process (pickling sends only the path)."""

    def __init__(self, data_cfg: Any, split: str = "train", *, cache_dir: Optional[str | Path] = None) -> None:
        self.params = EvoShapesParams.from_data_config(data_cfg)
        self.conversation_kind = str(getattr(data_cfg, "conversations", "qa"))  # text only: not in the cache key
        self.split = split
        self.size = split_size(data_cfg, split)
        if self.size == 0 and split == "heldout":
            from evotok.data import DataError

            raise DataError("split 'heldout' is empty: config key 'data.heldout_fraction' holds out no (colour, shape) pair")
        self.path = build_cache(cache_dir or data_cfg.cache_dir, self.params, split, self.size)
        self._arrays: Optional[CachedSplit] = None

    # Arrays reopen lazily so that DataLoader workers (fork or spawn) never copy the memmap.
    @property
    def arrays(self) -> CachedSplit:
        if self._arrays is None:
            self._arrays = load_cache(self.path)
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.size

    @property
    def labels_NF(self) -> np.ndarray:
        return self.arrays.labels_NF

    @property
    def cells_N4(self) -> np.ndarray:
        return self.arrays.cells_N4

    def images_uint8(self, indices: Sequence[int] | slice) -> np.ndarray:
        """(B, 3, H, W) uint8 images."""
        idx = indices if isinstance(indices, slice) else np.asarray(indices)
        return np.asarray(self.arrays.images_NCHW[idx])

    def labels(self, i: int) -> dict[str, int]:
        return labels_from_row(self.arrays.labels_NF[i])

    def text(self, i: int) -> str:
        """Caption, semantic caption and every QA pair of item i, one per line (no image decode)."""
        lab = self.labels(i)
        return "\n".join([caption(lab), semantic_caption(lab)] + [f"{q['question']} {q['answer']}" for q in qa_pairs(lab)])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for EvoShapes '{self.split}' of size {self.size}")
        i %= self.size
        lab = self.labels(i)
        image = torch.from_numpy(np.array(self.arrays.images_NCHW[i], dtype=np.float32)).div_(255.0)
        return {
            "image": image,
            "labels": lab,
            "caption": caption(lab),
            "caption_sem": semantic_caption(lab),
            "qa": qa_pairs(lab),
            "conversations": conversation(lab, self.conversation_kind, order=i * 7919 + self.params.seed),
            "task": "",
            "index": i,
            "source": "evoshapes",
        }


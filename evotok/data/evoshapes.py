"""EvoShapes: a procedural image set with semantic (shape, count) and low-level (colour, texture,
background) factors. Deterministic from (seed, split, index), rendered vectorised in numpy, cached
to disk as uint8 ``.npy`` files that are memory-mapped on read.

Layout: the image is a 2x2 grid of cells; ``count`` objects (1-3) sit in distinct cells, each
spanning 70-90% of its cell with position jitter. All objects of an image share shape, colour and
texture. Generation happens in fixed chunks of ``CHUNK`` indices, each with its own RNG stream
seeded by (seed, split, chunk), so item i never depends on the split size or on other requests.

Presets (``data.preset``, the registry :data:`PRESETS`): ``evoshapes`` is the 32 px default above (any even
resolution >= 8). ``evoshapes64`` is a harder 64 px set built so that one coarse token depth cannot resolve the
semantics: 12 shape categories drawn at equal area (they differ in outline only, not in mass), rotated by up to
10 degrees and sized 50-95% of the cell; textures with a random period of 10-16 px (over 2 pooled pixels after
the encoder's 4x downsampling, so they survive it; a period of 8 px can average away at some phases);
2-6 distractor marks (short strokes and dots, under the objects, anywhere in the image) that carry no label.
Both share the item schema, factor names and label columns; class lists come from :func:`factors` (the module's
``FACTORS`` is the default preset's), and every text and pair function takes ``preset=``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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
DEFAULT_PRESET = "evoshapes"


# --------------------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """One EvoShapes variant: its vocabulary and the knobs of its renderer. The default preset's values are
    the module constants above (its renderer reads those, so its output never changes)."""

    name: str
    factors: Mapping[str, list[str]]  # class names per factor, label order (FACTOR_KEYS are shared)
    plurals: Mapping[str, str]  # shape -> plural noun
    resolutions: tuple[int, ...] = ()  # the data.resolution values it supports; () = any even value >= 8
    stream: int = 0  # 0 = the default's RNG streams; else appended to every seed sequence
    fill_range: tuple[float, float] = FILL_RANGE  # object half extent as a fraction of half the cell side
    rotation_deg: float = 0.0  # objects turn by up to +-this
    texture_half_px: tuple[int, int] = (0, 0)  # per-image texture half-period range (px, inclusive); (0, 0) = default
    clutter: tuple[int, int] = (0, 0)  # distractor marks per image (inclusive range)
    equal_area: bool = False  # every shape drawn at the same area (shapes differ in outline only)
    heldout_whole_diagonals: bool = False  # hold out whole colour diagonals: every colour loses the same number


_SHAPES64 = [*FACTORS["shape"], "crescent", "ring", "arrow", "clover"]
PRESETS: dict[str, Preset] = {
    "evoshapes": Preset("evoshapes", FACTORS, SHAPE_PLURALS),
    "evoshapes64": Preset(
        "evoshapes64", {**FACTORS, "shape": _SHAPES64},
        {**SHAPE_PLURALS, "crescent": "crescents", "ring": "rings", "arrow": "arrows", "clover": "clovers"},
        resolutions=(64,), stream=64, fill_range=(0.5, 0.95), rotation_deg=10.0, texture_half_px=(5, 8),
        clutter=(2, 6), equal_area=True, heldout_whole_diagonals=True),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a ValueError naming the closest preset."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(str(name), list(PRESETS), n=1, cutoff=0.0)
        raise ValueError(f"config key 'data.preset' = {name!r} is not an EvoShapes preset (did you mean "
                         f"'{hint[0]}'?); presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def factors(preset: str = DEFAULT_PRESET) -> Mapping[str, list[str]]:
    """Class names per factor of ``preset`` (label order); ``len(factors(p)[f])`` is factor f's class count."""
    return get_preset(preset).factors


def preset_of(data_cfg: Any) -> str:
    """The EvoShapes preset a data config selects (``data.preset``; configs without the key get the default)."""
    return str(getattr(data_cfg, "preset", DEFAULT_PRESET) or DEFAULT_PRESET)


# ------------------------------------------------------------------------------------------ text


def _name(factor: str, labels: Mapping[str, int], preset: str = DEFAULT_PRESET) -> str:
    return get_preset(preset).factors[factor][int(labels[factor])]


def caption(labels: Mapping[str, int], preset: str = DEFAULT_PRESET) -> str:
    """Full caption, e.g. 'two red striped stars on a navy background'."""
    n = int(labels["count"]) + 1
    shape = _name("shape", labels, preset)
    noun = shape if n == 1 else get_preset(preset).plurals[shape]
    return (f"{_name('count', labels)} {_name('color', labels)} {_name('texture', labels)} {noun} "
            f"on a {_name('background', labels)} background")


def partial_caption(labels: Mapping[str, int], factors: Sequence[str], preset: str = DEFAULT_PRESET) -> str:
    """A caption naming only ``factors`` of the labels (the shape is always named), in the full caption's word
    order: {count, shape} -> 'two stars', {color, shape} -> 'red stars', all of FACTORS -> :func:`caption`. Without
    the count the noun is plural and no number is given."""
    unknown = set(factors) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown factor(s) {sorted(unknown)}; valid: {', '.join(FACTORS)}")
    shape = _name("shape", labels, preset)
    n = int(labels["count"]) + 1 if "count" in factors else None
    words = [_name("count", labels)] if n is not None else []
    words += [_name(f, labels) for f in ("color", "texture") if f in factors]
    words.append(shape if n == 1 else get_preset(preset).plurals[shape])
    text = " ".join(words)
    return text + (f" on a {_name('background', labels)} background" if "background" in factors else "")


def semantic_caption(labels: Mapping[str, int], preset: str = DEFAULT_PRESET) -> str:
    """Caption naming only the semantic factors, e.g. 'two stars'."""
    n = int(labels["count"]) + 1
    shape = _name("shape", labels, preset)
    return f"{_name('count', labels)} {shape if n == 1 else get_preset(preset).plurals[shape]}"


_QUESTIONS = {
    "shape": "What shape are the objects in the image?",
    "color": "What color are the objects in the image?",
    "count": "How many objects are in the image?",
    "texture": "What texture do the objects in the image have?",
    "background": "What color is the background?",
}


def qa_pairs(labels: Mapping[str, int], preset: str = DEFAULT_PRESET) -> list[dict]:
    """One question per type in QA_TYPES; answers are class names from the preset's factors."""
    return [{"type": t, "question": _QUESTIONS[t], "answer": _name(t, labels, preset)} for t in QA_TYPES]


def conversation(labels: Mapping[str, int], kind: str = "qa", order: int = 0,
                 preset: str = DEFAULT_PRESET) -> list[dict]:
    """LLaVA-style conversation of an item: ``qa`` = every question of :func:`qa_pairs` as one round each, the
    image in the first (LLaVA-665k style), the rounds in the ``order``-th rotation-and-shuffle of QA_TYPES (items
    pass their index: every question type comes first about equally often, so a model does not learn which type
    follows the image); ``caption`` = one round asking for the full caption (LLaVA-558k style)."""
    if kind == "caption":
        return [{"from": "human", "value": "<image>\n" + CAPTION_QUESTION},
                {"from": "gpt", "value": caption(labels, preset)}]
    if kind != "qa":
        raise ValueError(f"config key 'data.conversations' = {kind!r} is not one of {', '.join(CONVERSATION_KINDS)}")
    qa = qa_pairs(labels, preset)
    perm = np.random.default_rng(int(order)).permutation(len(qa))
    out = []
    for i, q in enumerate(qa[j] for j in perm):
        out += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q["question"]},
                {"from": "gpt", "value": q["answer"]}]
    return out


def zero_shot_prompts(factor: str, preset: str = DEFAULT_PRESET) -> list[str]:
    """One prompt per class of ``factor`` (label order). Shape and count use the semantic-caption
    vocabulary ('stars', 'two objects'); see zero_shot_prompt_sets for per-class ensembles."""
    pre = get_preset(preset)
    if factor == "shape":
        return [pre.plurals[s] for s in pre.factors["shape"]]
    if factor == "count":
        return [f"{w} {'object' if i == 0 else 'objects'}" for i, w in enumerate(pre.factors["count"])]
    if factor in ("color", "texture"):
        return [f"{c} objects" for c in pre.factors[factor]]
    if factor == "background":
        return [f"objects on a {c} background" for c in pre.factors[factor]]
    raise ValueError(f"unknown factor '{factor}'; valid: {', '.join(FACTORS)}")


def zero_shot_prompt_sets(factor: str, preset: str = DEFAULT_PRESET) -> list[list[str]]:
    """Per class of a semantic factor, every semantic caption with that class (an ensemble whose
    text embeddings are averaged for CLIP zero-shot): shape 'star' -> ['one star', 'two stars', ...]."""
    if factor not in SEMANTIC_FACTORS:
        raise ValueError(f"zero_shot_prompt_sets supports {SEMANTIC_FACTORS}, got '{factor}'")
    other = "count" if factor == "shape" else "shape"
    fac = get_preset(preset).factors
    out = []
    for c in range(len(fac[factor])):
        out.append([semantic_caption({factor: c, other: o}, preset) for o in range(len(fac[other]))])
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
    preset: str = DEFAULT_PRESET

    def __post_init__(self) -> None:
        pre = get_preset(self.preset)
        if pre.resolutions and self.resolution not in pre.resolutions:
            raise ValueError(f"config key 'data.resolution' = {self.resolution} is not supported by data.preset "
                             f"'{self.preset}' (supported: {', '.join(map(str, pre.resolutions))})")
        if self.resolution < 8 or self.resolution % 2:
            raise ValueError(f"config key 'data.resolution' must be even and >= 8 for evoshapes, got {self.resolution}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"config key 'data.heldout_fraction' must be in [0, 1), got {self.heldout_fraction}")
        if self.noise_sigma < 0:
            raise ValueError(f"config key 'data.noise_sigma' must be >= 0, got {self.noise_sigma}")

    @classmethod
    def from_data_config(cls, data_cfg: Any) -> "EvoShapesParams":
        return cls(seed=int(data_cfg.seed), resolution=int(data_cfg.resolution),
                   noise_sigma=float(data_cfg.noise_sigma), heldout_fraction=float(data_cfg.heldout_fraction),
                   preset=preset_of(data_cfg))

    def key(self, split: str, size: int) -> str:
        """Short hash of every generation parameter, the split, its size and the generator version (the default
        preset's key leaves the preset out, so its caches from before presets existed stay valid)."""
        fields = dataclasses.asdict(self)
        if self.preset == DEFAULT_PRESET:
            del fields["preset"]
        else:
            fields["preset_spec"] = repr(get_preset(self.preset))
        blob = json.dumps({**fields, "split": split, "size": size, "version": GEN_VERSION,
                           "chunk": CHUNK, "ss": SUPERSAMPLE, "fill": FILL_RANGE, "margin": CELL_MARGIN_PX},
                          sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def heldout_pairs(seed: int, fraction: float, preset: str = DEFAULT_PRESET) -> list[tuple[int, int]]:
    """(colour, shape) label pairs held out of train/val/test, chosen from the seed. Pairs use
    distinct colours and shapes where possible, so no colour or shape loses more than its share.
    Presets with ``heldout_whole_diagonals`` round the count to whole diagonals (a multiple of the colour count,
    at least one diagonal), so every colour keeps the same number of shapes."""
    pre = get_preset(preset)
    n_col, n_shape = len(pre.factors["color"]), len(pre.factors["shape"])
    n = int(round(fraction * n_col * n_shape))
    if pre.heldout_whole_diagonals and fraction > 0:
        n = max(1, int(round(n / n_col))) * n_col
    if n == 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, GEN_VERSION, *([pre.stream] if pre.stream else [])]))
    # Walk diagonals of a random colour x shape permutation: each diagonal uses every colour and
    # every shape once, so held-out pairs spread evenly over both factors.
    col_perm, shape_perm = rng.permutation(n_col), rng.permutation(n_shape)
    offsets = rng.permutation(n_shape)
    pairs: list[tuple[int, int]] = []
    for off in offsets:
        for i in range(n_col):
            pairs.append((int(col_perm[i]), int(shape_perm[(i + off) % n_shape])))
    return sorted(pairs[:n])


def allowed_pairs(seed: int, fraction: float, split: str, preset: str = DEFAULT_PRESET) -> np.ndarray:
    """(P, 2) array of (colour, shape) pairs that ``split`` draws from."""
    held = set(heldout_pairs(seed, fraction, preset))
    if split == "heldout":
        return np.array(sorted(held), dtype=np.int64).reshape(-1, 2)
    fac = get_preset(preset).factors
    return np.array([(c, s) for c in range(len(fac["color"])) for s in range(len(fac["shape"]))
                     if (c, s) not in held], dtype=np.int64)


# ------------------------------------------------------------------------------------- rendering


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for the default preset's shape ``name`` at normalised coords (u right, v down; bbox about
    [-1,1]^2)."""
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
        m = _shape_mask(FACTORS["shape"][int(s)], u, v).view(np.uint8)  # (n_s, 4, cS, cS)
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


# ------------------------------------------------------------------------ evoshapes64: outline-only shapes


def _outline_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for an evoshapes64 shape: centred on the origin, inside the unit disc or close to it (the
    renderer rescales each to the common area with :func:`_outline_scales`)."""
    au, av = np.abs(u), np.abs(v)
    if name == "triangle":  # equilateral, apex up, inscribed in the unit circle
        return (v <= 0.5) & (1.7320508 * au <= v + 1.0)
    if name == "star":  # the default star, centred on its outer circle
        return _shape_mask("star", u, v + 0.1)
    if name == "crescent":  # opening to the right; the tips lie on the unit circle
        return (u * u + v * v <= 1.0) & ((u - 0.55) ** 2 + v * v > 0.78 ** 2)
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if name == "arrow":  # pointing right: a shaft and a triangular head
        return ((u >= -1.0) & (u <= 0.1) & (av <= 0.3)) | ((u >= 0.1) & (av <= 1.0 - u))
    if name == "clover":  # three round leaves around a small disc
        m = u * u + v * v <= 0.3 ** 2
        for a in (0.5 * np.pi, 0.5 * np.pi + 2 * np.pi / 3, 0.5 * np.pi + 4 * np.pi / 3):
            m = m | ((u - 0.5 * np.cos(a)) ** 2 + (v + 0.5 * np.sin(a)) ** 2 <= 0.46 ** 2)
        return m
    return _shape_mask(name, u, v)


@functools.lru_cache(maxsize=None)
def _outline_scales(preset: str) -> tuple[float, ...]:
    """Per shape of ``preset``, the factor k that gives every shape the same area when drawn at normalised
    coordinates offset / (h k): area A_s (h k)^2 = A* h^2, with A* the largest common area at which every shape
    (turned any way) stays inside the disc of radius h. Measured once on a 600^2 grid."""
    g = (np.arange(600, dtype=np.float64) + 0.5) / 600 * 2.5 - 1.25
    u, v = np.meshgrid(g, g)
    areas, radii = [], []
    for name in get_preset(preset).factors["shape"]:
        m = _outline_mask(name, u, v)
        areas.append(m.sum() * (2.5 / 600) ** 2)
        radii.append(np.sqrt((u[m] ** 2 + v[m] ** 2).max()))
    target = min(a / r ** 2 for a, r in zip(areas, radii))
    return tuple(float(np.sqrt(target / a)) for a in areas)


def _texture_pattern(texture: np.ndarray, half_N: np.ndarray, phase_N2: np.ndarray, res: int,
                     names: Sequence[str]) -> np.ndarray:
    """(N, res, res) bool: where each image's objects show their secondary shade. ``half_N`` is the
    half-period in px along the axes (stripes are diagonal with the same period across them)."""
    n = len(texture)
    yy = np.arange(res)[None, :, None] + phase_N2[:, 1, None, None]
    xx = np.arange(res)[None, None, :] + phase_N2[:, 0, None, None]
    h = half_N[:, None, None]
    tex = np.zeros((n, res, res), dtype=bool)
    tname = np.array(names)[texture]
    sel = tname == "striped"  # along x + y a period of 2h * sqrt(2) gives a period of 2h across the stripes
    hs = np.rint(h[sel] * np.sqrt(2.0)).astype(np.int64)
    tex[sel] = (((xx[sel] + yy[sel]) // hs) % 2).astype(bool)
    sel = tname == "dotted"
    tex[sel] = ((xx[sel] % (2 * h[sel])) < h[sel]) & ((yy[sel] % (2 * h[sel])) < h[sel])
    sel = tname == "checkered"
    tex[sel] = ((xx[sel] // h[sel] + yy[sel] // h[sel]) % 2).astype(bool)
    return tex


def _outline_cover(preset: str, shape_O: np.ndarray, cx_O: np.ndarray, cy_O: np.ndarray, h_O: np.ndarray,
                   angle_O: np.ndarray, cell: int) -> np.ndarray:
    """(O, cell, cell) float32 coverage of each object in its cell, from SxS sub-pixel samples."""
    S = SUPERSAMPLE
    names, scales = get_preset(preset).factors["shape"], _outline_scales(preset)
    sub = (np.arange(cell * S, dtype=np.float32) + 0.5) / S
    cover = np.zeros((len(shape_O), cell, cell), dtype=np.float32)
    for s in np.unique(shape_O):
        idx = np.nonzero(shape_O == s)[0]
        inv = (1.0 / (h_O[idx] * scales[int(s)])).astype(np.float32)[:, None, None]
        c, sn = np.cos(angle_O[idx])[:, None, None], np.sin(angle_O[idx])[:, None, None]
        du = sub[None, None, :] - cx_O[idx, None, None]
        dv = sub[None, :, None] - cy_O[idx, None, None]
        u, v = (c * du + sn * dv) * inv, (c * dv - sn * du) * inv
        m = _outline_mask(names[int(s)], u, v).view(np.uint8)
        hits = sum(m[:, a::S, b::S] for a in range(S) for b in range(S))
        cover[idx] = hits.astype(np.float32) * (1.0 / (S * S))
    return cover


def _clutter_layer(rng: np.random.Generator, n: int, res: int, marks: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Distractor marks: (N, M, 7, 7) coverage patches, their (N, M) top-left corners and (N, M, 3) colours.
    Each mark is a stroke 2-5 px long or a dot (length 0), about 1.3 px wide, anywhere in the image, in a random
    colour; marks beyond an image's count have zero coverage."""
    P, M = 7, marks[1]
    n_marks = rng.integers(marks[0], marks[1] + 1, size=n)
    length = np.where(rng.random((n, M)) < 0.3, 0.0, rng.uniform(2.0, 5.0, (n, M))).astype(np.float32)
    theta = rng.uniform(0, np.pi, (n, M)).astype(np.float32)
    y0 = rng.integers(0, res - P + 1, size=(n, M))
    x0 = rng.integers(0, res - P + 1, size=(n, M))
    colour = rng.uniform(0.0, 1.0, (n, M, 3)).astype(np.float32)
    q = np.arange(P, dtype=np.float32) + 0.5 - P / 2  # pixel centres relative to the patch centre
    dx, dy = np.cos(theta)[..., None, None], np.sin(theta)[..., None, None]
    px, py = q[None, None, None, :], q[None, None, :, None]
    t = np.clip(px * dx + py * dy, -length[..., None, None] / 2, length[..., None, None] / 2)
    dist = np.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2)
    cover = np.clip(0.65 + 0.5 - dist, 0.0, 1.0)
    cover *= (np.arange(M)[None, :] < n_marks[:, None])[..., None, None]
    return cover.astype(np.float32), y0, x0, colour


def _render_outline_chunk(params: EvoShapesParams, split: str, chunk: int, clutter: bool = True) -> Generated:
    """evoshapes64: equal-area shapes of varying size and small turns, coarse textures, distractor marks."""
    pre = get_preset(params.preset)
    base_seq = [params.seed, _SPLIT_IDS[split], chunk, GEN_VERSION, pre.stream]
    rng = np.random.default_rng(np.random.SeedSequence(base_seq))
    n, res = CHUNK, params.resolution
    cell = res // 2
    fac = pre.factors
    pairs = allowed_pairs(params.seed, params.heldout_fraction, split, params.preset)
    if len(pairs) == 0:
        raise ValueError(f"split '{split}' is empty: no (colour, shape) pairs (check data.heldout_fraction)")
    pair = pairs[_balanced(rng, n, len(pairs))]
    color, shape = pair[:, 0], pair[:, 1]
    count = _balanced(rng, n, len(fac["count"]))
    texture = _balanced(rng, n, len(fac["texture"]))
    background = _balanced(rng, n, len(fac["background"]))
    cells_N4 = rng.random((n, 4)).argsort(axis=1).argsort(axis=1) <= count[:, None]
    fill_N4 = rng.uniform(*pre.fill_range, size=(n, 4)).astype(np.float32)
    jitter_N42 = rng.uniform(-1.0, 1.0, size=(n, 4, 2)).astype(np.float32)
    angle_N4 = rng.uniform(-1.0, 1.0, size=(n, 4)).astype(np.float32) * np.float32(np.deg2rad(pre.rotation_deg))
    half_N = rng.integers(pre.texture_half_px[0], pre.texture_half_px[1] + 1, size=n)
    phase_N2 = rng.integers(0, 4 * pre.texture_half_px[1], size=(n, 2))
    noise_NHWC = rng.standard_normal((n, res, res, 3), dtype=np.float32) if params.noise_sigma > 0 else None
    # the marks come from their own stream: drawing them or not changes no other draw
    marks = _clutter_layer(np.random.default_rng(np.random.SeedSequence([*base_seq, 1])), n, res, pre.clutter)

    item_O, cell_O = np.nonzero(cells_N4)  # only occupied cells are rendered
    h_O = fill_N4[item_O, cell_O] * cell / 2  # radius of the disc the object stays inside
    slack_O = np.maximum(cell / 2 - h_O - CELL_MARGIN_PX, 0.0)
    cx_O = cell / 2 + jitter_N42[item_O, cell_O, 0] * slack_O
    cy_O = cell / 2 + jitter_N42[item_O, cell_O, 1] * slack_O
    cover_O = _outline_cover(params.preset, shape[item_O], cx_O, cy_O, h_O, angle_N4[item_O, cell_O], cell)
    cover_NHW = np.zeros((n, res, res), dtype=np.float32)
    for c in range(4):
        sel = cell_O == c
        r0, c0 = (c // 2) * cell, (c % 2) * cell
        cover_NHW[item_O[sel], r0:r0 + cell, c0:c0 + cell] = cover_O[sel]

    tex_NHW = _texture_pattern(texture, half_N, phase_N2, res, fac["texture"])
    fg_N3, bg_N3 = FG_RGB[color], BG_RGB[background]
    bg_dark = (bg_N3 @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) < 0.5
    sec_N3 = 0.5 * fg_N3 + 0.5 * np.where(bg_dark[:, None], 1.0, 0.0).astype(np.float32)
    under_NHWC = np.broadcast_to(bg_N3[:, None, None, :], (n, res, res, 3)).copy()  # background + marks
    if clutter:
        cover_NMpp, y0_NM, x0_NM, colour_NM3 = marks
        P = cover_NMpp.shape[-1]
        rows = np.arange(n)[:, None, None]
        for m in range(cover_NMpp.shape[1]):
            ys = y0_NM[:, m, None, None] + np.arange(P)[None, :, None]
            xs = x0_NM[:, m, None, None] + np.arange(P)[None, None, :]
            a = cover_NMpp[:, m, ..., None]
            under_NHWC[rows, ys, xs] += a * (colour_NM3[:, m, None, None, :] - under_NHWC[rows, ys, xs])
    # cover * object + (1 - cover) * under: exact at cover 0 and 1, so the marks never tint a covered pixel
    obj_NHWC = np.where(tex_NHW[..., None], sec_N3[:, None, None, :], fg_N3[:, None, None, :])
    obj_NHWC *= cover_NHW[..., None]
    under_NHWC *= (1.0 - cover_NHW)[..., None]
    img_NHWC = under_NHWC
    img_NHWC += obj_NHWC
    if noise_NHWC is not None:
        noise_NHWC *= params.noise_sigma
        img_NHWC += noise_NHWC
    img_NHWC *= 255.0
    img_NHWC += 0.5
    np.clip(img_NHWC, 0.0, 255.0, out=img_NHWC)
    img_u8 = img_NHWC.astype(np.uint8)
    labels_NF = np.stack([shape, count, color, texture, background], axis=1).astype(np.int64)
    return Generated(np.ascontiguousarray(img_u8.transpose(0, 3, 1, 2)), labels_NF, cells_N4)


def generate(params: EvoShapesParams, split: str, start: int, stop: int, *, clutter: bool = True) -> Generated:
    """Items [start, stop) of ``split``; item i is the same whatever range it is generated in. ``clutter=False``
    leaves out a preset's distractor marks and changes nothing else (for tests and figures)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if not 0 <= start <= stop:
        raise ValueError(f"bad range [{start}, {stop})")
    parts = []
    for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
        if params.preset == DEFAULT_PRESET:
            g = _render_chunk(params, split, chunk)
        else:
            g = _render_outline_chunk(params, split, chunk, clutter=clutter)
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
            int(data_cfg.seed), float(data_cfg.heldout_fraction), preset_of(data_cfg)) else 0
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    return int(getattr(data_cfg, f"{split}_size"))


def cache_path(cache_dir: str | Path, params: EvoShapesParams, split: str, size: int) -> Path:
    return Path(cache_dir) / f"{params.preset}-r{params.resolution}-{split}-{size}-{params.key(split, size)}"


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
                "factors": dict(factors(params.preset)), "label_columns": list(FACTOR_KEYS)}
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
        self.preset = self.params.preset  # the vocabulary of labels, captions and answers: factors(self.preset)
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
        lab, p = self.labels(i), self.preset
        return "\n".join([caption(lab, p), semantic_caption(lab, p)]
                         + [f"{q['question']} {q['answer']}" for q in qa_pairs(lab, p)])

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
            "caption": caption(lab, self.preset),
            "caption_sem": semantic_caption(lab, self.preset),
            "qa": qa_pairs(lab, self.preset),
            "conversations": conversation(lab, self.conversation_kind, order=i * 7919 + self.params.seed,
                                          preset=self.preset),
            "task": "",
            "index": i,
            "source": "evoshapes",
        }


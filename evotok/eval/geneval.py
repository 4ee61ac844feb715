"""Sampling images from a generation run, and the GenEval-style evaluation (``evotok eval geneval``).

Prompts are built from EvoShapes factors, with GenEval's tags where they apply and EvoShapes' own beside them:

===============  =========================================  ====================================
tag              the prompt names                           e.g.
===============  =========================================  ====================================
single_object    the shape                                  "stars"
counting         count and shape                            "two stars"
colors           colour and shape                           "red stars"
color_attr       colour, texture and shape (binding)        "red striped stars"
texture          texture and shape                          "striped stars"
background       shape and background                       "stars on a teal background"
heldout          colour and shape of a held-out pair        (pairs never seen in training)
===============  =========================================  ====================================

Each prompt is sampled several times; an image is correct when every factor its prompt names reads as named by
the checker (a ``checker`` run). Per-tag score = the fraction of correct images; overall = the mean over tags,
as GenEval sums up. ``gen_fd``: Fréchet distance between the generated images and as many real test images, in
the teacher's pooled feature space (the tokenizer run's teacher).

The generator emits codes, and its pixels come from the tokenizer's decoder at Lpix, so what the checker can
read is bounded by that decoder. ``geneval_ceiling/<tag>`` scores the same prompts on the Lpix reconstructions
of real images whose labels match each prompt (test split; held-out pairs from the held-out split): the score a
generator that emits a real image's codes exactly would get. ``gen_fd_ceiling``: the same Fréchet distance for
the Lpix reconstructions of other real test images.

``readout/<factor>`` separates prompt adherence from sampling: for real test images, the teacher-forced
likelihood of their codes under one prompt per class of the factor (naming that class and the true shape) picks
a class; the score is the fraction of images whose true class has the highest likelihood (chance: one over the
number of classes). A model that ignores its prompt reads at chance whatever the sampling settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

TAGS: dict[str, tuple[str, ...]] = {
    "single_object": ("shape",),
    "counting": ("count", "shape"),
    "colors": ("color", "shape"),
    "color_attr": ("color", "texture", "shape"),
    "texture": ("texture", "shape"),
    "background": ("shape", "background"),
    "heldout": ("color", "shape"),
}


class Prompt(NamedTuple):
    tag: str
    text: str
    want: dict[str, int]  # the factors the prompt names -> class index


def geneval_prompts(n_per_tag: int, seed: int = 0, heldout_fraction: float = 0.1) -> list[Prompt]:
    """``n_per_tag`` prompts per tag, deterministic for ``seed``; train-allowed (colour, shape) pairs except for
    the held-out tag, whose pairs are the ones EvoShapes keeps out of training (same data.seed, fraction)."""
    from evotok.data.evoshapes import FACTORS, allowed_pairs, heldout_pairs, partial_caption


    rng = np.random.default_rng(seed)
    allowed = [tuple(int(x) for x in pair) for pair in allowed_pairs(seed, heldout_fraction, "train")]
    held = [tuple(int(x) for x in pair) for pair in heldout_pairs(seed, heldout_fraction)]
    out = []
    for tag, factors in TAGS.items():
        if tag == "heldout" and not held:
            continue
        pairs = held if tag == "heldout" else allowed
        for _ in range(n_per_tag):
            color, shape = pairs[int(rng.integers(len(pairs)))]
            labels = {f: int(rng.integers(len(FACTORS[f]))) for f in FACTORS}
            labels.update(color=int(color), shape=int(shape))
            out.append(Prompt(tag, partial_caption(labels, factors), {f: labels[f] for f in factors}))
    return out


def correct(want: dict[str, int], read: dict[str, int]) -> bool:
    """Every factor the prompt names reads as named."""
    return all(int(read[f]) == int(v) for f, v in want.items())


@torch.no_grad()
def checker_reads(checker, images_BCHW: torch.Tensor, batch_size: int = 256) -> list[dict[str, int]]:
    """The checker's reading of each image, {factor: class index}, in order (call ``checker.eval()`` first)."""
    reads = []
    for i in range(0, len(images_BCHW), batch_size):
        got = checker.read(images_BCHW[i:i + batch_size])
        reads += [{f: int(v[b]) for f, v in got.items()} for b in range(len(next(iter(got.values()))))]
    return reads


def tag_scores(prompts: Sequence[Prompt], reads: Sequence[dict[str, int]]) -> dict[str, float]:
    """``geneval/<tag>`` (fraction of correct images) and ``geneval/overall`` (the mean over tags); ``reads``:
    the checker's reading of each image, in the order of ``prompts`` (a prompt repeated per sample)."""
    hits: dict[str, list[bool]] = {}
    for p, r in zip(prompts, reads):
        hits.setdefault(p.tag, []).append(correct(p.want, r))
    out = {f"geneval/{t}": sum(h) / len(h) for t, h in hits.items()}
    out["geneval/overall"] = sum(out.values()) / len(out) if out else float("nan")
    return out


# --------------------------------------------------------------------------------------------- sampling


def matching_items(prompts: Sequence[Prompt], labels_NF: np.ndarray, seed: int = 0) -> list[int]:
    """For each prompt, the index of a row of ``labels_NF`` (columns FACTOR_KEYS) whose labels match every factor
    the prompt names, drawn at random (deterministic for ``seed``); -1 where no row matches."""
    from evotok.data.evoshapes import FACTOR_KEYS

    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        ok = np.ones(len(labels_NF), dtype=bool)
        for f, v in p.want.items():
            ok &= labels_NF[:, FACTOR_KEYS.index(f)] == int(v)
        rows = np.flatnonzero(ok)
        out.append(int(rows[rng.integers(len(rows))]) if len(rows) else -1)
    return out


@torch.no_grad()
def lpix_reconstructions(evotok, images_BCHW: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Real images through the tokenizer and back out of its pixel decoder at Lpix, in [0, 1]."""
    device = next(evotok.parameters()).device
    out = []
    for i in range(0, len(images_BCHW), batch_size):
        codes = evotok.encode(images_BCHW[i:i + batch_size].to(device))
        out.append(evotok.decode_pixels(codes[..., :evotok.lpix], depth=evotok.lpix).clamp(0, 1).cpu())
    return torch.cat(out) if out else images_BCHW.new_zeros(0, *images_BCHW.shape[1:])


def ceiling_scores(prompts: Sequence[Prompt], checker, evotok, data_cfg, seed: int = 0,
                   datasets: Optional[dict] = None) -> dict[str, float]:
    """``geneval_ceiling/<tag>`` and ``/overall``: :func:`tag_scores` of the checker's reading of the Lpix
    reconstructions of real images that match each prompt (test split; the held-out tag from the held-out
    split; ``datasets`` may hold them already built). A prompt no real image matches counts as wrong."""
    from evotok.data.evoshapes import FACTOR_KEYS
    from evotok.data.sources import build_dataset

    reads: list[dict[str, int]] = [{}] * len(prompts)
    for split, tags in (("test", set(TAGS) - {"heldout"}), ("heldout", {"heldout"})):
        which = [i for i, p in enumerate(prompts) if p.tag in tags]
        if not which:
            continue
        ds = (datasets or {}).get(split)
        ds = build_dataset(data_cfg, split) if ds is None else ds
        rows = matching_items([prompts[i] for i in which], np.asarray(ds.labels_NF), seed)
        have = [(i, r) for i, r in zip(which, rows) if r >= 0]
        if not have:
            continue
        recon = lpix_reconstructions(evotok, torch.stack([ds[r]["image"] for _, r in have]))
        for (i, _), read in zip(have, checker_reads(checker, recon)):
            reads[i] = read
    never = {f: -1 for f in FACTOR_KEYS}
    scores = tag_scores(prompts, [r or never for r in reads])
    return {k.replace("geneval/", "geneval_ceiling/"): v for k, v in scores.items()}


@torch.no_grad()
def likelihood_readout(gen, tokenizer, evotok, images_BCHW: torch.Tensor, labels: Sequence[dict],
                       factors: Sequence[str] = ("shape", "count", "color", "texture", "background"),
                       batch_size: int = 64) -> dict[str, float]:
    """``readout/<factor>``: the fraction of images whose true class of ``factor`` gives their codes the highest
    likelihood among prompts naming each class (and the true shape); see the module docstring."""
    from evotok.data.evoshapes import FACTORS, partial_caption
    from evotok.models.conversation import collate_encoded, encode_generation_prompt

    device = next(gen.parameters()).device
    codes = torch.cat([evotok.encode(images_BCHW[i:i + batch_size].to(device))
                       for i in range(0, len(images_BCHW), batch_size)])
    D = gen.config.lpix
    out = {}
    for f in factors:
        nll_NC = torch.zeros(len(labels), len(FACTORS[f]))
        for c in range(len(FACTORS[f])):
            texts = [partial_caption({**lab, f: c}, tuple({f, "shape"})) for lab in labels]
            for i in range(0, len(texts), batch_size):
                p = collate_encoded([encode_generation_prompt(t, tokenizer) for t in texts[i:i + batch_size]],
                                    tokenizer.pad_token_id, side="right")
                chunk = codes[i:i + batch_size]
                logits = gen(p.input_ids_BT.to(device), p.attention_mask_BT.to(device), chunk).logits
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 2).float(), chunk[..., :D].reshape(-1),
                                                        reduction="none")
                nll_NC[i:i + len(chunk), c] = nll.view(len(chunk), -1).sum(dim=1).cpu()
        truth = torch.tensor([int(lab[f]) for lab in labels])
        out[f"readout/{f}"] = float((nll_NC.argmin(dim=1) == truth).float().mean())
    return out


def parse_per_depth(text: str, kind: type, name: str) -> Any:
    """'900' -> 900; '900,500,200,100' -> [900, 500, 200, 100] (one per depth)."""
    from evotok.models.sampling import SamplingError

    try:
        vals = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SamplingError(f"--{name} {text!r}: one number or one per depth, comma-separated") from None
    if not vals:
        raise SamplingError(f"--{name} is empty")
    return vals[0] if len(vals) == 1 else vals


@torch.no_grad()
def sample_images(gen, tokenizer, evotok, texts: Sequence[str], *, cfg_scale: float = 3.0, temperature: float = 1.0,
                  top_k: Any = 0, top_p: Any = 1.0, generator: Optional[torch.Generator] = None,
                  use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [0, 1] and codes (B, h, w, Lpix) for prompts ``texts`` (an empty text samples
    unconditionally): conditional and unconditional rows in one batch, the LM's KV cache across positions, CFG
    at every depth, pixels from the tokenizer's pixel decoder at Lpix."""
    from evotok.models.conversation import collate_encoded, encode_generation_prompt

    device = next(gen.parameters()).device
    cond = collate_encoded([encode_generation_prompt(t, tokenizer) for t in texts], tokenizer.pad_token_id, side="left")
    uncond = collate_encoded([encode_generation_prompt("", tokenizer)], tokenizer.pad_token_id, side="left")
    h, w = evotok.grid
    codes_BPD = gen.generate(
        cond.input_ids_BT.to(device), cond.attention_mask_BT.to(device), uncond.input_ids_BT.to(device),
        uncond.attention_mask_BT.to(device), n_positions=h * w, cfg_scale=cfg_scale, temperature=temperature,
        top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache,
    )
    codes = codes_BPD.view(len(texts), h, w, -1)
    images = evotok.decode_pixels(codes.to(next(evotok.parameters()).device), depth=codes.shape[-1]).clamp(0, 1)
    return images, codes


def unknown_words(text: str) -> list[str]:
    """Words of a prompt that no EvoShapes caption uses (the byte-level tokenizer still encodes them)."""
    from evotok.data.evoshapes import FACTORS, SHAPE_PLURALS

    vocab = {w for names in FACTORS.values() for w in names} | set(SHAPE_PLURALS.values()) | {"on", "a", "background"}
    return [w for w in text.lower().replace(",", " ").split() if w not in vocab]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 0) -> Path:
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), str(path), nrow=nrow or max(1, int(math.ceil(math.sqrt(len(images))))), padding=1)
    return path


def save_tag_figure(blocks: dict[str, torch.Tensor], path: str | Path, nrow: int) -> Path:
    """One labelled panel per tag, side by side: each panel a grid of that tag's images (``nrow`` per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(blocks), figsize=(2.4 * len(blocks), 2.8), squeeze=False)
    for ax, (tag, imgs) in zip(axes[0], blocks.items()):
        ax.imshow(make_grid(imgs.float().cpu(), nrow=nrow, padding=1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(tag, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def sampling_settings(cfg, cfg_scale=None, top_k=None, top_p=None, temperature=None) -> dict[str, Any]:
    """The given sampling settings, each one left None taken from the run's ``gen.*`` config."""
    g = cfg.gen
    return {"cfg_scale": g.cfg_scale if cfg_scale is None else cfg_scale, "top_k": g.top_k if top_k is None else top_k,
            "top_p": g.top_p if top_p is None else top_p,
            "temperature": g.temperature if temperature is None else temperature}


def _check_settings(cfg_scale, top_k, top_p, temperature) -> None:
    from evotok.models.sampling import check_cfg_scale, check_temperature, check_top_k, check_top_p

    for v, check in ((cfg_scale, check_cfg_scale), (temperature, check_temperature)):
        if v is not None:
            check(v)
    for k in top_k if isinstance(top_k, list) else [top_k]:
        if k is not None:
            check_top_k(k)
    for p in top_p if isinstance(top_p, list) else [top_p]:
        if p is not None:
            check_top_p(p)


def generate_command(run, prompt: str, n: int = 8, cfg_scale: Optional[float] = None, top_k: Any = None,
                     top_p: Any = None, temperature: Optional[float] = None, seed: int = 0,
                     out: str = "grid.png") -> tuple[Path, Path]:
    """``evotok generate``: ``n`` samples of one prompt as a PNG grid and their codes (``<out>.npz``); sampling
    settings left None come from the run's ``gen.*`` config."""
    from evotok.lit.generation_module import load_generation
    from evotok.models.sampling import SamplingError

    if n < 1:
        raise SamplingError(f"--n must be >= 1, got {n}")
    _check_settings(cfg_scale, top_k, top_p, temperature)  # before loading anything
    gen, tokenizer, evotok, cfg = load_generation(run)
    st = sampling_settings(cfg, cfg_scale, top_k, top_p, temperature)
    if not prompt.strip():
        print("empty prompt: these are unconditional samples (the empty user turn CFG uses as its other branch)")
    elif unknown_words(prompt):
        print(f"note: {', '.join(unknown_words(prompt))} never appear in the training captions; the tokenizer "
              f"encodes them byte by byte, and the model has no meaning for them")
    images, codes = sample_images(gen, tokenizer, evotok, [prompt.strip()] * n, **st,
                                  generator=torch.Generator().manual_seed(seed))
    grid = save_grid(images, out)
    npz = Path(out).with_suffix(".npz")
    np.savez_compressed(npz, codes=codes.cpu().numpy().astype(np.int32), prompt=prompt, seed=seed, cfg=st["cfg_scale"],
                        top_k=np.asarray(st["top_k"]), top_p=np.asarray(st["top_p"]), temperature=st["temperature"])
    print(f"grid: {grid.resolve()}\ncodes: {npz.resolve()}")
    return grid, npz


# -------------------------------------------------------------------------------------------- evaluation


def evaluate_geneval(run, checker_run: str = "", n_per_tag: int = 16, n_samples: int = 4,
                     cfg_scale: Optional[float] = None, top_k: Any = None, top_p: Any = None,
                     temperature: Optional[float] = None, seed: int = 0, batch_size: int = 32, write: bool = True,
                     progress: bool = True, readout_images: int = 128) -> dict[str, float]:
    """GenEval-style scores and gen_fd of a generation run, written to its metrics.json with the checker's
    fingerprint; per-tag sample grids under ``<run>/figures/geneval_<tag>.png``. Sampling settings left None come
    from the run's ``gen.*`` config."""
    from tqdm.auto import tqdm

    from evotok.api import load_run_teacher
    from evotok.config import ConfigError
    from evotok.data.sources import build_dataset
    from evotok.eval.metrics import fid_from_features
    from evotok.handover import locate
    from evotok.lit.checker_module import load_checker
    from evotok.lit.generation_module import load_generation
    from evotok.runs import resolve_run, write_metrics

    _check_settings(cfg_scale, top_k, top_p, temperature)
    gen, tokenizer, evotok, cfg = load_generation(run)
    st = sampling_settings(cfg, cfg_scale, top_k, top_p, temperature)
    checker_run = checker_run or cfg.checker.run
    if not checker_run:
        raise ConfigError("evotok eval geneval needs a checker: pass checker.run=<an `evotok train checker` run> "
                          "(or set checker.run in the generation config)")
    checker_up = locate("checker.run", checker_run)
    checker = load_checker(checker_up.artifact)
    prompts = [p for p in geneval_prompts(n_per_tag, seed, cfg.data.heldout_fraction) for _ in range(n_samples)]
    g = torch.Generator().manual_seed(seed)
    images, reads = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="geneval", unit="batch", disable=not progress):
        chunk = prompts[i:i + batch_size]
        imgs, _ = sample_images(gen, tokenizer, evotok, [p.text for p in chunk], **st, generator=g)
        reads += checker_reads(checker, imgs)
        images.append(imgs)
    images_N = torch.cat(images)
    scores = tag_scores(prompts, reads)
    teacher = load_run_teacher(cfg.tokenizer.run)  # verified absolute path (load_generation)
    real = build_dataset(cfg.data, "test")
    real_N = torch.stack([real[i]["image"] for i in range(min(len(real), len(images_N)))])
    with torch.no_grad():
        feats_real = teacher.pooled(real_N)
        scores["gen_fd"] = fid_from_features(feats_real, teacher.pooled(images_N))
        others = range(len(real_N), min(len(real), 2 * len(real_N)))  # other real images, through the tokenizer
        if len(others) > 1:
            recon = lpix_reconstructions(evotok, torch.stack([real[i]["image"] for i in others]))
            scores["gen_fd_ceiling"] = fid_from_features(feats_real, teacher.pooled(recon))
    scores.update(ceiling_scores(prompts, checker, evotok, cfg.data, seed, datasets={"test": real}))
    n_read = min(len(real), readout_images)
    if n_read:
        scores.update(likelihood_readout(gen, tokenizer, evotok, torch.stack([real[i]["image"] for i in range(n_read)]),
                                         [real.labels(i) for i in range(n_read)]))
    if write:
        run_dir, ckpt = resolve_run(run)
        panels = {}
        for tag in TAGS:
            idx = [i for i, p in enumerate(prompts) if p.tag == tag][:32]
            if idx:
                save_grid(images_N[idx], run_dir.figures / f"geneval_{tag}.png", nrow=n_samples)
                panels[tag] = images_N[idx[:4 * n_samples]]
        if panels:  # the first four prompts of every tag, one row per prompt
            save_tag_figure(panels, run_dir.figures / "geneval_tags.png", nrow=n_samples)
        step = int(torch.load(str(ckpt), map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))
        info = {"checker": {"path": str(checker_up.path), "fingerprint": checker_up.fingerprint},
                "prompts_per_tag": n_per_tag, "samples_per_prompt": n_samples, **st, "seed": seed,
                "gen_fd_features": f"teacher pooled embeddings ({teacher.arch}), {len(images_N)} generated vs as many "
                                   f"real test images",
                "ceiling": "geneval_ceiling/* and gen_fd_ceiling: the same scores for the tokenizer's Lpix "
                           "reconstructions of real images (the prompt's factors, for geneval_ceiling)",
                "readout": f"readout/*: per factor, the fraction of {n_read} real test images whose true class "
                           f"gives their codes the highest likelihood among one prompt per class",
                "examples": {t: next(p.text for p in prompts if p.tag == t) for t in {p.tag for p in prompts}}}
        write_metrics(run_dir, "generation", step, scalars=scores, extra={"geneval": info})
    for k, v in scores.items():
        print(f"{k}: {v:.4f}")
    return scores

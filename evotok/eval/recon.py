"""``evaluate_recon``: per-depth reconstruction and representation metrics of a tokenizer run.

For every depth l = 1..L the cumulative latent z_l goes through the pixel decoder and the semantic
decoder, and the split is scored with rFID, PSNR, SSIM, CLIPSIM_pix, CLIPSIM_sem (DESIGN §1, Fig. 5b);
the codes give per-depth codebook usage and perplexity. The result goes into the run folder's
metrics.json (DESIGN §5); names are prefixed ``realphotos/`` when the real-photo set is evaluated.
The record's ``extractors`` maps every per-depth name written to the feature space it is measured in
(e.g. rfid on the teacher's pooled embeddings or on Inception-v3 features); metrics.json keeps the
union over evaluations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from evotok.config import with_overrides
from evotok.eval.metrics import (
    PIXEL_SPACE,
    CodeHistogram,
    FIDPerDepth,
    InceptionPool,
    TeacherPooled,
    clipsim_pix,
    clipsim_sem,
    psnr,
    ssim,
)

PER_DEPTH_NAMES = ("rfid", "psnr", "ssim", "clipsim_pix", "clipsim_sem", "usage", "perplexity")


def _images_only(items: Sequence[dict]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items])


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _checkpoint_step(ckpt: Path) -> int:
    try:
        obj = torch.load(str(ckpt), map_location="cpu", weights_only=False, mmap=True)
        return int(obj.get("global_step", 0))
    except Exception:  # a bare state dict or an unreadable file: the step is informational only
        return 0


def metric_prefix(source: str) -> str:
    """Names of metrics on a data source other than the embedded EvoShapes carry the source as prefix."""
    return "" if source == "evoshapes" else f"{source}/"


def format_table(per_depth: dict[str, list], prefix: str = "") -> str:
    """A per-depth table, one row per depth, one column per metric; rfid with three significant digits
    (the embedded rFID falls below 1e-3 from depth 3 on), the others with four decimals."""
    names = [n for n in PER_DEPTH_NAMES if prefix + n in per_depth]
    L = len(per_depth[prefix + names[0]]) if names else 0
    head = "depth " + " ".join(f"{n:>11}" for n in names)
    rows = [head]
    for l in range(L):
        vals = []
        for n in names:
            v = per_depth[prefix + n][l]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                vals.append(f"{'nan':>11}")
            else:
                vals.append(f"{v:>11.3g}" if n == "rfid" else f"{v:>11.4f}")
        rows.append(f"{l + 1:>5} " + " ".join(vals))
    return "\n".join(rows)


def metric_extractors(feature_description: str, teacher_arch: str, prefix: str = "") -> dict[str, str]:
    """``{prefixed per-depth name: the feature space it is measured in}`` for :data:`PER_DEPTH_NAMES`;
    ``feature_description``: the rFID extractor's ``description``."""
    arch = teacher_arch or "?"
    described = {
        "rfid": f"Fréchet distance of {feature_description}",
        "psnr": PIXEL_SPACE,
        "ssim": PIXEL_SPACE,
        "clipsim_pix": f"cosine of teacher pooled embeddings (open_clip {arch})",
        "clipsim_sem": f"per-token cosine to teacher penultimate patch tokens (open_clip {arch})",
        "usage": "code histogram over the split",
        "perplexity": "code histogram over the split",
    }
    return {prefix + n: described[n] for n in PER_DEPTH_NAMES}


def _previous_extractors(run_path: Path) -> dict[str, str]:
    """The ``extractors`` mapping already in the run's metrics.json ({} when there is none):
    ``write_metrics`` replaces top-level keys, so earlier evaluations' entries are merged in here."""
    try:
        old = json.loads((run_path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    extractors = old.get("extractors") if isinstance(old, dict) else None
    return dict(extractors) if isinstance(extractors, dict) else {}


@torch.no_grad()
def evaluate_recon(
    run_or_ckpt: str | Path,
    split: str = "val",
    max_images: int = 0,
    data_overrides: Sequence[str] = (),
    out: Optional[str | Path] = None,
    *,
    batch_size: int = 0,
    device: str = "auto",
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a tokenizer run (folder or .ckpt) on ``split`` and return the metrics record.

    ``data_overrides``: ``key=value`` config overrides applied on top of the run's config, e.g.
    ``["data.source=realphotos"]`` or ``["eval.fid_features=inception", "eval.inception_weights=/path.pth"]``.
    ``max_images``: 0 = ``eval.max_images`` of the config (0 there = the whole split).
    Writes ``metrics.json`` in the run folder (unless ``write=False``) and, when ``out`` is given, the
    same record to that JSON file. Returns ``{"stage", "step", "scalars", "per_depth", "eval"}``.
    """
    from torch.utils.data import DataLoader, IterableDataset

    from evotok.api import load_tokenizer
    from evotok.data.sources import build_dataset
    from evotok.models.teacher import load_teacher
    from evotok.runs import resolve_run, write_metrics

    run, ckpt = resolve_run(run_or_ckpt)
    dev = _resolve_device(device)
    tok = load_tokenizer(ckpt).to(dev).eval()
    cfg = with_overrides(getattr(tok, "config", None) or run.load_config(), data_overrides)
    limit = max_images or cfg.eval.max_images
    inception = InceptionPool(cfg.eval.inception_weights).to(dev) if cfg.eval.fid_features == "inception" else None
    from evotok.handover import upstream_config

    # the tokenizer's own teacher: found through the run's upstream record, verified by fingerprint
    teacher = load_teacher(upstream_config(ckpt, cfg, "tokenizer")).to(dev)
    L = int(tok.depth)
    K = int(getattr(tok.quantizer, "codebook_size", 0) or cfg.model.quantizer.codebook_size)
    sem_grid = tuple(int(g) for g in tok.grid)
    teacher_grid = tuple(teacher.token_grid)

    feature: torch.nn.Module = inception if inception is not None else TeacherPooled(teacher)
    fid = FIDPerDepth(feature, L).to(dev)
    hist = CodeHistogram(L, K)

    dataset = build_dataset(cfg.data, split)
    loader = DataLoader(
        dataset, batch_size=batch_size or cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
        collate_fn=_images_only,
    )
    total = len(dataset) if not isinstance(dataset, IterableDataset) else None
    if limit and total is not None:
        total = min(total, limit)
    elif limit:
        total = limit

    sums = {n: torch.zeros(L, dtype=torch.float64) for n in ("psnr", "ssim", "clipsim_pix", "clipsim_sem")}
    seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"eval recon {split}", unit="img")
    for images in loader:
        if limit:
            images = images[: limit - seen]
        if len(images) == 0:
            break
        images = images.to(dev).float()
        q = tok.quantize(images)
        hist.update(q.codes)
        z_cum = q.z_cum  # (L, B, d, h, w)
        orig = teacher.encode(images)
        real_feats = orig.pooled_BE if isinstance(feature, TeacherPooled) else feature(images)
        fake_feats, recs = [], []
        for l in range(L):
            rec = tok.decode_pixels(z_cum[l]).clamp(0, 1)
            rec_pooled = teacher.pooled(rec)
            sem = tok.decode_semantic(z_cum[l])
            recs.append(rec)
            sums["clipsim_pix"][l] += clipsim_pix(rec_pooled, orig.pooled_BE).double().sum().cpu()
            sums["clipsim_sem"][l] += clipsim_sem(sem, orig.tokens_BTc, sem_grid, teacher_grid).double().sum().cpu()
            fake_feats.append(rec_pooled if isinstance(feature, TeacherPooled) else feature(rec))
        # the pixel metrics of all depths in one call each: torchmetrics' SSIM costs mostly per call on a CPU
        rec_LB = torch.stack(recs).flatten(0, 1)
        ref_LB = images.expand(L, *images.shape).flatten(0, 1)
        sums["psnr"] += psnr(rec_LB, ref_LB).double().view(L, -1).sum(1).cpu()
        sums["ssim"] += ssim(rec_LB, ref_LB).double().view(L, -1).sum(1).cpu()
        fid.update_features(real_feats, fake_feats)
        seen += len(images)
        if bar is not None:
            bar.update(len(images))
        if limit and seen >= limit:
            break
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError(f"split '{split}' of data.source={cfg.data.source} gave no images to evaluate")

    prefix = metric_prefix(cfg.data.source)
    per_depth: dict[str, list] = {f"{prefix}rfid": fid.compute()}
    for n in ("psnr", "ssim", "clipsim_pix", "clipsim_sem"):
        per_depth[prefix + n] = (sums[n] / seen).tolist()
    per_depth[prefix + "usage"] = hist.usage()
    per_depth[prefix + "perplexity"] = hist.perplexity()
    info = {
        "split": split, "source": cfg.data.source, "num_images": seen, "fid_features": cfg.eval.fid_features,
        "checkpoint": str(ckpt), "lpix": int(tok.lpix), "lsem": int(tok.lsem), "depth": L,
    }
    extractors = metric_extractors(feature.description, getattr(teacher, "arch", ""), prefix)
    extractors = {k: v for k, v in extractors.items() if k in per_depth}
    scalars = {f"{prefix}eval_num_images": float(seen)}
    step = _checkpoint_step(ckpt)
    stage = run.path.parent.name or "tokenizer"
    eval_key = f"{prefix}recon_eval"
    if write:
        merged = {**_previous_extractors(run.path), **extractors}
        write_metrics(run, stage, step, scalars=scalars, per_depth=per_depth, extra={eval_key: info, "extractors": merged})
    record = {"stage": stage, "step": step, "scalars": scalars, "per_depth": per_depth, eval_key: info,
              "extractors": extractors}
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(_json_safe(record), indent=2) + "\n")
    print(f"recon metrics: {run.path} ({cfg.data.source} {split}, {seen} images, rFID on {cfg.eval.fid_features} features)")
    print(format_table(per_depth, prefix))
    return record


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj

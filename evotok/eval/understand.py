"""Evaluating an understanding run: ``evotok eval vqa`` (EvoShapes questions per type, with a blind baseline;
``--depths`` for the per-depth curve), ``evotok eval pope`` / ``evotok eval mme`` (local benchmark files) and
``evotok chat``. Results go into the run's metrics.json (DESIGN §5: ``vqa/<type>``, ``blind/<type>``,
``vqa/overall``; per-depth lists ``vqa_<type>`` for semantic-decoder features and ``vqa_latent_<type>`` for raw
z_l)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from evotok.eval.vqa import QA_TYPES, ask, read_mme, read_pope, score_mme, score_pope, vqa_on_batches


def _loader(cfg, split: str, tokenizer, n_tokens: int, batch_size: int = 0, shuffle_seed: Optional[int] = None):
    from torch.utils.data import DataLoader

    from evotok.data.datamodule import EvoTokDataModule
    from evotok.lit.understanding_module import conversation_collate

    dm = EvoTokDataModule(cfg, stage="understanding", collate_fn=conversation_collate(tokenizer, n_tokens, cfg.lm.max_length))
    ds = dm.dataset(split)
    gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return DataLoader(ds, batch_size=batch_size or cfg.data.batch_size, shuffle=gen is not None, generator=gen,
                      collate_fn=dm.collate_fn, num_workers=0, drop_last=gen is not None)


def _qa_config(cfg):
    """The run's config asking every question (data.conversations=qa) of ``split``."""
    from evotok.config import with_overrides

    return with_overrides(cfg, ["data.conversations=qa"])


def _write(run_or_ckpt, scalars=None, per_depth=None, extra=None) -> None:
    from evotok.runs import resolve_run, write_metrics

    run, ckpt = resolve_run(run_or_ckpt)
    step = int(torch.load(str(ckpt), map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))
    write_metrics(run, "understanding", step, scalars=scalars, per_depth=per_depth, extra=extra)


def evaluate_vqa(run_or_ckpt, split: str = "test", max_images: int = 0, write: bool = True,
                 progress: bool = True) -> dict[str, float]:
    """Greedy answers to every question of ``split`` (EvoShapes: shape, count, colour, texture, background),
    accuracy per type and overall, beside the blind baseline; written to the run's metrics.json."""
    from evotok.lit.understanding_module import load_understanding

    mllm, tokenizer, cfg = load_understanding(run_or_ckpt)
    cfg = _qa_config(cfg)
    loader = _loader(cfg, split, tokenizer, mllm.features.n_tokens)
    scores = vqa_on_batches(mllm, tokenizer, loader, lambda b: mllm.image_features(b["image"]), max_images=max_images,
                            progress=progress)
    if write:
        source = (f"{cfg.mllm.features} features at depth {cfg.mllm.depth or ('Lsem' if cfg.mllm.features == 'semantic' else 'Lpix')}"
                  f" of the run's tokenizer; blind = the features of another image")
        _write(run_or_ckpt, scalars=scores, extra={"vqa_eval": {"split": split, "features": source}})
    print(format_vqa(scores))
    return scores


def format_vqa(scores: dict[str, float]) -> str:
    rows = ["type        vqa   blind"]
    for t in (*QA_TYPES, "overall"):
        if f"vqa/{t}" in scores:
            rows.append(f"{t:<10} {scores[f'vqa/{t}']:.3f}  {scores[f'blind/{t}']:.3f}")
    return "\n".join(rows)


def parse_depths(text: str, depth: int) -> list[int]:
    """'all' -> 1..L; '1,4,16' -> those (each in 1..L)."""
    from evotok.config import ConfigError

    if text == "all":
        return list(range(1, depth + 1))
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--depths {text!r}: 'all' or a comma-separated list of depths in 1..{depth}") from None
    if not out or out[0] < 1 or out[-1] > depth:
        raise ConfigError(f"--depths {text!r}: depths must lie in 1..{depth} (the tokenizer's L)")
    return out


def depth_curve(run_or_ckpt, depths: str = "all", kinds: Sequence[str] = ("semantic", "latent"), probe_steps: int = 100,
                lr: float = 1e-3, max_images: int = 128, write: bool = True, progress: bool = True) -> dict[str, list]:
    """Which depth understands: for each feature kind and depth l, a fresh projector trained alone (the run's LM
    frozen) for ``probe_steps`` steps on question/answer conversations of the train split, with the features of
    z_l, then VQA on ``max_images`` test images. Returns (and writes) per-depth lists ``vqa_<type>`` (semantic)
    and ``vqa_latent_<type>`` (raw z_l), ``nan`` at depths not probed."""
    from tqdm.auto import tqdm

    from evotok.lit.understanding_module import load_understanding
    from evotok.models.mllm import FeatureSource, ImageFeatures, MultimodalLM, Projector

    mllm, tokenizer, cfg = load_understanding(run_or_ckpt)
    cfg = _qa_config(cfg)
    evotok = mllm.features.tokenizer
    L = int(evotok.depth)
    chosen = parse_depths(depths, L)
    mllm.lm.requires_grad_(False)
    per_depth: dict[str, list] = {}
    jobs = [(k, l) for k in kinds for l in chosen]
    bar = tqdm(jobs, desc="vqa per depth", unit="probe", disable=not progress)
    for kind, l in bar:
        bar.set_postfix_str(f"{kind} z_{l}")
        features = ImageFeatures(evotok, FeatureSource(kind, l))
        torch.manual_seed(cfg.run.seed)
        probe = MultimodalLM(mllm.lm, Projector(features.width, mllm.projector.hidden), mllm.ids, features)  # the LM shared, frozen
        opt = torch.optim.AdamW(probe.projector.parameters(), lr=lr)
        train = iter(_loader(cfg, "train", tokenizer, probe.features.n_tokens, shuffle_seed=cfg.run.seed + l))
        for _ in range(probe_steps):
            batch = next(train)
            loss = probe(batch["lm"], probe.image_features(batch["image"])).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        scores = vqa_on_batches(probe.eval(), tokenizer, _loader(cfg, "test", tokenizer, probe.features.n_tokens),
                                lambda b, p=probe: p.image_features(b["image"]), max_images=max_images, blind=False)
        prefix = "vqa_" if kind == "semantic" else "vqa_latent_"
        for t in (*QA_TYPES, "overall"):
            per_depth.setdefault(f"{prefix}{t}", [float("nan")] * L)[l - 1] = scores.get(f"vqa/{t}", float("nan"))
    if write:
        from analysis.plotting import save_figure
        from analysis.vqa_depth import plot_vqa_depth
        from evotok.data.evoshapes import FACTORS
        from evotok.runs import resolve_run

        _write(run_or_ckpt, per_depth=per_depth, extra={"vqa_depth_eval": {
            "probe_steps": probe_steps, "lr": lr, "test_images": max_images, "depths": chosen, "kinds": list(kinds),
            "lpix": int(evotok.lpix), "lsem": int(evotok.lsem),
            "protocol": "a fresh projector trained alone (the run's LM frozen) per feature kind and depth"}})
        chance = {t: 1.0 / len(FACTORS[t]) for t in QA_TYPES}
        fig = plot_vqa_depth(per_depth, lpix=int(evotok.lpix), lsem=int(evotok.lsem), chance=chance)
        paths = save_figure(fig, resolve_run(run_or_ckpt)[0].figures, "vqa_depth")
        print(f"per-depth VQA figure: {paths[0].resolve()}")
    return per_depth


def _load_images(paths: Sequence[Path], resolution: int) -> torch.Tensor:
    from evotok.data.sources import image_to_tensor, open_rgb

    return torch.stack([image_to_tensor(open_rgb(p), resolution) for p in paths])


def _image_path(root: Path, name: str) -> Path:
    p = (root / name) if root else Path(name)
    if not p.is_file():
        raise FileNotFoundError(f"benchmark image {p} does not exist (--image-root {root})")
    return p


def _answer_file(mllm, tokenizer, cfg, records: list[dict], image_root: str, batch_size: int = 32) -> list[str]:
    root = Path(image_root) if image_root else Path()
    answers: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        images = _load_images([_image_path(root, r["image"]) for r in chunk], cfg.data.resolution)
        with torch.no_grad():
            feats = mllm.image_features(images)
        answers += ask(mllm, tokenizer, feats, [r["question"] for r in chunk])
    return answers


def evaluate_benchmark(kind: str, run_or_ckpt, file: str, image_root: str = "", write: bool = True) -> dict[str, float]:
    """Score a local POPE-style jsonl or MME-style tsv file (see evotok.eval.vqa) with the run's model."""
    from evotok.lit.understanding_module import load_understanding

    records = read_pope(file) if kind == "pope" else read_mme(file)
    mllm, tokenizer, cfg = load_understanding(run_or_ckpt)
    answers = _answer_file(mllm, tokenizer, cfg, records, image_root)
    scores = score_pope([r["label"] for r in records], answers) if kind == "pope" else score_mme(records, answers)
    if write:
        _write(run_or_ckpt, scalars=scores, extra={f"{kind}_eval": {"file": str(Path(file).resolve())}})
    for k, v in scores.items():
        print(f"{k}: {v:.4f}")
    return scores


def chat(run_or_ckpt, image: str, questions: Sequence[str], interactive: bool = False,
         input_fn=input, print_fn=print) -> list[str]:
    """Answer questions about one image; ``interactive`` keeps asking (an empty line or EOF ends)."""
    from evotok.lit.understanding_module import load_understanding

    mllm, tokenizer, cfg = load_understanding(run_or_ckpt)
    with torch.no_grad():
        feats = mllm.image_features(_load_images([_image_path(Path(), image)], cfg.data.resolution))
    answers = []
    pending = list(questions)
    while True:
        if not pending:
            if not interactive:
                break
            try:
                q = input_fn("question> ").strip()
            except EOFError:
                break
            if not q:
                break
            pending = [q]
        q = pending.pop(0)
        a = ask(mllm, tokenizer, feats, [q])[0]
        answers.append(a)
        print_fn(a)
    return answers



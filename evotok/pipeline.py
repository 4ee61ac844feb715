"""Multi-stage pipelines (experiments/pipelines/<name>.yaml, or any spec file given by path).

A spec is a list of steps: ``train`` steps (a stage with its config) and the steps that read a trained run
(``eval_recon``, ``eval_vqa``, ``eval_geneval``, ``figures``, ``record``; ``data_preview``). Steps hand over
through run folders only: a training step's upstream keys (the stage registry's hand-over keys, e.g.
``teacher.run`` for the tokenizer) are set to the run folders of the stages trained before it, unless the
step sets them itself. So the spec is a graph: each stage depends on the runs it reads, each eval step on its
stage. Global ``key=value`` overrides apply to the steps whose stage reads the key (an override no step
reads is an error).

Identity. A training step's identity is a hash of its resolved config (what the stage reads, without the
run's folder and name and without cosmetic keys) and the fingerprints of the upstream checkpoints it reads
(:func:`stage_identity`); the run folder keeps it in ``identity.json``. On a re-run of the pipeline:

- a finished run with the same identity is skipped (nothing in its folder is touched);
- an interrupted run (no ``finished`` mark) with the same identity resumes from its last checkpoint;
- a run whose identity changed (its config or an upstream changed) is trained again from scratch
  (``run.overwrite``), and so, through the fingerprints, is every stage that reads it -- nothing else;
- an eval/figures/record step runs again only when its stage's run changed (``pipeline_steps.json`` in the
  run folder records the identity each step last completed for).

The pipeline folder ``<run.dir>/pipelines/<run_name>/`` gets ``summary.json`` and an ``index.html`` report
(steps, status, times, run folders, metrics, figures). A step whose stage is not built yet stops the
pipeline with a message saying so (never a stand-in result).
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from evotok.config import ConfigError, experiment_dirs, load_config, override_key, stage_reads

PIPELINE_DIRS = experiment_dirs("pipelines")
PIPELINES = tuple(sorted({p.stem for d in PIPELINE_DIRS for p in d.glob("*.yaml")}))
STEP_KINDS = ("data_preview", "train", "eval_recon", "eval_vqa", "eval_geneval", "figures", "record", "check")


def pipeline_path(name: str) -> Path:
    """A pipeline spec file: a path, or a name under each folder of experiment_dirs('pipelines')."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in PIPELINE_DIRS:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    raise ConfigError(
        f"unknown pipeline '{name}' (looked in {', '.join(str(d) for d in PIPELINE_DIRS)}); pipelines: {', '.join(PIPELINES)}"
    )


def load_pipeline(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from evotok.stages import STAGE_NAMES

    path = pipeline_path(name)
    spec = OmegaConf.to_container(OmegaConf.load(path))
    for i, step in enumerate(spec.get("steps", [])):  # type: ignore[union-attr]
        if step.get("do") not in STEP_KINDS:
            raise ConfigError(f"{path}: step {i + 1} has do={step.get('do')!r}; one of {', '.join(STEP_KINDS)}")
        if step.get("stage") is not None and step["stage"] not in STAGE_NAMES:
            raise ConfigError(f"{path}: step {i + 1} has stage={step['stage']!r}; one of {', '.join(STAGE_NAMES)}")
    return spec  # type: ignore[return-value]


def handover_overrides(stage: str, trained: dict[str, Path], step_overrides: Sequence[str]) -> list[str]:
    """``key=path`` for every hand-over key of ``stage`` whose producing stage this pipeline trained earlier,
    unless the step's own overrides set that key."""
    from evotok.stages import HANDOVER, get_stage

    own = {override_key(o) for o in step_overrides}
    return [f"{key}={trained[HANDOVER[key]]}" for key in get_stage(stage).upstream
            if HANDOVER[key] in trained and key not in own]


def overrides_for(stage: str, overrides: Sequence[str]) -> list[str]:
    """The global overrides ``stage`` reads."""
    return [o for o in overrides if stage_reads(stage, override_key(o))]


# ------------------------------------------------------------------------------------------ identity

# keys that change how a run looks, not what it computes
COSMETIC_KEYS = ("run.name", "run.dir", "run.overwrite", "trainer.progress_bar", "trainer.loggers",
                 "trainer.log_every_n_steps", "trainer.image_log_every_n_steps",
                 "trainer.threads")  # how many CPU threads compute a run is not what it is


def upstream_fingerprints(cfg, stage: str) -> dict[str, str]:
    """Hand-over key -> fingerprint of the artefact the stage will read (a run's best, else last checkpoint;
    a weights file or folder), for every hand-over key of ``stage`` that is set."""
    from evotok.config import get_key
    from evotok.handover import fingerprint_file, fingerprint_folder
    from evotok.runs import RunDir
    from evotok.stages import HANDOVER, get_stage

    out = {}
    for key in get_stage(stage).upstream:
        value = get_key(cfg, key)
        if not value:
            continue
        p = Path(str(value))
        if HANDOVER[key]:  # a run folder (or a .ckpt)
            run = RunDir(p)
            ckpt = p if p.is_file() else (run.best_ckpt if run.best_ckpt.is_file() else run.last_ckpt)
            out[key] = fingerprint_file(ckpt) if ckpt.is_file() else f"missing:{p}"
        elif p.is_dir():
            out[key] = fingerprint_folder(p)
        else:
            out[key] = fingerprint_file(p) if p.is_file() else f"missing:{p}"
    return out


def stage_identity(cfg, stage: str) -> str:
    """sha256 (16 hex digits) of the stage's resolved config without :data:`COSMETIC_KEYS`, and of its
    upstream fingerprints (:func:`upstream_fingerprints`)."""
    from evotok.config import to_dict

    tree = to_dict(cfg, stage)
    for key in COSMETIC_KEYS:
        section, _, leaf = key.partition(".")
        tree.get(section, {}).pop(leaf, None)
    from evotok.stages import HANDOVER

    for key in HANDOVER:  # the path of an upstream does not matter, its content does (fingerprints below)
        section, _, leaf = key.partition(".")
        if isinstance(tree.get(section), dict) and leaf in tree[section]:
            tree[section][leaf] = bool(tree[section][leaf])
    payload = json.dumps({"stage": stage, "config": tree, "upstream": upstream_fingerprints(cfg, stage)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_identity(run_path: Path) -> Optional[str]:
    f = Path(run_path) / "identity.json"
    try:
        return json.loads(f.read_text()).get("identity")
    except (OSError, json.JSONDecodeError):
        return None


def write_identity(run_path: Path, identity: str, pipeline: str) -> None:
    f = Path(run_path) / "identity.json"
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"identity": identity, "pipeline": pipeline}, indent=2) + "\n")
    tmp.replace(f)


def _step_key(step: dict) -> str:
    return json.dumps({k: v for k, v in step.items() if k != "stage"}, sort_keys=True, default=str)


def _steps_done(run_path: Path) -> dict[str, str]:
    try:
        return json.loads((Path(run_path) / "pipeline_steps.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _mark_step_done(run_path: Path, step: dict, identity: str) -> None:
    done = _steps_done(run_path)
    done[_step_key(step)] = identity
    f = Path(run_path) / "pipeline_steps.json"
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(done, indent=2) + "\n")
    tmp.replace(f)


# ------------------------------------------------------------------------------------------ running


class StepRecord(NamedTuple):
    index: int
    kind: str
    stage: str
    status: str  # trained | resumed | retrained | up to date | ran | skipped
    seconds: float
    run: str  # the run folder ("" for steps without one)
    identity: str
    outputs: tuple[str, ...]  # files the step wrote (figures, grids, records)


def run_pipeline(name: str, overrides: Sequence[str] = (), only: Sequence[str] = ()) -> dict[str, Path]:
    """Run every step of pipeline ``name`` (a name or a spec path); return the run folder of each trained
    stage. See the module docstring for what is skipped, resumed or re-run. ``only``: run just the steps of
    these stages; the stages they read must have finished (a sweep's scheduler runs one stage per job)."""
    from evotok.lit.train import train
    from evotok.runs import RunDir, run_path

    spec = load_pipeline(name)
    label = Path(name).stem
    bad = sorted(set(only) - {st.get("stage") for st in spec["steps"]})
    if bad:
        raise ConfigError(f"--only {','.join(bad)}: pipeline '{label}' has no step of that stage")
    needed = _upstream_closure(spec, only) if only else set()
    run_name = spec.get("run_name", label)
    runs: dict[str, Path] = {}
    identities: dict[str, str] = {}
    base = list(overrides)
    stages = {step["stage"] for step in spec["steps"] if step["do"] == "train"}
    for o in base:
        if not any(stage_reads(st, override_key(o)) for st in stages):
            raise ConfigError(f"override '{o}' is read by no stage of pipeline '{label}' (stages: {', '.join(sorted(stages))})")
    from evotok.runs import is_rank_zero

    rank_zero = is_rank_zero()
    forced = any(override_key(o) == "run.overwrite" and o.partition("=")[2].lower() in ("true", "1") for o in base)
    t0 = time.time()
    records: list[StepRecord] = []
    checks: list = []  # evotok.checks.Check of every check step
    n = len(spec["steps"])
    common_cfg = None
    for i, step in enumerate(spec["steps"]):
        kind, stage = step["do"], step.get("stage", "")
        start = time.time()
        status, outputs, run_dir, ident = "ran", [], "", ""
        if only and stage not in only and not (kind == "train" and stage in needed):
            continue  # --only: neither one of the stages to run nor one they read
        if kind != "train" and not rank_zero:
            continue  # under a multi-rank launch only global rank 0 evaluates, draws and records
        print(f"\n=== [{label} {i + 1}/{n}] {kind} {stage} (pipeline time {time.time() - t0:.0f} s) ===")
        if kind == "data_preview":
            from evotok.data.preview import write_preview
            from evotok.stages import COMMON

            cfg = load_config(step.get("config"), [o for o in base if override_key(o).split(".")[0] in COMMON])
            common_cfg = cfg
            out = Path(cfg.run.dir) / "data" / f"evoshapes_preview_{cfg.data.resolution}px.png"
            if out.is_file():
                status = "up to date"
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                write_preview(cfg, out)
            outputs.append(str(out))
            print(f"sample grid: {out.resolve()}")
        elif kind == "check":
            from evotok.checks import check_table, run_checks

            found = run_checks(step.get("require", []), runs)
            checks += found
            print(check_table(found))
            status = "ok" if all(c.ok for c in found) else "MISSED"
        elif kind == "train":
            own = list(step.get("overrides", []))
            extra = [f"run.name={step.get('name', run_name)}", *own, *handover_overrides(stage, runs, own)]
            cfg = load_config(step.get("config"), [*extra, *overrides_for(stage, base)], stage=stage)
            common_cfg = common_cfg or cfg
            path = Path(run_path(cfg, stage))
            ident = stage_identity(cfg, stage)
            old = read_identity(path)
            run = RunDir(path)
            if only and stage not in only:  # an upstream of the stages to run: read, never trained here
                if not run.finished or old != ident:
                    raise ConfigError(f"{stage} run {path} is not finished with identity {ident}: run its stage first "
                                      f"(evotok pipeline --spec {name} --only {stage})")
                runs[stage], identities[stage] = path, ident
                records.append(StepRecord(i + 1, kind, stage, "upstream", 0.0, str(path), ident, ()))
                continue
            if forced:
                status = "retrained"
            elif run.finished and old == ident:
                status = "up to date"
            elif run.finished and old is None:
                status = "up to date"
                print(f"{stage}: finished run at {path} records no identity (made before identities existed); "
                      f"taking it as up to date")
                write_identity(path, ident, label)
            elif path.exists() and old is not None and old != ident:
                status = "retrained"
            elif path.exists() and run.last_ckpt.is_file():
                status = "resumed"
            else:
                status = "trained"
            if status == "up to date":
                print(f"{stage}: up to date at {path} (identity {ident}); skipping")
            else:
                if status == "retrained" and not forced:
                    print(f"{stage}: config or upstream changed since {path} was trained (identity {old} -> {ident}); "
                          f"training again from scratch")
                    shutil.rmtree(path)
                if status != "resumed" and not forced:  # before training: an interrupted run keeps its identity
                    path.mkdir(parents=True, exist_ok=True)
                    write_identity(path, ident, label)
                train(cfg, stage, argv=["evotok", "pipeline", name, *base])
                write_identity(path, ident, label)  # (run.overwrite=true deleted the folder first)
            runs[stage], identities[stage] = path, ident
            run_dir = str(path)
        else:
            if only and stage not in only:
                continue
            run = runs[stage]
            run_dir, ident = str(run), identities[stage]
            if _steps_done(run).get(_step_key(step)) == ident and not forced:
                status = "up to date"
                print(f"{kind} {stage}: up to date for {run} (identity {ident}); skipping")
            else:
                outputs = _run_eval_step(kind, step, run, runs)
                _mark_step_done(run, step, ident)
        records.append(StepRecord(i + 1, kind, stage, status, time.time() - start, run_dir, ident, tuple(outputs)))
    total = time.time() - t0
    folder = Path((common_cfg.run.dir if common_cfg is not None else "runs")) / "pipelines" / run_name
    if only:
        folder = folder / f"only_{'_'.join(sorted(only))}"
    if not rank_zero:
        return runs
    report = write_report(folder, label, records, total, checks)
    print(f"\n{label} pipeline done in {total:.0f} s:")
    print(summary_table(records))
    for stage, path in runs.items():
        print(f"  {stage}: {path.resolve()}")
    if checks:
        from evotok.checks import CheckFailed, check_table, failures

        print("\nchecks:\n" + check_table(checks))
        missed = failures(checks)
        if missed:
            print(f"report: {report.resolve()}")
            raise CheckFailed(f"pipeline '{label}' missed {len(missed)} of {len(checks)} checks: " + "; ".join(
                f"{c.name} (wanted {c.wanted}, got {c.got})" for c in missed) + f". Report: {report.resolve()}")
    print(f"report: {report.resolve()}")
    return runs


# the stages an eval step reads besides its own stage's run (the GenEval-style eval scores with the checker)
EVAL_READS: dict[str, tuple[str, ...]] = {"eval_geneval": ("checker",)}


def stage_upstreams(steps: Sequence[dict], stage: str) -> set[str]:
    """The other stages whose runs the steps of ``stage`` read: the hand-over keys of its train steps, less
    those a step sets itself (``understanding.run=`` for generation from the LM alone), and what its eval
    steps score with (:data:`EVAL_READS`)."""
    from evotok.stages import HANDOVER, get_stage

    keys = {key for st in steps if st["do"] == "train" and st.get("stage") == stage
            for key in get_stage(stage).upstream
            if key not in {override_key(o) for o in st.get("overrides") or ()}}
    producers = {HANDOVER[key] for key in keys} | {
        read for st in steps if st.get("stage") == stage for read in EVAL_READS.get(st["do"], ())}
    return {p for p in producers if p and p != stage}


def _upstream_closure(spec: dict, only: Sequence[str]) -> set[str]:
    """The stages of the pipeline that the ``only`` stages read, directly or through each other."""
    trained = {st["stage"] for st in spec["steps"] if st["do"] == "train"}
    needed: set[str] = set()
    todo = list(only)
    while todo:
        for producer in sorted(stage_upstreams(spec["steps"], todo.pop())):
            if producer in trained and producer not in needed and producer not in only:
                needed.add(producer)
                todo.append(producer)
    return needed


def _run_eval_step(kind: str, step: dict, run: Path, runs: dict[str, Path]) -> list[str]:
    """One step that reads a trained run; returns the files it wrote (for the report)."""
    from evotok.runs import RunDir

    outputs: list[str] = []
    if kind == "eval_recon":
        from evotok.eval.recon import evaluate_recon

        evaluate_recon(run, split=step.get("split", "val"), max_images=step.get("max_images", 0))
    elif kind == "eval_vqa":
        from evotok.eval import understand

        if step.get("depths"):
            understand.depth_curve(run, step["depths"], probe_steps=step.get("probe_steps", 100),
                                   max_images=step.get("max_images", 128))
        else:
            understand.evaluate_vqa(run, split=step.get("split", "test"), max_images=step.get("max_images", 0))
    elif kind == "eval_geneval":
        from evotok.eval.geneval import evaluate_geneval

        evaluate_geneval(run, str(runs.get("checker", "")), n_per_tag=step.get("prompts", 16),
                         n_samples=step.get("samples", 4))
    elif kind == "figures":
        from analysis.make_figures import make_figures
        from evotok.eval.grid import save_recon_grid

        n_images = min(step.get("n_images", 512), RunDir(run).load_config().data.val_size)
        index = make_figures([run], run / "figures", n_images=n_images)
        print(f"figures: {Path(index).resolve()}")
        grid = save_recon_grid(run, run / "figures" / "recon_grid.png")
        print(f"reconstruction grid: {grid.resolve()}")
        outputs += [str(index), str(grid)]
    elif kind == "record":  # README numbers: results/<name>.json from a run folder (evotok.readme)
        from evotok.readme import record

        out = record(step["name"], run, curve_tag=step.get("curve"))
        if step.get("nmi_name"):
            shutil.copy(run / "figures" / "nmi.json", out.parent / f"{step['nmi_name']}.json")
        print(f"recorded: {out}")
        outputs.append(str(out))
    return outputs


# ------------------------------------------------------------------------------------------ report


def summary_table(records: Sequence[StepRecord]) -> str:
    rows = [f"  {'#':>2}  {'step':<13} {'stage':<14} {'status':<11} {'seconds':>8}  run"]
    for r in records:
        rows.append(f"  {r.index:>2}  {r.kind:<13} {r.stage:<14} {r.status:<11} {r.seconds:>8.1f}  {r.run}")
    return "\n".join(rows)


def _rel(target: Path, folder: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(folder).resolve())


def write_report(folder: Path, label: str, records: Sequence[StepRecord], total: float,
                 checks: Sequence = ()) -> Path:
    """``summary.json`` and ``index.html`` in ``folder``: one row per step (status, time, run folder),
    then per trained run its metrics.json scalars and its figures. Links are relative to the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(
        {"pipeline": label, "seconds": total, "steps": [r._asdict() for r in records],
         "checks": [c._asdict() for c in checks]}, indent=2, default=str) + "\n")
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(label)} pipeline</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:480px;margin:4px}</style>"
             f"</head><body><h1>Pipeline {e(label)}</h1><p>{len(records)} steps in {total:.0f} s. "
             f"<a href='summary.json'>summary.json</a></p>",
             "<table><tr><th>#</th><th>step</th><th>stage</th><th>status</th><th>seconds</th><th>run</th></tr>"]
    for r in records:
        link = f"<a href='{e(_rel(Path(r.run) / 'config.yaml', folder))}'>{e(r.run)}</a>" if r.run else ""
        parts.append(f"<tr><td>{r.index}</td><td>{e(r.kind)}</td><td>{e(r.stage)}</td><td>{e(r.status)}</td>"
                     f"<td>{r.seconds:.1f}</td><td>{link}</td></tr>")
    parts.append("</table>")
    if checks:
        parts.append("<h2>Checks</h2><table><tr><th>check</th><th>wanted</th><th>got</th><th>result</th></tr>")
        parts += [f"<tr><td>{e(c.name)}</td><td>{e(c.wanted)}</td><td>{e(c.got)}</td>"
                  f"<td>{'ok' if c.ok else '<b>MISSED</b>'}</td></tr>" for c in checks]
        parts.append("</table>")
    seen = set()
    for r in records:
        if r.kind != "train" or r.run in seen:
            continue
        seen.add(r.run)
        run = Path(r.run)
        parts.append(f"<h2>{e(r.stage)}: {e(run.name)}</h2>")
        metrics = run / "metrics.json"
        if metrics.is_file():
            data = json.loads(metrics.read_text())
            scalars = {k: v for k, v in data.get("scalars", {}).items() if isinstance(v, (int, float))}
            parts.append(f"<p><a href='{e(_rel(metrics, folder))}'>metrics.json</a> (step {data.get('step')})</p>")
            if scalars:
                parts.append("<table><tr><th>metric</th><th>value</th></tr>" + "".join(
                    f"<tr><td>{e(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(scalars.items())[:40]) + "</table>")
        figures = sorted((run / "figures").glob("*.png")) if (run / "figures").is_dir() else []
        for fig in figures:
            parts.append(f"<a href='{e(_rel(fig, folder))}'><img src='{e(_rel(fig, folder))}' alt='{e(fig.name)}'></a>")
    for r in records:
        for out in r.outputs:
            if out.endswith(".png") and Path(out).is_file() and not str(out).startswith(str(Path(r.run) / "figures")):
                parts.append(f"<p>{e(r.kind)}: <img src='{e(_rel(Path(out), folder))}' alt='{e(Path(out).name)}'></p>")
    parts.append("</body></html>")
    index = folder / "index.html"
    index.write_text("\n".join(parts) + "\n")
    return index

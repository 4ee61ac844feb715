"""Named multi-stage pipelines (experiments/pipelines/<name>.yaml).

Steps run in order and hand over through run folders only. A finished training step is skipped on a
re-run; an interrupted one resumes from its last checkpoint. A step whose stage is not built yet stops
the pipeline with a message saying so (never a stand-in result).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from evotok.config import REPO_ROOT, ConfigError, load_config

PIPELINE_DIR = REPO_ROOT / "experiments" / "pipelines"
PIPELINES = tuple(sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml")))
STEP_KINDS = ("data_preview", "train", "eval_recon", "figures", "record")


def load_pipeline(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = PIPELINE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown pipeline '{name}'; pipelines: {', '.join(PIPELINES)}")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    for i, step in enumerate(spec.get("steps", [])):  # type: ignore[union-attr]
        if step.get("do") not in STEP_KINDS:
            raise ConfigError(f"{path}: step {i + 1} has do={step.get('do')!r}; one of {', '.join(STEP_KINDS)}")
    return spec  # type: ignore[return-value]


def run_pipeline(name: str, overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Run every step of pipeline ``name``; return the run folder of each trained stage."""
    from evotok.lit.train import train
    from evotok.runs import RunDir, run_path

    spec = load_pipeline(name)
    run_name = spec.get("run_name", name)
    runs: dict[str, Path] = {}
    base = list(overrides)
    t0 = time.time()
    for i, step in enumerate(spec["steps"]):
        kind = step["do"]
        print(f"\n=== [{name} {i + 1}/{len(spec['steps'])}] {kind} {step.get('stage', '')} ({time.time() - t0:.0f}s) ===")
        if kind == "data_preview":
            from evotok.data.preview import write_preview

            cfg = load_config(step.get("config"), base)
            out = Path(cfg.run.dir) / "data" / f"evoshapes_preview_{cfg.data.resolution}px.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_preview(cfg, out)
            print(f"sample grid: {out.resolve()}")
        elif kind == "train":
            stage = step["stage"]
            extra = [f"run.name={run_name}", *step.get("overrides", [])]
            if step.get("teacher_from"):
                extra.append(f"teacher.run={runs[step['teacher_from']]}")
            cfg = load_config(step.get("config"), [*extra, *base])
            path = run_path(cfg, stage)
            if RunDir(path).finished:
                print(f"{stage}: finished run found at {path}; skipping (delete it or pass run.overwrite=true)")
            else:
                train(cfg, stage, argv=["evotok", "pipeline", name, *base])
            runs[stage] = path
        elif kind == "eval_recon":
            from evotok.eval.recon import evaluate_recon

            evaluate_recon(runs[step["stage"]], split=step.get("split", "val"))
        elif kind == "figures":
            from analysis.make_figures import make_figures

            run = runs[step["stage"]]
            n_images = min(step.get("n_images", 512), RunDir(run).load_config().data.val_size)
            index = make_figures([run], run / "figures", n_images=n_images)
            print(f"figures: {Path(index).resolve()}")
            from evotok.eval.grid import save_recon_grid

            print(f"reconstruction grid: {save_recon_grid(run, run / 'figures' / 'recon_grid.png').resolve()}")
        elif kind == "record":  # README numbers: results/<name>.json from a run folder (evotok.readme)
            from evotok.readme import record

            run = runs[step["stage"]]
            out = record(step["name"], run, curve_tag=step.get("curve"))
            if step.get("nmi_name"):
                import shutil

                shutil.copy(run / "figures" / "nmi.json", out.parent / f"{step['nmi_name']}.json")
            print(f"recorded: {out}")
    print(f"\n{name} pipeline done in {time.time() - t0:.0f}s; run folders:")
    for stage, path in runs.items():
        print(f"  {stage}: {path.resolve()}")
    return runs

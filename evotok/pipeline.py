"""Named multi-stage pipelines (experiments/pipelines/<name>.yaml).

Steps run in order and hand over through run folders only: a training step's upstream keys (the stage
registry's hand-over keys, e.g. ``teacher.run`` for the tokenizer) are set to the run folders of the stages
the pipeline trained before it, unless the step sets them itself. Global ``key=value`` overrides apply to the
steps whose stage reads the key (an override no step reads is an error). A finished training step is skipped
on a re-run; an interrupted one resumes from its last checkpoint. A step whose stage is not built yet stops
the pipeline with a message saying so (never a stand-in result).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from evotok.config import ConfigError, experiment_dirs, load_config, override_key, stage_reads

PIPELINE_DIRS = experiment_dirs("pipelines")
PIPELINES = tuple(sorted({p.stem for d in PIPELINE_DIRS for p in d.glob("*.yaml")}))
STEP_KINDS = ("data_preview", "train", "eval_recon", "eval_vqa", "eval_geneval", "figures", "record")


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


def run_pipeline(name: str, overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Run every step of pipeline ``name``; return the run folder of each trained stage."""
    from evotok.lit.train import train
    from evotok.runs import RunDir, run_path

    spec = load_pipeline(name)
    run_name = spec.get("run_name", name)
    runs: dict[str, Path] = {}
    base = list(overrides)
    stages = {step["stage"] for step in spec["steps"] if step["do"] == "train"}
    for o in base:
        if not any(stage_reads(st, override_key(o)) for st in stages):
            raise ConfigError(f"override '{o}' is read by no stage of pipeline '{name}' (stages: {', '.join(sorted(stages))})")
    t0 = time.time()
    for i, step in enumerate(spec["steps"]):
        kind = step["do"]
        print(f"\n=== [{name} {i + 1}/{len(spec['steps'])}] {kind} {step.get('stage', '')} ({time.time() - t0:.0f}s) ===")
        if kind == "data_preview":
            from evotok.data.preview import write_preview

            from evotok.stages import COMMON

            cfg = load_config(step.get("config"), [o for o in base if override_key(o).split(".")[0] in COMMON])
            out = Path(cfg.run.dir) / "data" / f"evoshapes_preview_{cfg.data.resolution}px.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_preview(cfg, out)
            print(f"sample grid: {out.resolve()}")
        elif kind == "train":
            stage = step["stage"]
            own = list(step.get("overrides", []))
            extra = [f"run.name={step.get('name', run_name)}", *own, *handover_overrides(stage, runs, own)]
            cfg = load_config(step.get("config"), [*extra, *overrides_for(stage, base)], stage=stage)
            path = run_path(cfg, stage)
            if RunDir(path).finished:
                print(f"{stage}: finished run found at {path}; skipping (delete it or pass run.overwrite=true)")
            else:
                train(cfg, stage, argv=["evotok", "pipeline", name, *base])
            runs[stage] = path
        elif kind == "eval_recon":
            from evotok.eval.recon import evaluate_recon

            evaluate_recon(runs[step["stage"]], split=step.get("split", "val"))
        elif kind == "eval_vqa":
            from evotok.eval import understand

            if step.get("depths"):
                understand.depth_curve(runs[step["stage"]], step["depths"], probe_steps=step.get("probe_steps", 100),
                                       max_images=step.get("max_images", 128))
            else:
                understand.evaluate_vqa(runs[step["stage"]], split=step.get("split", "test"),
                                        max_images=step.get("max_images", 0))
        elif kind == "eval_geneval":
            from evotok.eval.geneval import evaluate_geneval

            evaluate_geneval(runs[step["stage"]], str(runs.get("checker", "")), n_per_tag=step.get("prompts", 16),
                             n_samples=step.get("samples", 4))
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

"""Sweeps: a grid of config overrides x seeds, each point a pipeline (evotok/pipeline.py).

A sweep spec (experiments/sweeps/<name>.yaml)::

    name: lpix_lsem                 # folder and run-name prefix
    pipeline: sweep_tiny            # the pipeline each point runs (a name or a spec path)
    points:                         # explicit points ...
      - {model.lpix: 4, model.lsem: 4}
    axes: {model.lpix: [4, 16]}     # ... or the product of axes (either or both: points x axes)
    seeds: [0, 1, 2]                # run.seed of the seeded stages
    seeded_stages: [tokenizer]      # stages trained once per seed (their dependents follow)
    first_seed_only: [understanding, generation]   # stages trained for the first seed only
    overrides: [trainer.max_steps=100]             # applied to every point (then the command line's)
    slurm: {partition: gpu, gpus_per_node: 8, nodes: 1, time_min: 1440, cpus_per_task: 8}

Run names derive from the overrides: a stage that reads a point's keys, is seeded, or reads a run that is
point-specific is trained per point as ``<name>_<point>`` (``lpix4_lsem16_s1``); any other stage (the
teacher, the stand-in LM) is shared by the whole sweep as ``<name>_shared`` -- trained once, then found up
to date by its identity. Each point's concrete pipeline is written to ``<run.dir>/sweeps/<name>/points/``.

Executors: ``local`` runs the points one after another here; ``print`` prints one command line per
(stage, point) job, level by level (a level's jobs only read runs of earlier levels), for any scheduler;
``slurm`` submits the same jobs through submitit, one job array per level, each level depending on the
previous one (``afterok``) on SLURM, or waiting for it on submitit's ``local`` / ``debug`` backends; it
also writes plain ``sbatch`` scripts (``<sweep folder>/slurm/``). Multi-GPU jobs run Lightning's own SLURM
environment (``srun`` starts one task per GPU). ``--collect`` aggregates whatever has finished
(:func:`collect`).
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from evotok.config import ConfigError, experiment_dirs, load_config, override_key, stage_reads

SWEEP_KEYS = ("name", "pipeline", "points", "axes", "seeds", "seeded_stages", "first_seed_only", "overrides", "slurm")
EXECUTORS = ("local", "print", "slurm")


class SweepPoint(NamedTuple):
    name: str  # lpix4_lsem16_s1
    values: dict  # the point's config values (without the seed)
    seed: int
    spec: dict  # the concrete pipeline spec of this point
    spec_path: Path  # where it is written
    levels: dict  # stage -> level (0 = reads no stage of the pipeline)
    shared: tuple  # stages of this point that are shared by the sweep


def sweep_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in experiment_dirs("sweeps"):
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    known = sorted({q.stem for d in experiment_dirs("sweeps") for q in d.glob("*.yaml")})
    raise ConfigError(f"unknown sweep '{name}'; sweeps: {', '.join(known) or 'none'}")


def load_sweep(name: str) -> dict:
    from omegaconf import OmegaConf

    path = sweep_path(name)
    spec = OmegaConf.to_container(OmegaConf.load(path)) or {}
    bad = [k for k in spec if k not in SWEEP_KEYS]
    if bad:
        raise ConfigError(f"{path}: unknown sweep keys {bad}; keys: {', '.join(SWEEP_KEYS)}")
    if not spec.get("pipeline"):
        raise ConfigError(f"{path}: 'pipeline' (the pipeline each point runs) is required")
    spec.setdefault("name", path.stem)
    spec["_path"] = str(path)
    return spec  # type: ignore[return-value]


def _token(key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    return f"{leaf}{value}".replace("/", "-").replace(" ", "")


def point_values(spec: dict) -> list[dict]:
    """The grid: explicit points x the product of the axes (either may be absent)."""
    points = [dict(p) for p in spec.get("points") or [{}]]
    axes = spec.get("axes") or {}
    combos = [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())] if axes else [{}]
    return [{**p, **c} for p in points for c in combos]


def expand(name: str, overrides: Sequence[str] = ()) -> list[SweepPoint]:
    """Every point of sweep ``name`` with its concrete pipeline spec (written to the sweep folder)."""
    from evotok.pipeline import load_pipeline, stage_upstreams

    spec = load_sweep(name)
    base = load_pipeline(spec["pipeline"])
    seeds = list(spec.get("seeds") or [0])
    seeded, first_only = set(spec.get("seeded_stages") or []), set(spec.get("first_seed_only") or [])
    run_dir = load_config(None, [o for o in [*spec.get("overrides", []), *overrides] if override_key(o).startswith("run.")]).run.dir
    folder = Path(run_dir) / "sweeps" / spec["name"] / "points"
    out = []
    for values in point_values(spec):
        for seed in seeds:
            pname = "_".join([_token(k, v) for k, v in values.items()] + [f"s{seed}"])
            specific, levels, shared, steps = set(), {}, [], []
            for step in base["steps"]:
                step = dict(step)
                stage = step.get("stage")
                if step["do"] == "train":
                    if stage in first_only and seed != seeds[0]:
                        continue
                    reads = {k: v for k, v in values.items() if stage_reads(stage, k)}
                    ups = sorted(stage_upstreams(base["steps"], stage))
                    levels[stage] = 1 + max([levels[u] for u in ups if u in levels], default=-1)
                    suffix = f"_{step['name']}" if step.get("name") else ""  # e.g. the phases of one stage
                    if reads or stage in seeded or any(u in specific for u in ups):
                        specific.add(stage)
                        own = [f"{k}={v}" for k, v in reads.items()] + ([f"run.seed={seed}"] if stage in seeded else [])
                        step["name"] = f"{spec['name']}_{pname}{suffix}"
                    else:
                        own = []
                        step["name"] = f"{spec['name']}_shared{suffix}"
                        shared.append(stage)
                    step["overrides"] = [*step.get("overrides", []), *own]
                elif stage not in levels:
                    continue
                steps.append(step)
            pspec = {"run_name": f"{spec['name']}_{pname}", "steps": steps}
            out.append(SweepPoint(pname, values, seed, pspec, folder / f"{pname}.yaml", levels, tuple(shared)))
    return out


def write_specs(points: Sequence[SweepPoint]) -> None:
    import yaml

    for p in points:
        p.spec_path.parent.mkdir(parents=True, exist_ok=True)
        p.spec_path.write_text(yaml.safe_dump(p.spec, sort_keys=False))


def _global(spec: dict, overrides: Sequence[str]) -> list[str]:
    return [*spec.get("overrides", []), *overrides]


def jobs(points: Sequence[SweepPoint]) -> list[list[tuple[str, SweepPoint]]]:
    """(stage, point) jobs by level; a shared stage appears once (with the first point that has it)."""
    by_level: dict[int, list[tuple[str, SweepPoint]]] = {}
    seen = set()
    for p in points:
        for stage, level in p.levels.items():
            key = (stage, "shared") if stage in p.shared else (stage, p.name)
            if key in seen:
                continue
            seen.add(key)
            by_level.setdefault(level, []).append((stage, p))
    return [by_level[k] for k in sorted(by_level)]


def job_command(stage: str, point: SweepPoint, overrides: Sequence[str]) -> list[str]:
    return ["evotok", "pipeline", "--spec", str(point.spec_path), "--only", stage, *overrides]


def run_sweep(name: str, executor: str = "local", overrides: Sequence[str] = (), cluster: Optional[str] = None) -> list:
    """Run (``local``), print (``print``) or submit (``slurm``) every point of sweep ``name``."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: one of {', '.join(EXECUTORS)}")
    spec = load_sweep(name)
    points = expand(name, overrides)
    write_specs(points)
    print(f"sweep {spec['name']}: {len(points)} point(s) x stages -> specs in {points[0].spec_path.parent}")
    glob = _global(spec, overrides)
    if executor == "local":
        from evotok.pipeline import run_pipeline

        for i, p in enumerate(points):
            print(f"\n##### sweep {spec['name']}: point {i + 1}/{len(points)} {p.name}")
            run_pipeline(str(p.spec_path), glob)
        print(collect_table(name, overrides))
        return points
    levels = jobs(points)
    if executor == "print":
        lines = []
        for k, level in enumerate(levels):
            lines.append(f"# level {k}: {len(level)} job(s){' (after level ' + str(k - 1) + ')' if k else ''}")
            lines += [shlex.join(job_command(stage, p, glob)) for stage, p in level]
        print("\n".join(lines))
        return lines
    return submit_slurm(spec, levels, glob, cluster)


def sbatch_script(spec: dict, level: int, commands: Sequence[Sequence[str]]) -> str:
    """A plain sbatch array script for one level: task i runs command i under ``srun`` (Lightning reads the
    SLURM environment: one task per GPU; requeue on its signal)."""
    s = spec.get("slurm") or {}
    gpus = int(s.get("gpus_per_node", 0))
    lines = ["#!/bin/bash", f"#SBATCH --job-name={spec['name']}_l{level}", f"#SBATCH --array=0-{len(commands) - 1}",
             f"#SBATCH --nodes={int(s.get('nodes', 1))}", f"#SBATCH --ntasks-per-node={max(1, gpus)}",
             f"#SBATCH --time={int(s.get('time_min', 60))}", f"#SBATCH --cpus-per-task={int(s.get('cpus_per_task', 2))}",
             "#SBATCH --signal=SIGUSR1@90  # Lightning's SLURM plugin checkpoints and requeues on it",
             "#SBATCH --requeue"]
    if s.get("partition"):
        lines.append(f"#SBATCH --partition={s['partition']}")
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    lines += ["set -euo pipefail", 'case "$SLURM_ARRAY_TASK_ID" in']
    lines += [f"  {i}) srun {shlex.join(list(cmd))} ;;" for i, cmd in enumerate(commands)]
    lines += ['  *) echo "no job $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
    return "\n".join(lines)


def submit_slurm(spec: dict, levels, glob: Sequence[str], cluster: Optional[str] = None) -> list:
    """One submitit job array per level; returns the jobs. ``cluster``: None = auto (SLURM when present),
    ``local`` / ``debug`` = submitit's stand-ins (each level waits for the previous one)."""
    try:
        import submitit
    except ImportError:  # pragma: no cover - a dependency of the suite
        raise ConfigError("--executor slurm needs the 'submitit' package: pip install -c constraints.txt submitit") from None
    folder = Path(sorted({p.spec_path.parent.parent for level in levels for _, p in level})[0])
    (folder / "slurm").mkdir(parents=True, exist_ok=True)
    s = spec.get("slurm") or {}
    executor = submitit.AutoExecutor(folder=str(folder / "submitit" / "%j"), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": int(s.get("time_min", 60)), "nodes": int(s.get("nodes", 1)),
                              "cpus_per_task": int(s.get("cpus_per_task", 2)), "name": spec["name"]}
    if executor.cluster == "slurm":
        gpus = int(s.get("gpus_per_node", 0))
        params.update(slurm_partition=s.get("partition"), gpus_per_node=gpus or None,
                      tasks_per_node=max(1, gpus), slurm_signal_delay_s=90)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    all_jobs, previous = [], []
    for k, level in enumerate(levels):
        commands = [job_command(stage, p, glob) for stage, p in level]
        (folder / "slurm" / f"level{k}.sbatch").write_text(sbatch_script(spec, k, commands))
        if previous and executor.cluster == "slurm":
            executor.update_parameters(slurm_additional_parameters={"dependency": "afterok:" + ":".join(j.job_id for j in previous)})
        fns = [submitit.helpers.CommandFunction([sys.executable, "-m", "evotok.cli", *cmd[1:]]) for cmd in commands]
        with executor.batch():
            level_jobs = [executor.submit(fn) for fn in fns]
        print(f"level {k}: submitted {len(level_jobs)} job(s): {', '.join(j.job_id for j in level_jobs)}")
        if executor.cluster != "slurm":
            for j in level_jobs:
                j.result()  # raises with the job's stderr on failure
        all_jobs += level_jobs
        previous = level_jobs
    return all_jobs


# ------------------------------------------------------------------------------------------ collect

METRICS = (  # column, stage, how to read it from metrics.json
    ("PSNR@Lpix", "tokenizer", ("per_depth", "psnr", "lpix")),
    ("rFID@Lpix", "tokenizer", ("per_depth", "rfid", "lpix")),
    ("CLIPSIM_sem@Lsem", "tokenizer", ("per_depth", "clipsim_sem", "lsem")),
    ("VQA", "understanding", ("scalars", "vqa/overall", None)),
    ("GenEval", "generation", ("scalars", "geneval/overall", None)),
)


def _read_metric(run: Path, how: tuple) -> Optional[float]:
    from evotok.runs import RunDir

    f = run / "metrics.json"
    if not f.is_file() or not RunDir(run).finished:
        return None
    data = json.loads(f.read_text())
    kind, key, depth = how
    if kind == "scalars":
        v = data.get("scalars", {}).get(key)
    else:
        vals = data.get("per_depth", {}).get(key) or []
        cfg = RunDir(run).load_config()
        idx = (cfg.model.lpix if depth == "lpix" else cfg.model.lsem) - 1
        v = vals[idx] if idx < len(vals) else None
    return None if v is None else float(v)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t interval (0 for one value): :func:`analysis.fig6.mean_ci95`."""
    from analysis.fig6 import mean_ci95 as ci

    return ci(values)


def _stage_path(spec: dict, point: SweepPoint, stage: str, overrides: Sequence[str]) -> Optional[Path]:
    """The run folder of ``stage``'s last training step in ``point`` (e.g. phase 2, which holds its metrics)."""
    from evotok.runs import run_path

    step = next((s for s in reversed(point.spec["steps"]) if s["do"] == "train" and s["stage"] == stage), None)
    if step is None:
        return None
    cfg = load_config(step.get("config"), [f"run.name={step['name']}", *step.get("overrides", []),
                                           *[o for o in _global(spec, overrides) if stage_reads(stage, override_key(o))]],
                      stage=stage)
    return Path(run_path(cfg, stage))


def collect(name: str, overrides: Sequence[str] = ()) -> list[dict]:
    """One row per grid point: each metric's mean and 95% interval over the seeds that finished, with how
    many of the seeds did (unfinished ones are counted, never guessed), the point run each value came from
    (``runs``, parallel to ``values``) and the run folders it read."""
    spec = load_sweep(name)
    points = expand(name, overrides)
    rows: dict[str, dict] = {}
    for p in points:
        key = ", ".join(f"{k}={v}" for k, v in p.values.items()) or "(base)"
        row = rows.setdefault(key, {"point": key, "values": p.values, "metrics": {}, "runs": {}})
        paths: dict[str, Optional[Path]] = {}
        for col, stage, how in METRICS:
            if stage not in paths:
                paths[stage] = _stage_path(spec, p, stage, overrides)
            if paths[stage] is None:
                continue
            v = _read_metric(paths[stage], how)  # type: ignore[arg-type]
            cell = row["metrics"].setdefault(col, {"values": [], "runs": [], "expected": 0})
            cell["expected"] += 1
            if v is not None:
                cell["values"].append(v)
                cell["runs"].append(p.name)
        row["runs"][p.name] = {st: str(path) for st, path in paths.items() if path is not None}
        row["runs"][p.name]["pipeline"] = p.spec["run_name"]
    for row in rows.values():
        for cell in row["metrics"].values():
            if cell["values"]:
                cell["mean"], cell["ci95"] = mean_ci95(cell["values"])
    return list(rows.values())


def format_cell(cell: Optional[dict]) -> str:
    if cell is None:
        return ""
    if not cell["values"]:
        return f"unfinished (0/{cell['expected']})"
    n, e = len(cell["values"]), cell["expected"]
    if n == 1:  # one seed has no spread to show: an interval "± 0" would read as certainty
        return f"{cell['mean']:.4g} ({n}/{e}, one seed)"
    return f"{cell['mean']:.4g} ± {cell['ci95']:.2g} ({n}/{e})"


def _columns(rows: Sequence[dict]) -> list[str]:
    return [c for c, _, _ in METRICS if any(c in r["metrics"] for r in rows)]


def table_markdown(rows: Sequence[dict]) -> str:
    """The ablation table (markdown): mean +- 95% interval (n finished / n expected)."""
    cols = _columns(rows)
    out = ["| point | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        out.append(f"| {r['point']} | " + " | ".join(format_cell(r["metrics"].get(c)) for c in cols) + " |")
    return "\n".join(out)


def collect_table(name: str, overrides: Sequence[str] = ()) -> str:
    """The ablation table of sweep ``name`` (markdown), of whatever has finished."""
    return table_markdown(collect(name, overrides))


def sweep_folder(name: str, overrides: Sequence[str] = ()) -> Path:
    spec = load_sweep(name)
    run_dir = load_config(None, [o for o in [*spec.get("overrides", []), *overrides] if override_key(o).startswith("run.")]).run.dir
    return Path(run_dir) / "sweeps" / spec["name"]


def save_depth_curves(curves: Sequence[dict], name: str, folder: Path, stem: str) -> Path:
    """The per-depth curves of a sweep's tokenizer runs overlaid (mean and min-max band over seeds), as
    ``<folder>/<stem>.png``."""
    from analysis.depth_curves import plot_depth_curves
    from analysis.plotting import save_figure

    fig = plot_depth_curves(curves, title=f"sweep {name}: per-depth metrics, mean and min-max over seeds")
    return save_figure(fig, folder, stem, formats=("png",))[0]


def write_sweep_report(name: str, overrides: Sequence[str] = ()) -> Path:
    """``--collect``'s report in ``<run.dir>/sweeps/<name>/``: ``results.json`` (the rows of :func:`collect`
    with each finished tokenizer run's per-depth ``curves``), ``ablation.md``, ``depth_curves.png`` (those
    curves overlaid, mean and min-max band over seeds) and ``index.html`` linking them and each point's
    pipeline report and run folders. Returns the index."""
    import html
    import os

    from evotok.runs import RunDir

    rows = collect(name, overrides)
    folder = sweep_folder(name, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    table = table_markdown(rows)
    (folder / "ablation.md").write_text(table + "\n")
    curves = []
    for r in rows:
        for pname, paths in r["runs"].items():
            tok = Path(paths.get("tokenizer", ""))
            if paths.get("tokenizer") and RunDir(tok).finished and (tok / "metrics.json").is_file():
                cfg = RunDir(tok).load_config()
                curve = {"per_depth": json.loads((tok / "metrics.json").read_text()).get("per_depth", {}),
                         "lpix": int(cfg.model.lpix), "lsem": int(cfg.model.lsem)}
                r.setdefault("curves", {})[pname] = curve  # kept in results.json: a record can redraw the figure
                curves.append(curve)
    probe_files = [Path(p["tokenizer"]) / "figures" / "probes.json" for r in rows for p in r["runs"].values()
                   if p.get("tokenizer") and RunDir(Path(p["tokenizer"])).finished]
    probe_files = [p for p in probe_files if p.is_file()]
    fig6 = None
    if probe_files:
        from analysis.fig6 import load_runs, plot_seed_curves, verdict, verdict_table
        from analysis.plotting import save_figure

        entries = load_runs(probe_files)
        result = verdict(entries)
        (folder / "fig6.json").write_text(json.dumps(result, indent=1) + "\n")
        fig6 = verdict_table(result)
        (folder / "fig6.md").write_text(fig6 + "\n")
        save_figure(plot_seed_curves(entries, title=f"sweep {name}: linear probes per depth, mean and 95% interval "
                                                    "over seeds"), folder, "fig6_probes", formats=("png",))
        save_figure(plot_seed_curves(entries, title=f"sweep {name}: NMI of K-means clusters per depth, mean and 95% "
                                                    "interval over seeds", metric="nmi"), folder, "fig6_nmi",
                    formats=("png",))
    figure = None
    if curves:
        save_depth_curves(curves, name, folder, "depth_curves")
        figure = "depth_curves.png"
    (folder / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    e = html.escape
    cols = _columns(rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {e(name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:900px}</style></head><body>",
             f"<h1>Sweep {e(name)}</h1><p>Mean ± 95% interval over the seeds that finished (finished / expected). "
             "<a href='results.json'>results.json</a> <a href='ablation.md'>ablation.md</a></p>",
             "<table><tr><th>point</th>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"]
    parts += ["<tr><td>" + e(r["point"]) + "</td>" + "".join(f"<td>{e(format_cell(r['metrics'].get(c)))}</td>" for c in cols)
              + "</tr>" for r in rows]
    parts.append("</table>")
    if figure:
        parts.append(f"<h2>Per-depth curves</h2><img src='{figure}' alt='per-depth curves'>")
    if fig6:
        parts.append("<h2>Does the trajectory evolve? (Fig. 6 claims, analysis/fig6.py)</h2>"
                     "<p><a href='fig6.json'>fig6.json</a> <a href='fig6.md'>fig6.md</a></p>"
                     "<img src='fig6_probes.png' alt='probes per depth over seeds'>"
                     "<img src='fig6_nmi.png' alt='NMI per depth over seeds'>")
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>pipeline report</th><th>run folders</th></tr>")
    for r in rows:
        for pname, paths in r["runs"].items():
            report = folder.parent.parent / "pipelines" / paths["pipeline"] / "index.html"
            rep = (f"<a href='{e(os.path.relpath(report, folder))}'>{e(paths['pipeline'])}</a>" if report.is_file()
                   else "not run yet")
            links = " ".join(f"<a href='{e(os.path.relpath(Path(p) / 'config.yaml', folder))}'>{e(st)}</a>"
                             if (Path(p) / "config.yaml").is_file() else f"{e(st)} (not started)"
                             for st, p in paths.items() if st != "pipeline")
            parts.append(f"<tr><td>{e(pname)}</td><td>{rep}</td><td>{links}</td></tr>")
    parts.append("</table></body></html>")
    index = folder / "index.html"
    index.write_text("\n".join(parts) + "\n")
    return index

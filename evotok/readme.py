"""README numbers come from JSON files under results/; this module renders them.

    python -m evotok.readme            # rewrite every results block in README.md
    python -m evotok.readme --check    # exit 1 if a block disagrees with results/
    python -m evotok.readme record NAME RUN_DIR   # copy a run's metrics.json into results/NAME.json
    python -m evotok.readme record-sweep NAME     # a collected sweep's table, Fig. 6 verdict and figures
    python -m evotok.readme record-sweep NAME --merge   # ... adding to an earlier recording's runs

A block in README.md looks like ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``; NAME selects a
renderer below, which reads results/<file>.json. tests/test_readme.py checks that they agree.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from evotok.config import REPO_ROOT

README = REPO_ROOT / "README.md"
RESULTS = REPO_ROOT / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w\-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def _load(name: str, results: Path) -> Optional[dict]:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(command: str) -> str:
    return f"_Not measured yet: run `{command}`._\n"


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_bench_data(results: Path) -> str:
    data = _load("bench_data", results)
    if data is None:
        return _missing("evotok bench data")
    rows = ["| resolution | images | seconds | images/s |", "|---|---|---|---|"]
    for r in data["rows"]:
        rows.append(f"| {r['resolution']} px | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:,.0f} |")
    meta = f"Measured {data.get('date', '?')} on {data.get('cpu_count', '?')} cores (`evotok bench data`)."
    return "\n".join(rows) + f"\n\n{meta}\n"


def render_bench_quantizer(results: Path) -> str:
    data = _load("bench_quantizer", results)
    if data is None:
        return _missing("evotok bench quantizer")
    rows = [
        "| N | d | L | K | method | ms | speed-up vs best gemm | GFLOP/s | x compute floor | peak extra MiB | codes = ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        name = f"**{r['impl']}**" if r.get("best_gemm") else r["impl"]
        rows.append(
            f"| {r['N']} | {r['d']} | {r['L']} | {r['K']} | {name} | {r['ms']:,.0f} | {r['speedup_vs_gemm']:.2f} | "
            f"{r['gflops']:.1f} | {r['floor_ratio']:.2f} | {_fmt(r.get('peak_extra_mib'), 1)} | {r['agree']:.4f} |"
        )
    training = data.get("training") or []
    training = [training] if isinstance(training, dict) else training
    machine = data.get("machine", {})
    text = "\n".join(rows) + (
        f"\n\nSquare fp32 GEMM rate measured in the same run: {data['gemm_rate_gflops']:.0f} GFLOP/s "
        f"({machine.get('threads', '?')} threads, C++ kernel built for {machine.get('cpp_simd', '?')}); "
        "the compute floor is 2·N·K·d·L flops at that rate; **bold** = the best gemm chunk size (the baseline).\n"
    )
    for t in training:
        text += (
            f"\nTraining-mode `ResidualQuantizer` forward (EMA + restarts, N={t['N']}, d={t['d']}, L={t['L']}, "
            f"K={t['K']}): {t['train_forward_ms']:,.0f} ms = {t['ratio_train_vs_assign']:.2f}x the eval-mode "
            f"assignment ({t['eval_assign_ms']:,.0f} ms); target {t['target_ratio']}x.\n"
        )
    return text


def render_teacher(results: Path) -> str:
    data = _load("teacher_tiny", results)
    if data is None:
        return _missing("evotok train teacher --config teacher/tiny && python -m evotok.readme record teacher_tiny RUN")
    s = data["scalars"]
    keys = [k for k in ("zeroshot_shape", "zeroshot_count", "chance_shape", "chance_count", "train_minutes") if k in s]
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(s[k], 3)} |" for k in keys]
    return "\n".join(rows) + f"\n\nStep {data['step']}; command: `{data.get('command', '?')}`.\n"


def render_tokenizer(results: Path, name: str) -> str:
    data = _load(name, results)
    if data is None:
        return _missing(f"evotok train tokenizer ... && evotok eval recon --run RUN && python -m evotok.readme record {name} RUN")
    per = data["per_depth"]
    names = [n for n in ("psnr", "ssim", "rfid", "clipsim_pix", "clipsim_sem", "usage", "perplexity") if n in per]
    depth = len(per[names[0]]) if names else 0
    rows = ["| depth | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for l in range(depth):
        # rfid with three significant digits: the embedded rFID falls below 1e-3 from depth 3 on
        rows.append(f"| {l + 1} | " + " | ".join(
            f"{per[n][l]:.3g}" if n == "rfid" and isinstance(per[n][l], float) else _fmt(per[n][l], 3) for n in names
        ) + " |")
    extra = ""
    curve = data.get("curve")
    if curve:
        extra = "\n\nValidation PSNR at Lpix during training (step, minutes since the first logged step): " + ", ".join(
            f"{c['step']} ({c['minutes']:.1f} min): {c['psnr']:.2f} dB" for c in curve
        ) + "."
    return "\n".join(rows) + extra + f"\n\nStep {data['step']}; command: `{data.get('command', '?')}`.\n"


def render_nmi(results: Path) -> str:
    data = _load("nmi_evotok_tiny", results)
    if data is None:
        return _missing("evotok figures --run RUN --out DIR && python -m evotok.readme record-nmi DIR")
    if "nmi" not in data:  # a figures folder's nmi.json: {run name: {lpix, lsem, ..., nmi}}
        data = next(iter(data.values()))
    nmi = data["nmi"]
    factors = list(nmi)
    depth = len(nmi[factors[0]])
    rows = ["| depth | " + " | ".join(factors) + " |", "|---|" + "---|" * len(factors)]
    for l in range(depth):
        rows.append(f"| {l + 1} | " + " | ".join(f"{nmi[f][l]:.3f}" for f in factors) + " |")
    return "\n".join(rows) + "\n"


def _command(data: dict) -> str:
    return f"Step {data.get('step', '?')}; command: `{data.get('command', '?')}`.\n"


def render_lm(results: Path) -> str:
    data = _load("lm_tiny", results)
    if data is None:
        return _missing("evotok pipeline mllm_tiny")
    s = data["scalars"]
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(s[k], 3)} |" for k in ("val/loss", "val/perplexity") if k in s]
    return "\n".join(rows) + "\n\n" + _command(data)


VQA_COLUMNS = ("shape", "count", "color", "texture", "background", "overall")


def render_understanding(results: Path) -> str:
    """The phase-2 model beside its blind baseline, then the feature-source table from the per-depth probes."""
    data = _load("understanding_tiny", results)
    if data is None:
        return _missing("evotok pipeline mllm_tiny")
    s, per = data["scalars"], data.get("per_depth", {})
    head = "| features | " + " | ".join(VQA_COLUMNS) + " |"
    rows = [head, "|---|" + "---|" * len(VQA_COLUMNS)]
    if "vqa/overall" in s:
        rows.append("| phase 2 model (semantic output at Lsem) | " + " | ".join(_fmt(s.get(f"vqa/{t}"), 3) for t in VQA_COLUMNS) + " |")
        rows.append("| blind baseline (another image's features) | " + " | ".join(_fmt(s.get(f"blind/{t}"), 3) for t in VQA_COLUMNS) + " |")
    info = data.get("vqa_depth_eval") or {}
    lpix, lsem = info.get("lpix"), info.get("lsem")
    probes = [("semantic output at Lsem", "vqa_", lsem), ("raw z at Lpix", "vqa_latent_", lpix), ("raw z_1", "vqa_latent_", 1)]
    for label, prefix, depth in probes:
        vals = per.get(prefix + "overall")
        if vals and depth and depth <= len(vals) and vals[depth - 1] is not None:
            rows.append(f"| probe: {label} (depth {depth}) | " + " | ".join(_fmt(per[prefix + t][depth - 1], 3) for t in VQA_COLUMNS) + " |")
    text = "\n".join(rows) + "\n"
    if info:
        text += (f"\nProbes: {info.get('protocol', '')}, {info.get('probe_steps')} steps each, "
                 f"{info.get('test_images')} test images.\n")
    return text + "\n" + _command(data)


def render_checker(results: Path) -> str:
    data = _load("checker_tiny", results)
    if data is None:
        return _missing("evotok pipeline mllm_tiny")
    s = data["scalars"]
    factors = ("shape", "count", "color", "texture", "background")
    rows = ["| split | " + " | ".join(factors) + " |", "|---|" + "---|" * len(factors)]
    rows.append("| test | " + " | ".join(_fmt(s.get(f"acc/{f}"), 3) for f in factors) + " |")
    rows.append("| held-out pairs | " + " | ".join(_fmt(s.get(f"heldout_acc/{f}"), 3) for f in factors) + " |")
    return "\n".join(rows) + "\n\n" + _command(data)


def render_generation(results: Path) -> str:
    data = _load("generation_tiny", results)
    if data is None:
        return _missing("evotok pipeline mllm_tiny")
    s = data["scalars"]
    tags = [k.split("/", 1)[1] for k in s if k.startswith("geneval/")]
    rows = ["| tag | score | ceiling | example prompt |", "|---|---|---|---|"]
    examples = (data.get("geneval") or {}).get("examples", {})
    for t in tags:
        rows.append(f"| {t} | {_fmt(s[f'geneval/{t}'], 3)} | {_fmt(s.get(f'geneval_ceiling/{t}'), 3)} | "
                    f"{examples.get(t, '')} |")
    extra = ""
    if "gen_fd" in s:
        extra = (f"\nFréchet distance to real test images (teacher features): {s['gen_fd']:.3g}"
                 + (f" (ceiling: {s['gen_fd_ceiling']:.3g})" if "gen_fd_ceiling" in s else "") + ".\n")
    info = data.get("geneval") or {}
    if "prompts_per_tag" in info:
        extra += (f"\n{info['prompts_per_tag']} prompts per tag x {info['samples_per_prompt']} samples; CFG "
                  f"{info.get('cfg_scale')}, top-k {info.get('top_k')}, top-p {info.get('top_p')}, temperature "
                  f"{info.get('temperature')}, seed {info.get('seed')}. Ceiling: the same prompts scored on the "
                  f"tokenizer's Lpix reconstructions of matching real images.\n")
    read = [(k.split("/", 1)[1], v) for k, v in s.items() if k.startswith("readout/")]
    if read:
        from evotok.data.evoshapes import FACTORS

        extra += ("\nPrompt read-out by likelihood (real test images; chance in brackets): "
                  + ", ".join(f"{f} {v:.2f} ({1 / len(FACTORS[f]):.2f})" for f, v in read) + ".\n")
    ce = [f"depth {k}: {s[f'ce_depth{k}']:.3f}" for k in range(1, 17) if f"ce_depth{k}" in s]
    if ce:
        extra += f"\nValidation cross-entropy per depth: {', '.join(ce)}.\n"
    return "\n".join(rows) + "\n" + extra + "\n" + _command(data)


def render_bench_generate(results: Path) -> str:
    data = _load("bench_generate", results)
    if data is None:
        return _missing("evotok bench generate")
    step = {"lean": "lean decode step", "hf": "the LM's own forward", "-": "-"}
    rows = ["| threads | KV cache | LM step | seconds per batch | images/s |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        rows.append(f"| {r.get('threads', data['threads'])} | {'yes' if r['kv_cache'] else 'no'} | "
                    f"{step[r['decode']]} | {r['seconds']:.2f} | {r['images_per_s']:.2f} |")
    by_threads = data.get("speedup_by_threads") or {str(data["threads"]): data}
    ratios = "; ".join(f"{r['speedup']:.2f}x at {t} thread{'s' * (int(t) > 1)} ({r['speedup_hf']:.2f}x through the "
                       f"LM's own forward)" for t, r in by_threads.items())
    return "\n".join(rows) + (
        f"\n\nBatch {data['batch']}, {data['positions']} positions x {data['depths']} depths, CFG on, "
        f"{data['model']}; KV cache speed-up {ratios}; codes identical: {data['same_codes']}; measured "
        f"{data['date']}, {data['threads']} threads by default (`evotok bench generate`)."
        + (f" The depth transformer alone (its cached depth-by-depth sampling on both CFG halves, the same work "
           f"with or without the LM's cache): {data['depth_head_seconds']:.2f} s per batch"
           + (f" with its {data['depth_step']} step, {data['depth_head_seconds_torch']:.2f} s with the torch step"
              if "depth_step" in data else "") + "."
           if "depth_head_seconds" in data else "") + "\n")


# the paper's ablation (DESIGN.md §1): rFID / MME / GenEval per (Lpix, Lsem)
PAPER_ABLATION = {(4, 4): "0.66 / 1668.9 / 0.64", (16, 4): "0.44 / 1731.6 / 0.60", (4, 16): "0.55 / 1793.5 / 0.67"}


def render_sweep(results: Path, name: str) -> str:
    """The ablation table of a recorded sweep (results/sweep_NAME.json, from ``record-sweep``) beside the paper's."""
    data = _load(f"sweep_{name}", results)
    if data is None:
        return _missing(f"evotok sweep --spec {name} && evotok sweep --spec {name} --collect && "
                        f"python -m evotok.readme record-sweep {name}")
    from evotok.sweep import METRICS, format_cell

    rows = data["rows"]
    cols = [c for c, _, _ in METRICS if any(c in r["metrics"] for r in rows)]
    out = ["| Lpix, Lsem | " + " | ".join(cols) + " | paper: rFID / MME / GenEval |", "|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        key = (int(r["values"]["model.lpix"]), int(r["values"]["model.lsem"]))
        out.append(f"| {key[0]}, {key[1]} | " + " | ".join(format_cell(r["metrics"].get(c)) for c in cols)
                   + f" | {PAPER_ABLATION.get(key, '')} |")
    parts = data.get("recordings") or [{"date": data.get("date", "?"), "git_sha": data.get("git_sha", "?")}]
    if len(parts) == 1:
        when = f"recorded {parts[0]['date']} at commit {parts[0]['git_sha']}"
    else:
        when = f"recorded in {len(parts)} parts: " + "; ".join(
            f"{p['date']} at commit {p['git_sha']} ({len(p.get('runs', []))} runs)" for p in parts)
        teachers = {f for p in parts for f in p.get("upstream", {}).get("teacher.run", [])}
        if len(teachers) > 1:
            when += f"; the parts read {len(teachers)} different teacher checkpoints (each part trained the shared teacher)"
    return "\n".join(out) + f"\n\nSweep `{name}`, {when}.\n"


def render_fig6(results: Path, name: str) -> str:
    data = _load(f"fig6_{name}", results)
    if data is None:
        return _missing(f"evotok sweep --spec {name} --collect && python -m evotok.readme record-sweep {name}")
    from analysis.fig6 import verdict_table

    return verdict_table(data) + "\n"


def merge_sweep_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The rows of ``new`` plus the values of the point runs that only ``old`` has: per metric the union by
    point run (a run in both keeps its ``new`` value), in the sweep's run order, with means and intervals
    recomputed; likewise the per-run ``curves``. How a sweep too long for one sitting is recorded in parts."""
    from evotok.sweep import mean_ci95

    before = {r["point"]: r for r in old}
    rows = []
    for row in new:
        prev = before.get(row["point"], {})
        order = list(row["runs"])
        merged = {**row, "metrics": {}, "curves": {**prev.get("curves", {}), **row.get("curves", {})}}
        for col in dict.fromkeys([*prev.get("metrics", {}), *row["metrics"]]):
            by_run: dict[str, float] = {}
            for cell in (prev.get("metrics", {}).get(col), row["metrics"].get(col)):
                if not cell:
                    continue
                if cell["values"] and "runs" not in cell:
                    raise ValueError(f"metric {col!r} of point {row['point']!r} was recorded without the runs its "
                                     "values came from; re-record that sweep without --merge")
                by_run.update(zip(cell.get("runs", []), cell["values"]))
            runs = [r for r in order if r in by_run]
            cell = {"values": [by_run[r] for r in runs], "runs": runs,
                    "expected": (row["metrics"].get(col) or prev["metrics"][col])["expected"]}
            if cell["values"]:
                cell["mean"], cell["ci95"] = mean_ci95(cell["values"])
            merged["metrics"][col] = cell
        rows.append(merged)
    return rows


def _recorded_runs(rows: list[dict]) -> list[str]:
    return sorted({run for r in rows for cell in r["metrics"].values() for run in cell.get("runs", [])})


def _upstreams(rows: list[dict]) -> dict[str, list[str]]:
    """Hand-over key -> the distinct upstream fingerprints the recorded runs' stages read (provenance.json):
    whether the parts of a sweep recorded in parts share their teacher."""
    out: dict[str, set] = {}
    recorded = set(_recorded_runs(rows))
    for r in rows:
        for run, paths in r["runs"].items():
            for stage, path in paths.items():
                prov = Path(path) / "provenance.json"
                if run in recorded and stage != "pipeline" and prov.is_file():
                    for key, up in json.loads(prov.read_text()).get("upstream", {}).items():
                        out.setdefault(key, set()).add(up.get("fingerprint"))
    return {k: sorted(v) for k, v in sorted(out.items())}


def record_sweep(name: str, overrides: list[str], results: Path = RESULTS, figures: Optional[Path] = None,
                 merge: bool = False) -> list[Path]:
    """Copy a collected sweep's report (``evotok sweep --spec NAME --collect``) into results/sweep_NAME.json and
    results/fig6_NAME.json, and its figures into docs/figures/. ``merge=True`` keeps the values of runs that an
    earlier recording has and this collect lacks (:func:`merge_sweep_rows`) and redraws the depth curves from
    the merged per-run curves; the Fig. 6 files are then written only when this collect holds every run."""
    import datetime
    import subprocess

    from evotok.sweep import sweep_folder

    folder = sweep_folder(name, overrides)
    if not (folder / "results.json").is_file():
        raise FileNotFoundError(f"{folder / 'results.json'}: run `evotok sweep --spec {name} --collect` first")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    today = datetime.date.today().isoformat()
    rows = json.loads((folder / "results.json").read_text())
    this = {"date": today, "git_sha": sha or None, "runs": _recorded_runs(rows), "upstream": _upstreams(rows)}
    recordings = [this]
    out_json = results / f"sweep_{name}.json"
    if merge and out_json.is_file():
        old = json.loads(out_json.read_text())
        rows = merge_sweep_rows(old["rows"], rows)
        recordings = [*old.get("recordings", [{"date": old.get("date"), "git_sha": old.get("git_sha"),
                                               "runs": _recorded_runs(old["rows"])}]), this]
    recorded = _recorded_runs(rows)
    complete = set(this["runs"]) >= set(recorded)
    results.mkdir(exist_ok=True)
    out = [out_json]
    out_json.write_text(json.dumps({"sweep": name, "date": today, "git_sha": sha or None, "recordings": recordings,
                                    "rows": rows}, indent=1) + "\n")
    if (folder / "fig6.json").is_file():
        if complete:
            out.append(results / f"fig6_{name}.json")
            shutil.copy(folder / "fig6.json", out[-1])
        else:
            print(f"fig6_{name}.json not recorded: this collect holds {len(this['runs'])} of the "
                  f"{len(recorded)} runs recorded", file=sys.stderr)
    figures = figures or REPO_ROOT / "docs" / "figures"
    stems = ["depth_curves"] + (["fig6_probes", "fig6_nmi"] if complete else [])
    curves = {run: c for r in rows for run, c in r.get("curves", {}).items()}
    if merge and curves:  # the merged runs' curves, not only this collect's
        from evotok.sweep import save_depth_curves

        if set(curves) != set(recorded):
            print(f"depth curves: {len(curves)} of the {len(recorded)} recorded runs have per-depth curves (the "
                  "others were recorded without them)", file=sys.stderr)
        out.append(save_depth_curves(list(curves.values()), name, figures, f"sweep_{name}_depth_curves"))
        stems.remove("depth_curves")
    for stem in stems:
        if (folder / f"{stem}.png").is_file():
            out.append(figures / f"sweep_{name}_{stem}.png")
            shutil.copy(folder / f"{stem}.png", out[-1])
    return out


RENDERERS: dict[str, Callable[[Path], str]] = {
    "bench_data": render_bench_data,
    "bench_quantizer": render_bench_quantizer,
    "teacher_tiny": render_teacher,
    "tokenizer_evotok_tiny": lambda r: render_tokenizer(r, "tokenizer_evotok_tiny"),
    "tokenizer_evotok_tiny64": lambda r: render_tokenizer(r, "tokenizer_evotok_tiny64"),
    "nmi_evotok_tiny": render_nmi,
    "lm_tiny": render_lm,
    "understanding_tiny": render_understanding,
    "checker_tiny": render_checker,
    "generation_tiny": render_generation,
    "bench_generate": render_bench_generate,
}


# blocks named after a recorded sweep: ``sweep_NAME`` (its ablation table), ``fig6_NAME`` (its Fig. 6 verdict)
PREFIX_RENDERERS: dict[str, Callable[[Path, str], str]] = {"sweep_": render_sweep, "fig6_": render_fig6}


def renderer(name: str) -> Callable[[Path], str]:
    if name in RENDERERS:
        return RENDERERS[name]
    for prefix, fn in PREFIX_RENDERERS.items():
        if name.startswith(prefix) and name != prefix:
            return lambda results: fn(results, name[len(prefix):])
    raise KeyError(f"README block '{name}' has no renderer in evotok/readme.py")


def render_readme(text: str, results: Path = RESULTS) -> str:
    def sub(m: re.Match) -> str:
        return m.group(1) + renderer(m.group("name"))(results) + m.group(4)

    return BLOCK.sub(sub, text)


def tb_curve(run_dir: Path, tag: str = "val/psnr") -> list[dict]:
    """[{step, minutes, <tag leaf>}] from a run's TensorBoard events (minutes since the first event)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((Path(run_dir) / "tb").rglob("events.out.tfevents.*"))
    points: dict[int, tuple[float, float]] = {}
    start = None
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag not in acc.Tags().get("scalars", []):
            continue
        for ev in acc.Scalars(tag):
            points[ev.step] = (ev.wall_time, ev.value)
        # the run's start: the first event of any scalar (the first training-loss log)
        first = min(e.wall_time for t in acc.Tags()["scalars"] for e in acc.Scalars(t)[:1])
        start = first if start is None else min(start, first)
    leaf = tag.rsplit("/", 1)[-1]
    out = []
    for step in sorted(points):
        wall, value = points[step]
        out.append({"step": step, "minutes": (wall - (start or wall)) / 60.0, leaf: value})
    return out


def record(name: str, run_dir: Path, results: Path = RESULTS, curve_tag: Optional[str] = None) -> Path:
    """Copy a run's metrics.json (plus the command from provenance.json, and optionally a TensorBoard
    curve) to results/NAME.json."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    if curve_tag:
        metrics["curve"] = tb_curve(Path(run_dir), curve_tag)
    prov_path = Path(run_dir) / "provenance.json"
    if prov_path.is_file():
        prov = json.loads(prov_path.read_text())
        metrics["command"] = " ".join(prov.get("command", []))
        metrics["git_sha"] = prov.get("git_sha")
    results.mkdir(exist_ok=True)
    out = results / f"{name}.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evotok.readme")
    parser.add_argument("action", nargs="?", default="write", choices=("write", "record", "record-file", "record-sweep"))
    parser.add_argument("args", nargs="*")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="record-sweep: keep an earlier recording's runs that this collect lacks")
    args = parser.parse_args(argv)
    if args.action == "record":
        print(record(args.args[0], Path(args.args[1])))
    if args.action == "record-sweep":  # NAME [key=value ...] [--merge]: a collected sweep's report
        for path in record_sweep(args.args[0], args.args[1:], merge=args.merge):
            print(path)
    if args.action == "record-file":  # copy any JSON a command wrote (e.g. a figures folder's nmi.json)
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(args.args[1], RESULTS / f"{args.args[0]}.json")
    text = README.read_text()
    new = render_readme(text)
    if args.check:
        if new != text:
            print("README.md disagrees with results/: run `python -m evotok.readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

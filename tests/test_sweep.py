"""Sweeps: expansion into points that share their common upstream runs, the print executor, --collect over
partial results, and the slurm executor through submitit's debug backend on a real 2-point sweep."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from evotok.cli import main
from evotok.config import load_config, to_yaml
from evotok.runs import RunDir
from evotok.sweep import collect, collect_table, expand, jobs, mean_ci95, run_sweep


def test_default_sweep_expands_to_named_points_sharing_teacher_lm_and_checker(tmp_path):
    points = expand("lpix_lsem", [f"run.dir={tmp_path}"])
    assert [p.name for p in points] == [f"lpix{a}_lsem{b}_s{s}" for a, b in ((4, 4), (16, 4), (4, 16)) for s in (0, 1, 2)]
    by_name = {p.name: p for p in points}
    p = by_name["lpix16_lsem4_s1"]
    train = {(s["stage"], s.get("name")): s for s in p.spec["steps"] if s["do"] == "train"}
    assert train[("tokenizer", "lpix_lsem_lpix16_lsem4_s1")]["overrides"] == ["model.lpix=16", "model.lsem=4", "run.seed=1"]
    assert ("teacher", "lpix_lsem_shared") in train and ("lm", "lpix_lsem_shared") in train
    assert not any(st == "understanding" for st, _ in train)  # the first seed only
    s0 = {(s["stage"], s.get("name")) for s in by_name["lpix16_lsem4_s0"].spec["steps"] if s["do"] == "train"}
    assert {("understanding", "lpix_lsem_lpix16_lsem4_s0_phase1"), ("understanding", "lpix_lsem_lpix16_lsem4_s0_phase2"),
            ("generation", "lpix_lsem_lpix16_lsem4_s0_phase2")} <= s0
    levels = jobs(points)
    level_stages = [sorted({st for st, _ in lv}) for lv in levels]
    assert level_stages[0] == ["checker", "lm", "teacher"] and len(levels[0]) == 3  # shared: once for the sweep
    assert level_stages[1] == ["tokenizer"] and len(levels[1]) == 9
    # generation reads no understanding run (its steps set understanding.run=), so both run side by side
    assert level_stages[2] == ["generation", "understanding"] and len(levels[2]) == 6 and len(levels) == 3


def test_print_executor_prints_one_command_per_job(tmp_path, capsys):
    assert main(["sweep", "--spec", "lpix_lsem", "--executor", "print", f"run.dir={tmp_path}"]) == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evotok pipeline")]
    assert len(cmds) == 3 + 9 + 3 + 3 and all(f"run.dir={tmp_path}" in c for c in cmds)
    spec = tmp_path / "sweeps" / "lpix_lsem" / "points" / "lpix4_lsem16_s2.yaml"
    assert spec.is_file() and f"--spec {spec} --only tokenizer" in "\n".join(cmds)


def _fake_tokenizer_run(root: Path, name: str, lpix: int, lsem: int, psnr: float, finished: bool = True) -> None:
    cfg = load_config("tokenizer/evotok_tiny", [f"run.dir={root}", f"run.name={name}", f"model.lpix={lpix}",
                                                f"model.lsem={lsem}"], stage="tokenizer")
    run = RunDir(root / "tokenizer" / name)
    run.path.mkdir(parents=True)
    run.config.write_text(to_yaml(cfg, "tokenizer"))
    L = max(lpix, lsem)
    per_depth = {"psnr": [psnr - (L - d) for d in range(1, L + 1)], "rfid": [0.1] * L, "clipsim_sem": [0.9] * L}
    (run.path / "metrics.json").write_text(json.dumps({"stage": "tokenizer", "step": 1, "scalars": {}, "per_depth": per_depth}))
    if finished:
        run.mark_finished()


def test_collect_over_partial_results_reports_means_intervals_and_unfinished(tmp_path):
    root = tmp_path / "runs"
    _fake_tokenizer_run(root, "lpix_lsem_lpix16_lsem4_s0", 16, 4, 25.0)
    _fake_tokenizer_run(root, "lpix_lsem_lpix16_lsem4_s1", 16, 4, 27.0)
    _fake_tokenizer_run(root, "lpix_lsem_lpix16_lsem4_s2", 16, 4, 99.0, finished=False)  # still running
    _fake_tokenizer_run(root, "lpix_lsem_lpix4_lsem4_s0", 4, 4, 21.0)
    rows = {r["point"]: r["metrics"] for r in collect("lpix_lsem", [f"run.dir={root}"])}
    cell = rows["model.lpix=16, model.lsem=4"]["PSNR@Lpix"]
    assert cell["values"] == [25.0, 27.0] and cell["expected"] == 3  # PSNR read at depth Lpix = 16
    assert cell["mean"] == pytest.approx(26.0) and cell["ci95"] == pytest.approx(12.706 * 1.4142 / 1.4142, rel=1e-3)
    assert rows["model.lpix=4, model.lsem=4"]["PSNR@Lpix"]["values"] == [21.0]
    assert rows["model.lpix=4, model.lsem=16"]["PSNR@Lpix"]["values"] == []
    table = collect_table("lpix_lsem", [f"run.dir={root}"])
    assert "26 ± 13 (2/3)" in table and "21 (1/3, one seed)" in table and "21 ± 0" not in table and "unfinished (0/3)" in table
    assert mean_ci95([1.0]) == (1.0, 0.0)
    # the sweep report: the table, the overlaid curves of the 3 finished tokenizer runs, links that resolve
    from evotok.checks import missing_links, page_links
    from evotok.sweep import write_sweep_report

    index = write_sweep_report("lpix_lsem", [f"run.dir={root}"])
    assert index == root / "sweeps" / "lpix_lsem" / "index.html"
    text = index.read_text()
    assert "26 ± 13 (2/3)" in text and "not run yet" in text
    links = page_links(index)
    assert "depth_curves.png" in links and "results.json" in links and missing_links(index) == []
    assert sum(link.endswith("config.yaml") for link in links) == 4  # the 4 started tokenizer runs
    saved = json.loads((index.parent / "results.json").read_text())
    assert {r["point"] for r in saved} == set(rows)


PIPE = """
run_name: p
steps:
  - do: train
    stage: teacher
    config: teacher/tiny
    overrides: [trainer.max_steps=2, trainer.val_every_n_steps=2]
  - do: train
    stage: tokenizer
    config: tokenizer/evotok_tiny
    overrides: [trainer.max_steps=3, trainer.val_every_n_steps=3, teacher.cache_features=false, model.lsem=3]
  - do: eval_recon
    stage: tokenizer
"""


@pytest.mark.slow  # part of make test, not of make test-fast
def test_slurm_executor_with_submitits_debug_backend_submits_and_collects(tmp_path):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE)
    sweep = tmp_path / "two.yaml"
    sweep.write_text(f"name: two\npipeline: {pipe}\naxes: {{model.lpix: [1, 2]}}\nseeds: [0]\nseeded_stages: [tokenizer]\n"
                     "slurm: {partition: gpu, gpus_per_node: 2, nodes: 1, time_min: 30}\n")
    overrides = [f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "data.train_size=64",
                 "data.val_size=16", "data.test_size=16", "data.batch_size=8", "trainer.threads=1",
                 "trainer.progress_bar=false"]
    jobs_done = run_sweep(str(sweep), executor="slurm", overrides=overrides, cluster="debug")  # in this process; each job still runs the CLI in a subprocess
    assert len(jobs_done) == 3  # the shared teacher, then one tokenizer per point
    teachers = list((tmp_path / "runs" / "teacher").iterdir())
    assert [t.name for t in teachers] == ["two_shared"]
    rows = {r["point"]: r["metrics"]["PSNR@Lpix"] for r in collect(str(sweep), overrides)}
    assert {k: len(v["values"]) for k, v in rows.items()} == {"model.lpix=1": 1, "model.lpix=2": 1}
    # the plain sbatch scripts: valid bash, one srun line per job, the level's commands
    scripts = sorted((tmp_path / "runs" / "sweeps" / "two" / "slurm").glob("level*.sbatch"))
    assert [s.name for s in scripts] == ["level0.sbatch", "level1.sbatch"]
    for s in scripts:
        assert subprocess.run(["bash", "-n", str(s)]).returncode == 0
    text = scripts[1].read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --gpus-per-node=2" in text and "#SBATCH --partition=gpu" in text
    assert text.count("srun evotok pipeline --spec") == 2 and text.count("--only tokenizer") == 2


def test_record_sweep_in_parts_merges_runs_by_name(tmp_path):
    """A sweep too long for one sitting: each part's collect is recorded with --merge; the table holds every
    run recorded so far (a re-run run keeps its newest value), the curves figure all of their curves."""
    from evotok.readme import merge_sweep_rows, record_sweep, render_sweep
    from evotok.sweep import write_sweep_report

    results, figures = tmp_path / "results", tmp_path / "figures"
    first, second = tmp_path / "a", tmp_path / "b"
    _fake_tokenizer_run(first, "lpix_lsem_lpix16_lsem4_s0", 16, 4, 25.0)
    _fake_tokenizer_run(first, "lpix_lsem_lpix16_lsem4_s1", 16, 4, 27.0)
    for run in (first / "tokenizer").iterdir():  # each part trained its own shared teacher
        (run / "provenance.json").write_text(json.dumps({"upstream": {"teacher.run": {"fingerprint": "sha256:a"}}}))
    write_sweep_report("lpix_lsem", [f"run.dir={first}"])
    record_sweep("lpix_lsem", [f"run.dir={first}"], results, figures, merge=True)  # nothing earlier: a plain record
    _fake_tokenizer_run(second, "lpix_lsem_lpix16_lsem4_s1", 16, 4, 28.0)  # re-run: the newer value counts
    _fake_tokenizer_run(second, "lpix_lsem_lpix16_lsem4_s2", 16, 4, 30.0)
    _fake_tokenizer_run(second, "lpix_lsem_lpix4_lsem4_s0", 4, 4, 21.0)
    for run in (second / "tokenizer").iterdir():
        (run / "provenance.json").write_text(json.dumps({"upstream": {"teacher.run": {"fingerprint": "sha256:b"}}}))
    write_sweep_report("lpix_lsem", [f"run.dir={second}"])
    written = record_sweep("lpix_lsem", [f"run.dir={second}"], results, figures, merge=True)
    data = json.loads((results / "sweep_lpix_lsem.json").read_text())
    rows = {r["point"]: r for r in data["rows"]}
    cell = rows["model.lpix=16, model.lsem=4"]["metrics"]["PSNR@Lpix"]
    assert cell["runs"] == ["lpix16_lsem4_s0", "lpix16_lsem4_s1", "lpix16_lsem4_s2"]
    assert cell["values"] == [25.0, 28.0, 30.0] and cell["expected"] == 3
    assert cell["mean"] == pytest.approx(83.0 / 3) and cell["ci95"] == pytest.approx(mean_ci95([25.0, 28.0, 30.0])[1])
    assert rows["model.lpix=4, model.lsem=4"]["metrics"]["PSNR@Lpix"]["values"] == [21.0]
    assert len(rows["model.lpix=16, model.lsem=4"]["curves"]) == 3
    assert [len(p["runs"]) for p in data["recordings"]] == [2, 3]
    assert [p["upstream"] for p in data["recordings"]] == [{"teacher.run": ["sha256:a"]}, {"teacher.run": ["sha256:b"]}]
    assert figures / "sweep_lpix_lsem_depth_curves.png" in written and (figures / "sweep_lpix_lsem_depth_curves.png").is_file()
    table = render_sweep(results, "lpix_lsem")
    assert "27.67 ± 6.3 (3/3)" in table and "recorded in 2 parts" in table and "(3 runs)" in table
    assert "2 different teacher checkpoints" in table
    # without --merge a record replaces the earlier one
    record_sweep("lpix_lsem", [f"run.dir={second}"], results, figures)
    cell = {r["point"]: r for r in json.loads((results / "sweep_lpix_lsem.json").read_text())["rows"]}[
        "model.lpix=16, model.lsem=4"]["metrics"]["PSNR@Lpix"]
    assert cell["values"] == [28.0, 30.0]
    # a recording whose values do not name their runs cannot be merged, and says so
    legacy = [{"point": "p", "runs": {"a": {}}, "metrics": {"PSNR@Lpix": {"values": [1.0], "expected": 1}}}]
    with pytest.raises(ValueError, match="without the runs"):
        merge_sweep_rows(legacy, [{"point": "p", "runs": {"a": {}}, "metrics": {}}])

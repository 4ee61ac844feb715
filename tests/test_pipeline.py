"""Pipelines: every spec is valid, and the demo pipeline runs end to end on tiny sizes."""

from __future__ import annotations

import json

import pytest

from evotok.config import ConfigError, load_config
from evotok.pipeline import PIPELINES, load_pipeline, run_pipeline


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_spec_resolves(name):
    spec = load_pipeline(name)
    stages = set()
    for step in spec["steps"]:
        if step["do"] == "train":
            # the experiment config exists and validates for its stage
            load_config(step.get("config"), step.get("overrides", []), stage=step["stage"])
            stages.add(step["stage"])
        if step["do"] in ("eval_recon", "figures", "record"):
            assert step["stage"] in stages


def test_hand_over_and_global_overrides_follow_the_registry(tmp_path):
    from evotok.pipeline import handover_overrides, overrides_for

    trained = {"teacher": tmp_path / "t"}
    assert handover_overrides("tokenizer", trained, []) == [f"teacher.run={tmp_path / 't'}"]
    assert handover_overrides("tokenizer", trained, ["teacher.run=mine"]) == []  # the step's own value wins
    assert handover_overrides("teacher", trained, []) == []
    glob = ["model.lpix=2", "data.batch_size=8", "teacher.arch=x", "loss.sem_weight=1"]
    assert overrides_for("teacher", glob) == ["data.batch_size=8", "teacher.arch=x"]
    assert overrides_for("tokenizer", glob) == glob
    with pytest.raises(ConfigError, match="'mllm.phase=2' is read by no stage of pipeline 'tiny'"):
        run_pipeline("tiny", ["mllm.phase=2"])  # (tiny: teacher and tokenizer only)


def test_identity_ignores_cosmetic_keys_and_follows_the_rest():
    from evotok.pipeline import stage_identity

    def ident(*overrides):
        return stage_identity(load_config("teacher/tiny", list(overrides), stage="teacher"), "teacher")

    base = ident()
    # the run's name and the CPU threads that compute it (a sweep runs points at 1 thread side by side) do not count
    assert ident("run.name=other", "trainer.threads=1", "trainer.progress_bar=false") == base
    assert ident("trainer.max_steps=7") != base and ident("data.batch_size=8") != base


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_pipeline("demoo")


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_and_its_checks_name_what_is_missed(tmp_path):
    """`make demo` at tiny sizes and 3 steps a stage: every stage trains, every eval, figure and grid is
    written, and the minimum-result checks, which 3 steps cannot meet, fail naming exactly the metric ones."""
    from evotok.checks import CheckFailed, missing_links

    overrides = [
        f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "data.train_size=128",
        "data.val_size=32", "data.test_size=32", "data.batch_size=16", "trainer.max_steps=3",
        "trainer.val_every_n_steps=3", "trainer.progress_bar=false",
    ]
    with pytest.raises(CheckFailed) as err:
        run_pipeline("demo", overrides)
    msg = str(err.value)
    assert "missed 3 of 11 checks" in msg
    for name in ("tokenizer PSNR at Lpix (dB)", "teacher shape zero-shot", "VQA shape accuracy"):
        assert name in msg
    folder = tmp_path / "runs" / "pipelines" / "demo"
    summary = json.loads((folder / "summary.json").read_text())
    trained = [(s["stage"], s["status"]) for s in summary["steps"] if s["kind"] == "train"]
    assert trained == [(st, "trained") for st in ("teacher", "tokenizer", "lm", "understanding", "understanding",
                                                   "checker", "generation", "generation")]
    tok = tmp_path / "runs" / "tokenizer" / "demo"
    L = load_config("tokenizer/evotok_tiny").depth
    assert len(json.loads((tok / "metrics.json").read_text())["per_depth"]["psnr"]) == L
    assert (tmp_path / "runs" / "generation" / "demo_phase2" / "figures" / "geneval_tags.png").stat().st_size > 0
    assert (tmp_path / "runs" / "data" / "evoshapes_preview_32px.png").is_file()
    assert missing_links(folder / "index.html") == [] and "MISSED" in (folder / "index.html").read_text()
    # a second run finds every stage finished and trains nothing; the checks still fail
    mtime = (tok / "checkpoints" / "last.ckpt").stat().st_mtime
    with pytest.raises(CheckFailed):
        run_pipeline("demo", overrides)
    assert (tok / "checkpoints" / "last.ckpt").stat().st_mtime == mtime
    statuses = {s["status"] for s in json.loads((folder / "summary.json").read_text())["steps"] if s["kind"] != "check"}
    assert statuses == {"up to date"}


def test_only_generation_needs_what_its_steps_read_and_nothing_else():
    """`--only generation` needs the stages its steps read: a train step that sets a hand-over key itself
    (``understanding.run=``: generation from the LM alone) does not read that key's producer, and the
    GenEval-style eval step reads the checker."""
    from evotok.pipeline import _upstream_closure

    steps = [{"do": "train", "stage": s} for s in ("teacher", "tokenizer", "lm", "understanding", "checker")]
    gen = [{"do": "train", "stage": "generation", "overrides": ["understanding.run="]},
           {"do": "train", "stage": "generation", "overrides": ["understanding.run="]}]
    assert _upstream_closure({"steps": steps + gen}, ["generation"]) == {"teacher", "tokenizer", "lm"}
    geneval = [{"do": "eval_geneval", "stage": "generation"}]
    assert _upstream_closure({"steps": steps + gen + geneval}, ["generation"]) == {"teacher", "tokenizer", "lm",
                                                                                   "checker"}
    gen[1]["overrides"] = []  # one step that reads the understanding run is enough to need it
    assert _upstream_closure({"steps": steps + gen}, ["generation"]) == {"teacher", "tokenizer", "lm", "understanding"}

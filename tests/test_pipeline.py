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
    with pytest.raises(ConfigError, match="'mllm.phase=2' is read by no stage of pipeline 'demo'"):
        run_pipeline("demo", ["mllm.phase=2"])


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_pipeline("demoo")


@pytest.mark.slow
def test_demo_pipeline_end_to_end_on_tiny_sizes(tmp_path):
    overrides = [
        f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "data.train_size=256",
        "data.val_size=64", "data.test_size=64", "data.batch_size=16", "trainer.max_steps=3",
        "trainer.val_every_n_steps=3", "trainer.progress_bar=false",
    ]
    runs = run_pipeline("demo", overrides)
    assert set(runs) == {"teacher", "tokenizer"}
    tok = runs["tokenizer"]
    metrics = json.loads((tok / "metrics.json").read_text())
    L = load_config("tokenizer/evotok_tiny").depth
    assert len(metrics["per_depth"]["psnr"]) == L and len(metrics["per_depth"]["clipsim_sem"]) == L
    assert (tok / "figures" / "index.html").is_file() and (tok / "figures" / "recon_grid.png").stat().st_size > 0
    assert (tmp_path / "runs" / "data" / "evoshapes_preview_32px.png").is_file()
    # a second run finds both stages finished and skips their training
    mtime = (tok / "checkpoints" / "last.ckpt").stat().st_mtime
    run_pipeline("demo", overrides)
    assert (tok / "checkpoints" / "last.ckpt").stat().st_mtime == mtime

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
            load_config(step.get("config"))  # the experiment config exists and validates
            stages.add(step["stage"])
        if step.get("teacher_from"):
            assert step["teacher_from"] in stages, "a step reads a stage trained later"
        if step["do"] in ("eval_recon", "figures", "record"):
            assert step["stage"] in stages


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_pipeline("demoo")


@pytest.mark.slow
def test_demo_pipeline_end_to_end_on_tiny_sizes(tmp_path):
    overrides = [
        f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "data.train_size=256",
        "data.val_size=64", "data.test_size=64", "data.batch_size=16", "trainer.max_steps=3",
        "trainer.val_every_n_steps=3", "trainer.max_minutes=0", "trainer.progress_bar=false",
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

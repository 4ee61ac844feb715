"""Run folders: contents, provenance, metrics.json merging, refusal to overwrite a finished run."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from evotok.config import load_config
from evotok.runs import RunError, create_run, read_metrics, resolve_run, write_metrics


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.dir={tmp_path}", "run.name=r1", "run.seed=7", *extra])


def test_run_folder_contents(tmp_path):
    cfg = _cfg(tmp_path, "model.lpix=3")
    run = create_run(cfg, "tokenizer", argv=["evotok", "train", "tokenizer"])
    assert run.path == tmp_path / "tokenizer" / "r1"
    for sub in ("checkpoints", "tb", "figures"):
        assert (run.path / sub).is_dir()
    saved = OmegaConf.load(run.config)
    assert saved.model.lpix == 3 and saved.run.seed == 7
    assert run.load_config() == cfg
    prov = json.loads(run.provenance.read_text())
    assert prov["seed"] == 7 and prov["command"] == ["evotok", "train", "tokenizer"] and prov["stage"] == "tokenizer"
    assert prov["packages"]["torch"].startswith("2.14.1")
    assert set(prov) >= {"git_sha", "git_dirty", "host", "time"}


def test_metrics_json_schema_and_merge(tmp_path):
    run = create_run(_cfg(tmp_path), "tokenizer")
    write_metrics(run, "tokenizer", 10, scalars={"loss": 1.5}, per_depth={"psnr": [20.0, 22.0]})
    write_metrics(run, "tokenizer", 20, scalars={"acc": 0.5}, per_depth={"usage": [0.9, float("nan")]})
    m = read_metrics(run)
    assert m["stage"] == "tokenizer" and m["step"] == 20
    assert m["scalars"] == {"loss": 1.5, "acc": 0.5}
    assert m["per_depth"] == {"psnr": [20.0, 22.0], "usage": [0.9, None]}


def test_finished_run_is_not_overwritten(tmp_path):
    cfg = _cfg(tmp_path)
    run = create_run(cfg, "teacher")
    (run.checkpoints / "last.ckpt").write_text("x")
    run.mark_finished()
    with pytest.raises(RunError) as e:
        create_run(cfg, "teacher")
    assert str(run.path) in str(e.value) and "run.overwrite=true" in str(e.value)
    assert (run.checkpoints / "last.ckpt").exists()  # nothing lost by the refusal
    run2 = create_run(_cfg(tmp_path, "run.overwrite=true"), "teacher")
    assert not run2.finished and not (run2.checkpoints / "last.ckpt").exists()


def test_resume_with_other_model_is_refused(tmp_path):
    run = create_run(_cfg(tmp_path, "model.lpix=4"), "tokenizer")
    run.last_ckpt.write_text("x")
    with pytest.raises(RunError, match="model.lpix"):
        create_run(_cfg(tmp_path, "model.lpix=16"), "tokenizer")


def test_resolve_run_accepts_folder_or_ckpt(tmp_path):
    run = create_run(_cfg(tmp_path), "tokenizer")
    with pytest.raises(RunError, match="no checkpoints"):
        resolve_run(run.path)
    run.last_ckpt.write_text("x")
    assert resolve_run(run.path) == (run, run.last_ckpt)
    run.best_ckpt.write_text("y")
    assert resolve_run(run.path)[1] == run.best_ckpt
    assert resolve_run(run.last_ckpt) == (run, run.last_ckpt)
    with pytest.raises(RunError, match="does not exist"):
        resolve_run(tmp_path / "nope")
    with pytest.raises(RunError, match="metrics.json"):
        read_metrics(tmp_path)

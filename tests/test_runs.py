"""Run folders: contents, provenance, metrics.json merging, refusal to overwrite a finished run."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from evotok.config import load_config
from evotok.runs import RunError, create_run, prepare_run, read_metrics, resolve_run, write_metrics


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


def test_finished_run_is_not_overwritten_and_overwrite_starts_afresh(tmp_path):
    cfg = _cfg(tmp_path)
    run = create_run(cfg, "teacher")
    old = [run.last_ckpt, run.best_ckpt, run.metrics, run.tb / "events.out.tfevents.1", run.figures / "f.png",
           run.path / "analysis" / "features.npz"]
    for f in old:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("old")
    run.mark_finished()
    with pytest.raises(RunError) as e:
        prepare_run(cfg, "teacher")
    assert str(run.path) in str(e.value) and "run.overwrite=true" in str(e.value)
    assert all(f.exists() for f in old)  # nothing lost by the refusal
    cfg2 = _cfg(tmp_path, "run.overwrite=true")
    prepare_run(cfg2, "teacher")
    assert all(f.exists() for f in old)  # prepare_run never deletes: the run folder goes when the new run starts
    run2 = create_run(cfg2, "teacher")
    assert not run2.finished
    left = sorted(str(p.relative_to(run2.path)) for p in run2.path.rglob("*") if p.is_file())
    assert left == ["config.yaml", "provenance.json"]  # no file of the old run survives


def test_resume_with_other_model_is_refused(tmp_path):
    import torch

    run = create_run(_cfg(tmp_path, "model.lpix=4"), "tokenizer")
    torch.save({"state_dict": {}}, run.last_ckpt)
    with pytest.raises(RunError, match="model.lpix"):
        prepare_run(_cfg(tmp_path, "model.lpix=16"), "tokenizer")
    prepare_run(_cfg(tmp_path, "model.lpix=4", "trainer.max_steps=99"), "tokenizer")  # a longer run resumes


def test_saved_config_holds_what_the_stage_reads(tmp_path):
    run = create_run(_cfg(tmp_path), "teacher")
    saved = OmegaConf.to_container(OmegaConf.load(run.config))
    assert set(saved) == {"teacher", "optim", "data", "trainer", "run"} and set(saved["teacher"]) == {"arch"}


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

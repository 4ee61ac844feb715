"""Pipelines as a graph of identities: a killed pipeline resumes where it stopped, finished stages stay
untouched, a changed config re-runs exactly that stage and what reads it, and the report's links resolve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evotok.checks import page_links
from evotok.pipeline import read_identity, run_pipeline, stage_identity

SPEC = """
run_name: g
steps:
  - do: train
    stage: teacher
    config: teacher/tiny
    overrides: [trainer.max_steps=2, trainer.val_every_n_steps=2]
  - do: train
    stage: tokenizer
    config: tokenizer/evotok_tiny
    overrides: [trainer.max_steps=16, trainer.ckpt_every_n_steps=4, trainer.val_every_n_steps=16, model.lsem=6,
                teacher.cache_features=false]
  - do: eval_recon
    stage: tokenizer
"""


def _overrides(root: Path) -> list[str]:
    return [f"run.dir={root / 'runs'}", f"data.cache_dir={root.parent / 'cache'}", "data.train_size=64",
            "data.val_size=16", "data.test_size=16", "data.batch_size=8", "trainer.threads=1",
            "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "g.yaml"
    p.write_text(SPEC)
    return p


def _summary(root: Path) -> dict[str, str]:
    steps = json.loads((root / "runs" / "pipelines" / "g" / "summary.json").read_text())["steps"]
    return {f"{s['kind']}:{s['stage']}": s["status"] for s in steps}


@pytest.mark.slow  # part of make test, not of make test-fast
def test_killed_pipeline_resumes_and_changes_rerun_only_their_dependents(spec, tmp_path):
    # the uninterrupted reference
    ref_root = tmp_path / "ref"
    ref = run_pipeline(str(spec), _overrides(ref_root))
    ref_metrics = json.loads((ref["tokenizer"] / "metrics.json").read_text())
    assert _summary(ref_root) == {"train:teacher": "trained", "train:tokenizer": "trained", "eval_recon:tokenizer": "ran"}

    # kill -9 during the tokenizer stage, once it has written a checkpoint, then run the pipeline again
    root = tmp_path / "killed"
    code = f"from evotok.pipeline import run_pipeline; run_pipeline({str(spec)!r}, {_overrides(root)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tok_ckpt = root / "runs" / "tokenizer" / "g" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not tok_ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    tok_dir = root / "runs" / "tokenizer" / "g"
    assert tok_ckpt.is_file() and not (tok_dir / "finished").exists(), "the kill should land inside the tokenizer stage"
    teacher_ckpt = root / "runs" / "teacher" / "g" / "checkpoints" / "last.ckpt"
    teacher_mtime = teacher_ckpt.stat().st_mtime_ns
    runs = run_pipeline(str(spec), _overrides(root))
    assert _summary(root) == {"train:teacher": "up to date", "train:tokenizer": "resumed", "eval_recon:tokenizer": "ran"}
    assert teacher_ckpt.stat().st_mtime_ns == teacher_mtime  # the finished stage was not touched
    metrics = json.loads((runs["tokenizer"] / "metrics.json").read_text())
    assert metrics["step"] == ref_metrics["step"] == 16
    assert len(metrics["per_depth"]["psnr"]) == len(ref_metrics["per_depth"]["psnr"]) == 6
    # exact resume (RNG states and the loader's position are in the checkpoint): the same numbers as the
    # uninterrupted run
    for key in ("psnr", "clipsim_sem", "usage"):
        assert metrics["per_depth"][key] == pytest.approx(ref_metrics["per_depth"][key], rel=1e-6, abs=1e-9), key

    # nothing changed: everything is up to date, no file rewritten
    tok_mtime = (tok_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    run_pipeline(str(spec), _overrides(root))
    assert set(_summary(root).values()) == {"up to date"}
    assert (tok_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == tok_mtime

    # a tokenizer-only change re-runs the tokenizer and its eval, not the teacher
    old_identity = read_identity(tok_dir)
    run_pipeline(str(spec), [*_overrides(root), "loss.sem_weight=0.2"])
    assert _summary(root) == {"train:teacher": "up to date", "train:tokenizer": "retrained", "eval_recon:tokenizer": "ran"}
    assert teacher_ckpt.stat().st_mtime_ns == teacher_mtime and read_identity(tok_dir) != old_identity

    # the report parses and every link in it resolves
    index = root / "runs" / "pipelines" / "g" / "index.html"
    links = page_links(index)
    assert any(link.endswith("metrics.json") for link in links)
    for link in links:
        assert (index.parent / link).exists(), link


def test_identity_follows_config_and_upstream_content_not_names(tmp_path):
    from evotok.config import load_config

    base = ["teacher.random_init=true"]
    a = stage_identity(load_config("tokenizer/evotok_tiny", base + ["run.name=a"], stage="tokenizer"), "tokenizer")
    b = stage_identity(load_config("tokenizer/evotok_tiny", base + ["run.name=b", "trainer.progress_bar=false"],
                                   stage="tokenizer"), "tokenizer")
    c = stage_identity(load_config("tokenizer/evotok_tiny", base + ["model.lpix=3"], stage="tokenizer"), "tokenizer")
    assert a == b != c
    # an upstream is identified by its checkpoint's content: the same bytes elsewhere give the same identity
    for name, payload in (("t1", b"weights-1"), ("t2", b"weights-1"), ("t3", b"weights-2")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(payload)
    ids = [stage_identity(load_config("tokenizer/evotok_tiny", [f"teacher.run={tmp_path / n}"], stage="tokenizer"),
                          "tokenizer") for n in ("t1", "t2", "t3")]
    assert ids[0] == ids[1] != ids[2]

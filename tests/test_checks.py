"""A pipeline's minimum-result checks read metrics, files and pages of its runs and name every miss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evotok.checks import CheckFailed, failures, missing_links, run_checks
from evotok.config import load_config, to_yaml


def _run(root: Path, name: str, scalars=None, per_depth=None) -> Path:
    run = root / name
    (run / "figures").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"scalars": scalars or {}, "per_depth": per_depth or {}}))
    return run


def test_metrics_at_a_depth_scalars_files_and_links(tmp_path):
    tok = _run(tmp_path, "tok", per_depth={"psnr": [15.0, 18.0, 19.0, 21.0, 22.0]})
    cfg = load_config("tokenizer/evotok_tiny", ["model.lpix=4", "model.lsem=5"], stage="tokenizer")
    (tok / "config.yaml").write_text(to_yaml(cfg, "tokenizer"))
    teacher = _run(tmp_path, "teacher", scalars={"zeroshot_shape": 0.79})
    (tok / "figures" / "a.png").write_bytes(b"png")
    (tok / "figures" / "empty.png").write_bytes(b"")
    (tok / "figures" / "index.html").write_text("<html><img src='a.png'><a href='gone.pdf'>x</a>"
                                                "<a href='https://example.org'>ext</a></html>")
    runs = {"tokenizer": tok, "teacher": teacher}
    checks = run_checks([
        {"stage": "tokenizer", "metric": "psnr", "at": "lpix", "min": 20.0},  # depth 4: 21.0
        {"stage": "tokenizer", "metric": "psnr", "at": 2, "min": 20.0},  # 18.0
        {"stage": "teacher", "metric": "zeroshot_shape", "min": 0.8},  # 0.79
        {"stage": "teacher", "metric": "zeroshot_count", "min": 0.8},  # absent
        {"stage": "tokenizer", "files": ["figures/a.png", "figures/empty.png", "figures/*.png"]},
        {"stage": "tokenizer", "links": "figures/index.html"},
        {"stage": "generation", "files": ["figures/x.png"]},  # no such stage in the pipeline
    ], runs)
    assert [c.ok for c in checks] == [True, False, False, False, True, False, True, False, False]
    assert checks[0].got == "21" and checks[2].got == "0.79"
    assert "zeroshot_count not in" in checks[3].got
    assert missing_links(tok / "figures" / "index.html") == ["gone.pdf"]  # the external link is not a file
    assert "gone.pdf" in checks[7].got and "trained no generation" in checks[8].got
    assert len(failures(checks)) == 6
    with pytest.raises(Exception, match="give metric"):
        run_checks([{"stage": "teacher"}], runs)
    assert issubclass(CheckFailed, Exception)


def test_a_pipeline_with_a_missed_check_fails_naming_it_and_writes_the_report(tmp_path):
    from evotok.pipeline import run_pipeline

    spec = tmp_path / "c.yaml"
    spec.write_text("""
run_name: c
steps:
  - do: train
    stage: checker
    config: checker/tiny
    overrides: [trainer.max_steps=2, trainer.val_every_n_steps=2]
  - do: check
    require:
      - {name: "checker shape accuracy", stage: checker, metric: acc/shape, min: 1.01}
      - {stage: checker, files: [checkpoints/last.ckpt]}
""")
    overrides = [f"run.dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "data.train_size=32",
                 "data.val_size=16", "data.test_size=16", "data.batch_size=8", "trainer.progress_bar=false"]
    with pytest.raises(CheckFailed, match=r"missed 1 of 2 checks: checker shape accuracy \(wanted >= 1.01"):
        run_pipeline(str(spec), overrides)
    summary = json.loads((tmp_path / "runs" / "pipelines" / "c" / "summary.json").read_text())
    assert [c["ok"] for c in summary["checks"]] == [False, True]
    index = tmp_path / "runs" / "pipelines" / "c" / "index.html"
    assert "MISSED" in index.read_text() and missing_links(index) == []

"""Hand-over between runs: upstream records (path + fingerprint) in provenance.json and checkpoints; a moved
or retrained upstream fails with a clear message; a run tree copied elsewhere still evaluates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from evotok.config import load_config
from evotok.handover import UpstreamError, fingerprint_file


def _teacher_run(root, name="t", seed=0):
    """A finished teacher run folder holding a random-init teacher (what `evotok train teacher` writes)."""
    from evotok.config import to_dict
    from evotok.models.teacher import Teacher, build_clip

    torch.manual_seed(seed)
    clip = build_clip("evotok-teacher-tiny-avg")
    run = root / "teacher" / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_config(None, stage="teacher")
    state = {f"teacher.clip.{k}": v for k, v in Teacher(clip).clip.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": to_dict(cfg, "teacher")}, "global_step": 1},
               run / "checkpoints" / "best.ckpt")
    (run / "config.yaml").write_text("teacher:\n  arch: evotok-teacher-tiny-avg\n")
    (run / "FINISHED").write_text("done\n")
    return run


def _tokenizer_cfg(root, teacher, *extra):
    return load_config("tokenizer/evotok_tiny", [
        f"run.dir={root}", "run.name=tok", f"teacher.run={teacher}", "teacher.cache_features=false",
        f"data.cache_dir={root.parent / 'cache'}", "data.train_size=64", "data.val_size=16", "data.test_size=16",
        "data.batch_size=8", "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.ckpt_every_n_steps=2",
        "trainer.progress_bar=false", "trainer.threads=1", "trainer.image_log_every_n_steps=0",
        "loss.gan_start=1000", *extra,
    ], stage="tokenizer")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """runs/teacher/t and runs/tokenizer/tok trained from it (2 steps)."""
    from evotok.lit.train import train

    root = tmp_path_factory.mktemp("handover") / "runs"
    teacher = _teacher_run(root)
    tok = train(_tokenizer_cfg(root, teacher), "tokenizer")
    return root, teacher, tok


def _copy_tree(tree, dst):
    root, _, tok = tree
    from evotok.runs import RunDir

    shutil.copytree(root, dst)
    return dst / "teacher" / "t", RunDir(dst / "tokenizer" / "tok")


def test_runs_record_path_and_fingerprint_of_their_upstreams(tree):
    root, teacher, tok = tree
    rec = json.loads((tok.path / "provenance.json").read_text())["upstream"]
    assert set(rec) == {"teacher.run"}
    r = rec["teacher.run"]
    assert r["path"] == str(teacher.resolve()) and r["relpath"] == "../../teacher/t"
    assert r["artifact"] == "checkpoints/best.ckpt"
    assert r["fingerprint"] == fingerprint_file(teacher / "checkpoints" / "best.ckpt")
    # the input normalisation the run resolved is stored beside its upstreams (the embedded teacher's: OpenAI CLIP's)
    norm = json.loads((tok.path / "provenance.json").read_text())["normalization"]
    assert norm["teacher"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert norm["encoder"]["source"].startswith("CNN encoder")
    for ckpt in (tok.last_ckpt, tok.best_ckpt):  # every checkpoint carries the same record
        assert torch.load(ckpt, weights_only=False, map_location="cpu")["evotok"]["upstream"] == rec


def test_a_retrained_upstream_is_refused_by_eval_and_resume(tmp_path):
    from evotok.api import load_run_teacher
    from evotok.lit.train import train
    from evotok.runs import RunDir

    teacher = _teacher_run(tmp_path / "runs")
    tok = train(_tokenizer_cfg(tmp_path / "runs", teacher), "tokenizer")
    load_run_teacher(tok.path)  # the teacher it was trained from: fine
    shutil.rmtree(teacher)
    _teacher_run(tmp_path / "runs", seed=1)  # retrained: same place, other weights
    with pytest.raises(UpstreamError, match=r"upstream teacher.run of run .* changed: .*best.ckpt has fingerprint"):
        load_run_teacher(tok.path)
    assert isinstance(tok, RunDir)
    (tok.path / "FINISHED").unlink()  # as if killed: resuming with the retrained teacher is refused too
    cfg = _tokenizer_cfg(tmp_path / "runs", teacher, "trainer.max_steps=4")
    with pytest.raises(UpstreamError, match="cannot resume .* its upstream teacher.run was"):
        train(cfg, "tokenizer")


def test_a_moved_upstream_fails_naming_where_it_looked(tree, tmp_path):
    from evotok.api import load_run_teacher

    teacher, tok = _copy_tree(tree, tmp_path / "runs")
    shutil.move(str(teacher), str(tmp_path / "elsewhere"))
    # the record's absolute path is the original tree's, which still exists: point it away from both
    prov = json.loads((tok.path / "provenance.json").read_text())
    for ckpt in (tok.best_ckpt, tok.last_ckpt):
        obj = torch.load(ckpt, weights_only=False, map_location="cpu")
        obj["evotok"]["upstream"]["teacher.run"]["path"] = str(tmp_path / "gone")
        torch.save(obj, ckpt)
    with pytest.raises(UpstreamError, match=r"upstream teacher.run of run .* is missing: looked at .*gone and .*teacher/t"):
        load_run_teacher(tok.path)
    assert prov["upstream"]["teacher.run"]["relpath"] == "../../teacher/t"


def test_a_run_tree_copied_elsewhere_evaluates_from_any_working_directory(tree, tmp_path, monkeypatch):
    from evotok.eval.recon import evaluate_recon

    root, _, _ = tree
    teacher, tok = _copy_tree(tree, tmp_path / "copy" / "runs")
    # the original tree is out of reach: the copy must be found relative to the tokenizer's run folder
    moved = root.with_name("runs_moved")
    root.rename(moved)
    try:
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)  # teacher.run=<root>/teacher/t means nothing from here
        rec = evaluate_recon(tok.path, split="val", max_images=8, progress=False, write=False)
    finally:
        moved.rename(root)
    assert len(rec["per_depth"]["psnr"]) == 16


def test_resume_from_another_working_directory_finds_the_upstream(tree, tmp_path, monkeypatch):
    """The same command (teacher.run=runs/teacher/t, relative) re-run from another folder resumes: the
    teacher is found through the run's record, relative to the run folder."""
    from evotok.lit.train import train

    root, _, _ = tree
    teacher, tok = _copy_tree(tree, tmp_path / "copy" / "runs")
    (tok.path / "FINISHED").unlink()
    moved = root.with_name("runs_moved")
    root.rename(moved)  # the recorded absolute path is gone
    try:
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)
        run = train(_tokenizer_cfg(tmp_path / "copy" / "runs", "runs/teacher/t", "trainer.max_steps=4"), "tokenizer")
    finally:
        moved.rename(root)
    assert torch.load(run.last_ckpt, weights_only=False, map_location="cpu")["global_step"] == 4
    rec = json.loads(run.provenance.read_text())["upstream"]["teacher.run"]
    assert rec["path"] == str(teacher.resolve())

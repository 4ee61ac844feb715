"""The `evotok` command: fast help, every subcommand's help, not-built stages, config errors."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from evotok.cli import EXIT_NOT_BUILT, EXIT_USAGE, build_parser, main
from evotok.stages import STAGE_NAMES, STAGES

COMMANDS = ("train", "sweep", "pipeline", "eval", "figures", "bench", "data", "generate", "chat", "encode", "decode", "export")


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "evotok.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.time(); from evotok.cli import build_parser; build_parser().format_help(); "
        "print(time.time()-t); print(int(any(m in sys.modules for m in ('torch','lightning','transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0
    assert out[1] == "0", "evotok --help imported torch, lightning or transformers"
    t = time.time()
    res = _run("--help")
    assert res.returncode == 0 and "train" in res.stdout
    assert time.time() - t < 5.0


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: evotok " + command in capsys.readouterr().out


def test_parser_knows_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


def test_unbuilt_commands_and_stages_say_so_and_exit_nonzero(capsys, monkeypatch):
    import dataclasses

    from evotok import stages

    assert main(["sweep", "--spec", "no_such_sweep"]) == EXIT_USAGE  # built now: a bad spec is a usage error
    assert "unknown sweep 'no_such_sweep'; sweeps: lpix_lsem" in capsys.readouterr().err
    # a stage whose registry entry has no module yet: training says so, --dry-run prints the config and says so
    monkeypatch.setitem(stages.STAGES, "checker", dataclasses.replace(stages.STAGES["checker"], module=None))
    assert main(["train", "checker"]) == EXIT_NOT_BUILT
    assert "stage 'checker' is not built yet" in capsys.readouterr().err
    assert main(["train", "checker", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 'checker' is not built yet" in out and "checker:" in out


def test_config_errors_are_one_line(capsys):
    assert main(["train", "tokenizer", "model.quantizer.codebok_size=3"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "model.quantizer.codebook_size" in err and "Traceback" not in err
    assert main(["train", "tokenizer", "--config", "no/such"]) == EXIT_USAGE
    assert "no/such" in capsys.readouterr().err


def test_overrides_rejected_where_not_accepted(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--run", "x", "--out", "y", "model.lpix=3"])
    assert e.value.code == 2
    assert "model.lpix=3" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "tokenizer", "--dry-run", "model.lpix=7", "model.lsem=2"]) == 0
    out = capsys.readouterr().out
    assert "lpix: 7" in out and "depth L = max(lpix, lsem) = 7" in out


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_registry_drives_the_stage_list_and_dry_run(stage, capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"]
    assert tuple(next(a for a in train._actions if a.dest == "stage").choices) == STAGE_NAMES
    assert main(["train", stage, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# stage {stage}: {STAGES[stage].summary}" in out
    assert STAGES[stage].built and "parameters" in out and "not built yet" not in out  # it describes its model
    assert "run:" in out and "trainer:" in out  # the resolved config of what the stage reads


def test_a_key_of_another_stage_names_key_and_stage(capsys):
    assert main(["train", "teacher", "--dry-run", "model.lpix=4"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'model.lpix'" in err and "not read by stage 'teacher'" in err and "Traceback" not in err


@pytest.mark.parametrize("override, key", [("model.preset=huge", "model.preset"), ("data.resolution=30", "data.resolution")])
def test_bad_values_fail_at_load_in_one_line(override, key, capsys):
    assert main(["train", "tokenizer", "--dry-run", override]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert f"'{key}'" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_user_errors_from_any_layer_are_one_line(tmp_path, capsys):
    from evotok.api import TokenizerLoadError
    from evotok.data import DataError
    from evotok.errors import USER_ERRORS, UserError
    from evotok.models.teacher import TeacherError
    from evotok.runs import RunError

    for err in (TokenizerLoadError, DataError, TeacherError, RunError):
        assert issubclass(err, UserError) and issubclass(err, USER_ERRORS)
    # a checkpoint that is not a tokenizer's: one line naming the file, status 1
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    import torch

    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt_dir / "last.ckpt")
    assert main(["encode", "--run", str(tmp_path / "run"), "--images", str(tmp_path), "--out", str(tmp_path / "c.npz")]) == 1
    err = capsys.readouterr().err
    assert "last.ckpt is not a tokenizer checkpoint" in err and "Traceback" not in err

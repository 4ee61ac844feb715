"""environment.yml, pyproject.toml and constraints.txt describe one environment."""

from __future__ import annotations

import re
import tomllib

import yaml

from evotok.config import REPO_ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_agrees_with_pyproject_and_constraints():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(d): d.replace(" ", "") for d in project["dependencies"]}
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-c constraints.txt" in pip_section, "environment.yml must install under constraints.txt"
    assert "-e ." in pip_section
    env_deps = {_name(d): d.replace(" ", "") for d in pip_section if not d.startswith("-")}
    assert env_deps == deps, f"differs: {set(env_deps.items()) ^ set(deps.items())}"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    major_minor = python.split("=")[1]
    assert tuple(map(int, major_minor.split("."))) >= tuple(map(int, project["requires-python"][2:].split(".")))


def test_constraints_pin_torch_everywhere():
    pins = {
        _name(line): line.strip()
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert pins == {"torch": "torch==2.14.1", "torchvision": "torchvision==0.29.1"}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(d): d for d in project["dependencies"]}
    for name, pin in pins.items():
        assert deps[name] == pin
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert makefile.count("-c constraints.txt") >= 2  # every pip install in setup runs under the pins


def test_installed_torch_matches_pin():
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == "2.14.1"
    assert torchvision.__version__.split("+")[0] == "0.29.1"


def test_installed_majors_are_inside_the_tested_pins():
    """Lightning, transformers, tokenizers, torchmetrics and open_clip are pinned to the ranges the tests ran on."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(d).name.lower().replace("_", "-"): Requirement(d) for d in project["dependencies"]}
    for name in ("lightning", "transformers", "tokenizers", "torchmetrics", "open-clip-torch"):
        spec = reqs[name].specifier
        assert "<" in str(spec), f"{name} has no upper bound: {spec}"
        assert spec.contains(version(name)), f"installed {name} {version(name)} is outside {spec}"


def test_wheel_ships_the_experiment_files(tmp_path):
    """A non-editable install finds configs and pipelines inside the package (evotok/_experiments)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    for name in ("evotok", "analysis", "experiments"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("evotok-*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import evotok.config as c, evotok.pipeline as p; print(c.resolve_config_path('tokenizer/evotok_tiny')); "
            "print(','.join(p.PIPELINES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0] == str(tmp_path / "site" / "evotok" / "_experiments" / "configs" / "tokenizer" / "evotok_tiny.yaml")
    assert "demo" in out[1].split(",")

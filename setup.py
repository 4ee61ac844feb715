"""Build hook: the experiment configs, pipelines and sweeps (top-level ``experiments/``) ship inside the
installed package as ``evotok/_experiments``, so ``evotok train ... --config tokenizer/evotok_tiny`` works from
a non-editable install too (evotok.config.experiment_dirs looks in the checkout first, then there). All
metadata lives in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KINDS = ("configs", "pipelines", "sweeps")


class BuildPyWithExperiments(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's experiments/
            return
        src = Path(__file__).resolve().parent / "experiments"
        dst = Path(self.build_lib) / "evotok" / "_experiments"
        for kind in KINDS:
            if (src / kind).is_dir():
                shutil.copytree(src / kind, dst / kind, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithExperiments})

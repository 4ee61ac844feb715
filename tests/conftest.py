"""Shared test setup: hermetic (no network), CPU, seeded, few threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded; one intra-op thread: the test models are tiny, one thread is as fast, and two OpenMP threads
    per process collapse (up to 10x slower) when the 2-core machine is shared."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_teacher():
    """The tiny open_clip teacher with seeded random weights (no training, no files)."""
    from evotok.config import load_config
    from evotok.models.teacher import load_teacher

    return load_teacher(load_config(None, ["teacher.random_init=true"]))


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests where CUDA is absent, with a reason."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_DATA = ["data.train_size=96", "data.val_size=32", "data.test_size=32", "data.batch_size=16", "trainer.threads=1",
             "trainer.progress_bar=false"]


@pytest.fixture(scope="session")
def mllm_base(tmp_path_factory):
    """One tiny tokenizer run (random teacher, Lpix=2, Lsem=3, 2 steps) and one stand-in LM run (12 steps), shared
    by the understanding and generation tests: ``{"common": overrides, "tok": RunDir, "lm": RunDir}``."""
    from evotok.config import load_config
    from evotok.lit.train import train

    root = tmp_path_factory.mktemp("mllm")
    common = [f"run.dir={root / 'runs'}", f"data.cache_dir={root / 'cache'}", *TINY_DATA]
    tok = train(load_config("tokenizer/evotok_tiny", [*common, "run.name=t", "teacher.run=", "teacher.random_init=true",
                                                       "teacher.cache_features=false", "trainer.max_steps=2",
                                                       "trainer.val_every_n_steps=2", "trainer.image_log_every_n_steps=0",
                                                       "model.lpix=2", "model.lsem=3"], stage="tokenizer"), "tokenizer")
    lm = train(load_config("lm/tiny", [*common, "run.name=lm", "trainer.max_steps=12", "trainer.val_every_n_steps=12",
                                       "lm.vocab_size=400", "trainer.limit_val_batches=2"], stage="lm"), "lm")
    return {"root": root, "common": common, "tok": tok, "lm": lm}

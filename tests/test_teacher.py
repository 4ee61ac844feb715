"""The teacher: open_clip registration, features, loading (no network), and a short training run."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from evotok.config import load_config
from evotok.models.teacher import (
    OPEN_CLIP_CONFIGS,
    TeacherError,
    export_weights,
    load_teacher,
    register_open_clip_configs,
    teacher_from_run,
    zero_shot_accuracy,
)

ARCH = "evotok-teacher-tiny-avg"


@pytest.fixture
def teacher(random_teacher):
    return random_teacher


def test_registered_with_open_clip_idempotently():
    import open_clip
    from open_clip import factory

    register_open_clip_configs()
    n_paths = len(factory._MODEL_CONFIG_PATHS)
    register_open_clip_configs()
    assert len(factory._MODEL_CONFIG_PATHS) == n_paths
    assert open_clip.get_model_config(ARCH) == OPEN_CLIP_CONFIGS[ARCH]


def test_image_features_are_the_penultimate_block_patch_tokens(teacher):
    x = torch.rand(3, 3, 32, 32)
    feats = teacher.image_features(x)
    gh, gw = teacher.token_grid
    assert (gh, gw) == (4, 4)  # 32 px, patch 8
    assert feats.shape == (3, gh * gw, teacher.width) == (3, 16, 128)
    # manual pass: embeddings, then every block but the last; drop CLS
    v = teacher.visual
    h = v._embeds(teacher.preprocess(x))
    for block in v.transformer.resblocks[:-1]:
        h = block(h)
    assert torch.allclose(feats, h[:, 1:], atol=1e-5)
    # and not the last block's output
    assert not torch.allclose(feats, v.transformer.resblocks[-1](h)[:, 1:], atol=1e-3)
    out = teacher.encode(x)
    assert torch.allclose(out.tokens_BTc, feats, atol=1e-6)
    assert torch.allclose(out.pooled_BE, teacher.pooled(x), atol=1e-6)


def test_default_teacher_pools_by_averaging_the_patch_tokens(teacher):
    """The embedded default is mean-pooled (its patch tokens carry the semantics); the CLS token is not used."""
    x = torch.rand(3, 3, 32, 32)
    v = teacher.visual
    h = v.transformer(v._embeds(teacher.preprocess(x)))
    by_mean = torch.nn.functional.normalize(v.ln_post(h)[:, 1:].mean(1) @ v.proj, dim=-1)
    by_cls = torch.nn.functional.normalize(v.ln_post(h)[:, 0] @ v.proj, dim=-1)
    assert torch.allclose(teacher.pooled(x), by_mean, atol=1e-5)
    assert not torch.allclose(teacher.pooled(x), by_cls, atol=1e-3)


def test_pooled_and_text_are_unit_norm_and_inputs_are_normalised_inside(teacher):
    x = torch.rand(4, 3, 32, 32)
    p = teacher.pooled(x)
    assert p.shape == (4, teacher.embed_dim)
    assert torch.allclose(p.norm(dim=-1), torch.ones(4), atol=1e-5)
    t = teacher.encode_text(["two stars", "one circle"])
    assert t.shape == (2, teacher.embed_dim)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    expected = (x - teacher.mean) / teacher.std
    assert torch.allclose(teacher.preprocess(x), expected)
    assert teacher.preprocess(torch.rand(1, 3, 64, 64)).shape[-2:] == (32, 32)  # other sizes are resized


def test_frozen_teacher_stays_in_eval_without_gradients(teacher):
    parent = torch.nn.Module()
    parent.teacher = teacher
    parent.train()
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_token_table_returns_the_teacher_tokens_of_each_item_index(teacher):
    from evotok.models.teacher import TokenTable

    torch.manual_seed(0)
    images = torch.rand(10, 3, 32, 32)
    index = torch.tensor([7, 2, 9, 0, 4, 11, 3, 8, 1, 5])  # item indices, not positions; 6 and 10 missing
    table = TokenTable.build(teacher.image_features, [{"image": images[:6], "index": index[:6]}, {"image": images[6:], "index": index[6:]}], size=12)
    assert len(table) == 10 and table.nbytes == 12 * 16 * 128 * 2
    with torch.no_grad():
        want = teacher.image_features(images[[8, 0, 5]])
    got = table[torch.tensor([1, 7, 11])]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # stored in float16
    with pytest.raises(KeyError, match="not all in the table"):
        table[torch.tensor([1, 6])]
    with pytest.raises(KeyError):
        table[torch.tensor([12])]


def test_missing_weights_file_names_path_and_key(tmp_path):
    missing = tmp_path / "nowhere" / "clip.pt"
    cfg = load_config(None, [f"teacher.weights={missing}"])
    with pytest.raises(FileNotFoundError) as e:
        load_teacher(cfg)
    msg = str(e.value)
    assert str(missing) in msg and "teacher.weights" in msg and "evotok train teacher" in msg


def test_no_teacher_configured_says_how_to_get_one():
    with pytest.raises(TeacherError) as e:
        load_teacher(load_config(None, []))
    assert "evotok train teacher --config teacher/tiny" in str(e.value) and "teacher.run=" in str(e.value)


def test_missing_run_folder_names_the_key(tmp_path):
    with pytest.raises(TeacherError) as e:
        load_teacher(load_config(None, [f"teacher.run={tmp_path / 'no_run'}"]))
    assert "teacher.run" in str(e.value) and str(tmp_path / "no_run") in str(e.value)
    assert "evotok train teacher" in str(e.value)


def test_local_weights_round_trip_without_network(teacher, tmp_path, monkeypatch):
    path = export_weights(teacher, tmp_path / "teacher.pt")

    def no_network(*args, **kwargs):
        raise AssertionError("the teacher must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = load_teacher(load_config(None, [f"teacher.arch={ARCH}", f"teacher.weights={path}"]))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.image_features(x), teacher.image_features(x))
    assert torch.equal(loaded.pooled(x), teacher.pooled(x))


# -------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from evotok.lit.train import train

    root = tmp_path_factory.mktemp("teacher")
    cfg = load_config("teacher/tiny", [
        f"run.dir={root / 'runs'}", "run.name=t", f"data.cache_dir={root / 'cache'}",
        "data.train_size=640", "data.val_size=128", "data.test_size=32", "data.batch_size=32",
        "trainer.max_steps=40", "trainer.val_every_n_steps=40", "trainer.threads=1",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=10", "optim.warmup_steps=5",
    ])
    run = train(cfg, "teacher")
    return cfg, run


def _clip_loss(teacher, batch):
    from open_clip.loss import ClipLoss

    with torch.no_grad():
        img = teacher.pooled(batch["image"])
        txt = teacher.encode_text(batch["caption_sem"])
        return float(ClipLoss()(img, txt, teacher.logit_scale.exp()))


def test_short_training_lowers_loss_and_writes_metrics(trained_run):
    from evotok.data.datamodule import EvoTokDataModule
    from evotok.lit.teacher_module import build
    from evotok.runs import read_metrics

    cfg, run = trained_run
    assert run.best_ckpt.is_file() and run.last_ckpt.is_file()
    metrics = read_metrics(run)
    assert metrics["stage"] == "teacher"
    for key in ("zeroshot_shape", "zeroshot_count", "chance_shape", "chance_count", "val/zeroshot_shape"):
        assert key in metrics["scalars"]
    assert metrics["scalars"]["chance_shape"] == pytest.approx(1 / 8)
    assert 0.0 <= metrics["scalars"]["zeroshot_shape"] <= 1.0
    # one validation, at the last step, so best.ckpt is that step: the final eval reads what validation read
    for f in ("shape", "count"):
        assert metrics["scalars"][f"zeroshot_{f}"] == pytest.approx(metrics["scalars"][f"val/zeroshot_{f}"])

    dm = EvoTokDataModule(cfg, stage="teacher")
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(cfg.run.seed)
    initial = build(cfg, {}).teacher.eval()
    trained = teacher_from_run(run.path).freeze()
    assert _clip_loss(trained, batch) < _clip_loss(initial, batch) - 0.1

    # the checkpoint carries the resolved config
    hp = torch.load(run.best_ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["config"]["teacher"]["arch"] == ARCH


def test_reload_from_run_folder_is_deterministic_and_matches_metrics(trained_run):
    from evotok.data.datamodule import EvoTokDataModule

    cfg, run = trained_run
    a = load_teacher(load_config(None, [f"teacher.run={run.path}"]))
    b = load_teacher(load_config(None, [f"teacher.run={run.best_ckpt}"]))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(a.image_features(x), b.image_features(x))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    dm = EvoTokDataModule(cfg, stage="teacher")
    dm.prepare_data()
    dm.setup("validate")
    acc = zero_shot_accuracy(a, dm.val_dataloader())
    stored = json.loads(run.metrics.read_text())["scalars"]
    assert acc["shape"] == pytest.approx(stored["zeroshot_shape"])
    assert acc["count"] == pytest.approx(stored["zeroshot_count"])


def test_final_eval_of_a_64px_teacher_uses_its_presets_classes(tmp_path):
    """The end-of-run zero-shot eval classifies over the run's data.preset (12 shapes on evoshapes64), as
    validation does: with the default preset's 8 shapes, a third of the val images could never be right."""
    from evotok.data.datamodule import EvoTokDataModule
    from evotok.lit.train import train
    from evotok.runs import read_metrics

    cfg = load_config("teacher/tiny64", [
        f"run.dir={tmp_path / 'runs'}", "run.name=t64", f"data.cache_dir={tmp_path / 'cache'}",
        "data.train_size=64", "data.val_size=96", "data.test_size=16", "data.batch_size=32",
        "trainer.max_steps=6", "trainer.val_every_n_steps=6", "trainer.threads=1",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=2", "optim.warmup_steps=2",
    ])
    run = train(cfg, "teacher")
    scalars = read_metrics(run)["scalars"]
    assert scalars["chance_shape"] == pytest.approx(1 / 12)
    assert scalars["zeroshot_shape"] == pytest.approx(scalars["val/zeroshot_shape"])
    dm = EvoTokDataModule(cfg, stage="teacher")
    dm.prepare_data()
    dm.setup("validate")
    trained = teacher_from_run(run.path).freeze()
    acc = zero_shot_accuracy(trained, dm.val_dataloader(), preset="evoshapes64")
    assert scalars["zeroshot_shape"] == pytest.approx(acc["shape"])
    assert scalars["zeroshot_count"] == pytest.approx(acc["count"])


def test_teacher_schedule_comes_from_the_shared_optim_section():
    from evotok.config import ConfigError, to_dict
    from evotok.lit.teacher_module import TeacherModule

    cfg = load_config("teacher/tiny", ["optim.schedule=cosine", "trainer.max_steps=100"], stage="teacher")
    module = TeacherModule(to_dict(cfg, "teacher"))
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.lr_lambdas[0](0) == pytest.approx(1 / 100)  # optim.warmup_steps=100 in teacher/tiny
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=linearly"], stage="teacher")


def test_random_init_teacher_is_the_same_on_every_load():
    import torch

    from evotok.config import load_config
    from evotok.models.teacher import load_teacher

    cfg = load_config(None, ["teacher.random_init=true"])
    torch.manual_seed(1)
    a = load_teacher(cfg)
    torch.manual_seed(2)
    b = load_teacher(cfg)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(a.image_features(x), b.image_features(x))

"""A 30-step tiny tokenizer training run: the loss goes down, step semantics with two optimisers,
checkpoint reload, and the clear errors (missing teacher weights, other Lpix/Lsem, wrong resolution)."""

from __future__ import annotations

import json

import pytest
import torch

from evotok.api import TokenizerLoadError, load_tokenizer
from evotok.config import load_config
from evotok.runs import RunDir

STEPS, GAN_START = 30, 25


def tiny_overrides(tmp_path, name: str = "t", steps: int = STEPS) -> list[str]:
    return [
        f"run.dir={tmp_path / 'runs'}", f"run.name={name}", "run.seed=0", "teacher.run=", "teacher.random_init=true",
        f"data.cache_dir={tmp_path / 'cache'}", "data.train_size=512", "data.val_size=64", "data.test_size=16",
        "data.batch_size=16", "model.quantizer.codebook_size=64", "optim.lr=2e-3", f"trainer.max_steps={steps}",
        f"trainer.val_every_n_steps={steps}", f"trainer.ckpt_every_n_steps={steps}", "trainer.log_every_n_steps=1",
        f"trainer.image_log_every_n_steps={steps - 1}", "trainer.progress_bar=false", "trainer.threads=1",
        # the GAN switches on for the last steps: its optimiser must not advance trainer.global_step
        f"loss.gan_start={GAN_START}", "loss.gan_weight=0.01",
    ]


def scalar_series(run: RunDir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.tb), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)], acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from evotok.lit.train import train

    tmp = tmp_path_factory.mktemp("tok")
    cfg = load_config("tokenizer/evotok_tiny", tiny_overrides(tmp))
    run = train(cfg, "tokenizer")
    return cfg, run


def test_training_lowers_reconstruction_loss(trained):
    import lightning as L

    from evotok.data.datamodule import EvoTokDataModule
    from evotok.lit.tokenizer_module import build

    cfg, run = trained
    recon, _ = scalar_series(run, "train/recon")
    assert len(recon) == STEPS  # logged once per batch: one generator step per batch
    assert all(v == v for v in recon)
    # noisy per-batch values: compare windows before the GAN switches on (it perturbs the reconstruction at first)
    assert sum(recon[GAN_START - 8:GAN_START]) / 8 < 0.9 * sum(recon[:4]) / 4, recon
    # the whole val split: the trained tokenizer against the same tokenizer before training (same seed)
    L.seed_everything(cfg.run.seed, verbose=False)
    before = build(cfg, {}).eval()
    dm = EvoTokDataModule(cfg, stage="tokenizer")
    dm.prepare_data()
    dm.setup("fit")
    with torch.no_grad():
        errs = [(before.model(b["image"]).recon.clamp(0, 1) - b["image"]).pow(2).flatten(1).mean(1) for b in dm.val_dataloader()]
    mse_before = torch.cat(errs).mean().item()
    mse_after = json.loads(run.metrics.read_text())["scalars"]["val/mse"]
    assert mse_after < 0.7 * mse_before, (mse_before, mse_after)


def test_max_steps_counts_generator_steps(trained):
    _, run = trained
    ckpt = torch.load(run.last_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    disc, acc = scalar_series(run, "train/disc")
    assert len(disc) == STEPS - GAN_START  # the discriminator trained on every batch once the GAN was on
    metrics = json.loads(run.metrics.read_text())
    assert metrics["step"] == STEPS
    assert len(metrics["per_depth"]["usage"]) == 16 and 0 < min(metrics["per_depth"]["usage"]) <= 1
    assert "val/psnr" in metrics["scalars"] and metrics["scalars"]["val/psnr"] > 5
    assert any(t.startswith("recon/") for t in acc.Tags()["images"])
    # optim.schedule=linear with optim.cooldown=0.3 (the tiny configs): constant lr, then linear towards 0
    # over the last 30% of trainer.max_steps
    lrs, _ = scalar_series(run, "train/lr")
    lr, cool = 2e-3, 0.3
    assert lrs[: int(STEPS * (1 - cool))] == pytest.approx([lr] * int(STEPS * (1 - cool)))
    assert lrs[-1] == pytest.approx(lr * (1 / STEPS) / cool, rel=1e-4) and lrs == sorted(lrs, reverse=True)
    # frozen modules are not stored; the generator and the discriminator are
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("model.quantizer.codebooks_LKd") for k in keys) and any(k.startswith("disc.") for k in keys)
    assert ckpt["hyper_parameters"]["config"]["model"]["lsem"] == 16


def test_checkpoint_reload_gives_identical_codes(trained):
    from evotok.lit.tokenizer_module import TokenizerModule

    _, run = trained
    torch.manual_seed(1)
    x = torch.rand(6, 3, 32, 32)
    module = TokenizerModule.load_from_checkpoint(str(run.last_ckpt), map_location="cpu").eval()
    a = load_tokenizer(run.last_ckpt)
    b = load_tokenizer(run.path)  # the run folder: best.ckpt (same step here)
    assert not a.training
    with torch.no_grad():
        codes = module.model.encode(x)
        assert torch.equal(codes, a.encode(x)) and torch.equal(codes, b.encode(x))
        assert torch.equal(a.encode(x), a.encode(x))  # eval mode: no codebook updates
        torch.testing.assert_close(module.model.decode_pixels(codes), a.decode_pixels(codes), rtol=0, atol=0)


def test_reload_with_other_lpix_lsem_fails_clearly(trained):
    _, run = trained
    with pytest.raises(TokenizerLoadError, match=r"model\.lpix=4.*model\.lpix=16"):
        load_tokenizer(run.path, lpix=16, lsem=4)
    with pytest.raises(TokenizerLoadError, match=r"model\.preset='tiny'.*model\.preset='paper'"):
        load_tokenizer(run.path, preset="paper")
    assert load_tokenizer(run.path, preset="tiny", lpix=4, lsem=16).lsem == 16


def test_wrong_resolution_fails_clearly(trained):
    _, run = trained
    model = load_tokenizer(run.path)
    with pytest.raises(ValueError, match=r"data\.resolution=32"):
        model.encode(torch.rand(2, 3, 48, 48))


def test_missing_teacher_weights_file_fails_clearly(tmp_path):
    from evotok.lit.tokenizer_module import build

    missing = tmp_path / "no_such_teacher.pt"
    cfg = load_config("tokenizer/evotok_tiny", ["teacher.run=", "teacher.random_init=false", f"teacher.weights={missing}"])
    with pytest.raises(FileNotFoundError, match="teacher.weights") as e:
        build(cfg, {})
    assert str(missing) in str(e.value)


def test_bf16_mixed_precision_runs(tmp_path):
    """bf16-mixed (the paper setting on GPU) through the same code path, here with CPU autocast."""
    from evotok.lit.train import train

    cfg = load_config("tokenizer/evotok_tiny", tiny_overrides(tmp_path, "bf16", steps=2) + [
        "trainer.precision=bf16-mixed", "loss.gan_start=1", "data.train_size=32",
        "data.val_size=16", "data.batch_size=8", "trainer.image_log_every_n_steps=1",
    ])
    run = train(cfg, "tokenizer")
    scalars = json.loads(run.metrics.read_text())["scalars"]
    assert scalars["val/psnr"] == scalars["val/psnr"] and "train/disc" in scalars
    assert torch.load(run.last_ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


def test_run_killed_mid_epoch_resumes_on_the_next_batch(tmp_path, monkeypatch):
    """Stopped after step 8 (mid-epoch) and resumed to 12, training sees the batches an uninterrupted
    12-step run sees: the train loader's position is in the checkpoint."""
    from evotok.lit import tokenizer_module
    from evotok.lit.train import train

    seen: list[list[int]] = []
    step = tokenizer_module.TokenizerModule.training_step

    def spy(self, batch, batch_idx):
        seen.append(batch["index"].tolist())
        return step(self, batch, batch_idx)

    monkeypatch.setattr(tokenizer_module.TokenizerModule, "training_step", spy)
    extra = ["trainer.ckpt_every_n_steps=4", "loss.gan_start=1000"]
    run = train(load_config("tokenizer/evotok_tiny", tiny_overrides(tmp_path, "killed", steps=8) + extra), "tokenizer")
    ckpt = torch.load(run.last_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"served": 8}]
    (run.path / "FINISHED").unlink()  # as if the process had been killed after the step-8 checkpoint
    train(load_config("tokenizer/evotok_tiny", tiny_overrides(tmp_path, "killed", steps=12) + extra), "tokenizer")
    stopped_and_resumed, seen[:] = list(seen), []
    train(load_config("tokenizer/evotok_tiny", tiny_overrides(tmp_path, "whole", steps=12) + extra), "tokenizer")
    assert len(seen) == 12 and len({i for b in seen for i in b}) == 12 * 16  # 32 batches per epoch: mid-epoch
    assert stopped_and_resumed == seen


def test_cached_teacher_tokens_train_like_computed_ones(tmp_path, capsys):
    """teacher.cache_features (on in the tiny configs) looks the frozen teacher's tokens up by item index:
    the same training as computing them every step, up to their float16 storage."""
    from evotok.lit.train import train

    series = {}
    for cached in (True, False):
        cfg = load_config("tokenizer/evotok_tiny", tiny_overrides(tmp_path, f"cache_{cached}", steps=4) + [
            f"teacher.cache_features={str(cached).lower()}",
        ])
        series[cached], _ = scalar_series(train(cfg, "tokenizer"), "train/sem")
        out = capsys.readouterr().out
        assert ("teacher tokens of 512 train images cached" in out) == cached
    assert len(series[True]) == 4
    assert series[True][0] == pytest.approx(series[False][0], rel=2e-4)  # same weights: only the float16 targets differ
    assert series[True] == pytest.approx(series[False], rel=5e-3)  # then the updates differ that little


@pytest.mark.slow  # part of make test, not of make test-fast
def test_two_runs_of_one_config_give_identical_losses(tmp_path):
    """The schedule is a function of the step and the data order of (data.seed, epoch): the same config and
    seed give the same loss at every logged step, whatever the machine's speed."""
    from evotok.lit.train import train

    series = []
    for name in ("a", "b"):
        over = tiny_overrides(tmp_path, name, steps=60) + ["loss.gan_start=1000", "data.train_size=256",
                                                            "trainer.image_log_every_n_steps=0"]
        run = train(load_config("tokenizer/evotok_tiny", over, stage="tokenizer"), "tokenizer")
        series.append({tag: scalar_series(run, tag)[0] for tag in ("train/loss", "train/lr", "train/recon")})
    assert len(series[0]["train/loss"]) == 60
    assert series[0] == series[1]  # bit for bit
    assert series[0]["train/lr"][-1] < series[0]["train/lr"][0]  # the cool-down ran, by step


def _old_format(config: dict) -> dict:
    """A tokenizer config as the suite saved it before per-stage sections and step-based schedules."""
    import copy

    old = copy.deepcopy(config)
    for section in ("tokenizer", "mllm", "understanding", "gen", "checker"):
        old.pop(section, None)
    old["teacher"]["lr_schedule"] = "cosine"
    for k in ("schedule", "min_lr_ratio", "group_lr"):
        old["optim"].pop(k, None)
    old["optim"]["disc_lr"] = 1e-4
    old["trainer"].pop("loggers", None)
    old["lm"] = {"preset": "tiny", "path": ""}
    return old


def test_checkpoint_from_before_the_stage_sections_loads(trained, tmp_path):
    from evotok.config import to_dict

    cfg, run = trained
    ckpt = torch.load(run.last_ckpt, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"] = _old_format(to_dict(cfg))
    ckpt.pop("evotok", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = load_tokenizer(tmp_path / "old.ckpt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old.encode(x), load_tokenizer(run.last_ckpt).encode(x))
    assert old.config.optim.schedule == "linear" and old.config.optim.group_lr == {"disc": 1e-4}
    # a key this version cannot map fails naming it and saying how to convert the checkpoint
    ckpt["hyper_parameters"]["config"]["model"]["decoder_kind"] = "vqgan"
    torch.save(ckpt, tmp_path / "odd.ckpt")
    with pytest.raises(Exception, match=r"model\.decoder_kind.*hyper_parameters\['config'\]"):
        load_tokenizer(tmp_path / "odd.ckpt")


def test_an_upstream_that_fails_to_load_leaves_no_run_folder(tmp_path):
    from evotok.handover import UpstreamError
    from evotok.lit.train import train
    from evotok.runs import CheckpointError

    over = tiny_overrides(tmp_path, "orphan", steps=2)
    with pytest.raises(UpstreamError, match="teacher.run"):
        train(load_config("tokenizer/evotok_tiny", over + ["teacher.random_init=false", f"teacher.run={tmp_path / 'none'}"]),
              "tokenizer")
    bad = tmp_path / "runs" / "teacher" / "broken" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "last.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="last.ckpt is not a checkpoint"):
        train(load_config("tokenizer/evotok_tiny", over + ["teacher.random_init=false", f"teacher.run={bad.parent}"]),
              "tokenizer")
    assert not (tmp_path / "runs" / "tokenizer" / "orphan").exists()

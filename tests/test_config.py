"""Config system: merge order, validation, error messages naming the key and the suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from evotok.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    accumulate_steps,
    from_dict,
    load_config,
    resolve_config_path,
    to_dict,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_chain_resolves_in_order_with_overrides_last(tmp_path):
    from evotok.config import experiment_layers

    (tmp_path / "sub").mkdir()
    _write(tmp_path / "a.yaml", "model:\n  lpix: 1\n  lsem: 2\ndata:\n  batch_size: 4\n")
    _write(tmp_path / "sub" / "b.yaml", "extends: ../a\nmodel:\n  lsem: 3\ndata:\n  resolution: 64\n")
    _write(tmp_path / "c.yaml", "defaults: [a, sub/b]\nmodel:\n  lpix: 5\n")
    c = tmp_path / "c.yaml"
    layers = [Path(src).name for src, _ in experiment_layers(str(c))]
    assert layers == ["a.yaml", "a.yaml", "b.yaml", "c.yaml"]  # parents first, each parent's own parents first
    cfg = load_config(str(c), ["data.resolution=48"], stage="tokenizer")
    assert (cfg.model.lpix, cfg.model.lsem, cfg.data.batch_size, cfg.data.resolution) == (5, 3, 4, 48)


def test_extends_cycle_is_a_clear_error(tmp_path):
    _write(tmp_path / "x.yaml", "extends: y\nmodel:\n  lpix: 1\n")
    _write(tmp_path / "y.yaml", "extends: x\n")
    with pytest.raises(ConfigError, match=r"cycle: .*x.yaml -> .*y.yaml -> .*x.yaml"):
        load_config(str(tmp_path / "x.yaml"))
    _write(tmp_path / "z.yaml", "extends: nowhere\n")
    with pytest.raises(ConfigError, match="config 'nowhere' not found"):
        load_config(str(tmp_path / "z.yaml"))


def test_tiny_tokenizer_configs_are_one_base_plus_the_attach_points():
    for name, (lpix, lsem) in {"entangled_tiny": (4, 4), "sem2pix_tiny": (16, 4)}.items():
        text = (CONFIG_DIR / "tokenizer" / f"{name}.yaml").read_text()
        keys = [ln.split(":")[0].strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert keys == ["extends", "model", "lpix", "lsem"], keys
        cfg = load_config(f"tokenizer/{name}", stage="tokenizer")
        assert (cfg.model.lpix, cfg.model.lsem) == (lpix, lsem)


def test_base_yaml_repeats_no_schema_default():
    from omegaconf import OmegaConf

    from evotok.config import get_key, leaf_paths

    tree = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "base.yaml")) or {}
    for path in leaf_paths(tree):
        assert get_key(Config(), path) != get_key(load_config(None), path), f"base.yaml repeats the default of {path}"
        assert path.split(".")[0] in ("data", "trainer", "run"), f"base.yaml sets {path}, which not every stage reads"


@pytest.mark.parametrize("stage,key", [("teacher", "model.lpix"), ("teacher", "teacher.run"), ("tokenizer", "mllm.phase"),
                                       ("lm", "lm.path"), ("understanding", "model.lsem"), ("checker", "gen.cfg_scale")])
def test_a_key_the_stage_does_not_read_names_key_and_stage(stage, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=1"], stage=stage)
    assert f"config key '{key}'" in str(e.value) and f"is not read by stage '{stage}'" in str(e.value)
    load_config(None, [f"{key}=1"] if key != "teacher.run" else [])  # without a stage every schema key is accepted


def test_configs_resolve_from_the_installed_copy_or_say_where_they_looked(tmp_path, monkeypatch):
    from evotok import config as config_mod

    installed = tmp_path / "_experiments"
    (installed / "configs" / "tokenizer").mkdir(parents=True)
    (installed / "configs" / "tokenizer" / "only_here.yaml").write_text("model:\n  lpix: 3\n")
    monkeypatch.setattr(config_mod, "REPO_ROOT", tmp_path / "no_checkout")
    monkeypatch.setattr(config_mod, "PACKAGED_EXPERIMENTS", installed)
    assert resolve_config_path("tokenizer/only_here") == installed / "configs" / "tokenizer" / "only_here.yaml"
    with pytest.raises(ConfigError) as e:
        resolve_config_path("tokenizer/elsewhere")
    assert str(installed / "configs") in str(e.value)


def test_merge_order_schema_base_experiment_cli(tmp_path):
    base = _write(tmp_path / "base.yaml", "model:\n  lpix: 5\n  lsem: 6\ndata:\n  batch_size: 8\n")
    exp = _write(tmp_path / "exp.yaml", "model:\n  lsem: 7\ndata:\n  resolution: 64\n")
    cfg = load_config(str(exp), ["data.resolution=48"], base=base)
    assert cfg.model.lpix == 5  # base over schema
    assert cfg.model.lsem == 7  # experiment over base
    assert cfg.data.batch_size == 8  # base, untouched by experiment
    assert cfg.data.resolution == 48  # command line over experiment
    assert cfg.model.quantizer.ema_decay == Config().model.quantizer.ema_decay  # schema default
    assert cfg.depth == 7


def test_derived_depth_follows_lpix_lsem():
    assert load_config(None, ["model.lpix=4", "model.lsem=16"]).depth == 16
    assert load_config(None, ["model.lpix=16", "model.lsem=4"]).depth == 16
    assert load_config(None, ["model.lpix=4", "model.lsem=4"]).depth == 4


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("model.quantizer.codebok_size=3", "model.quantizer.codebok_size", "model.quantizer.codebook_size"),
        ("model.lpx=3", "model.lpx", "model.lpix"),
        ("trainer.max_step=3", "trainer.max_step", "trainer.max_steps"),
        ("dat.batch_size=3", "dat.batch_size", "data.batch_size"),
    ],
)
def test_unknown_key_names_key_and_closest(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and f"did you mean '{suggestion}'" in msg


def test_unknown_key_in_experiment_file_names_file(tmp_path):
    exp = _write(tmp_path / "exp.yaml", "model:\n  quantizer:\n    codebooksize: 12\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(exp))
    assert "model.quantizer.codebooksize" in str(e.value) and str(exp) in str(e.value)
    assert "model.quantizer.codebook_size" in str(e.value)


def test_wrong_type_names_full_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.batch_size=abc"])
    assert "'data.batch_size'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.quantizer.ema_decay=fast"])
    assert "'model.quantizer.ema_decay'" in str(e.value)


@pytest.mark.parametrize("key", ["model.quantizer.depth", "model.depth"])
def test_derived_key_cannot_be_set(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=8"])
    assert key in str(e.value) and "max(model.lpix, model.lsem)" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.quantizer.impl=fast", "model.quantizer.impl"),
        ("model.lpix=0", "model.lpix"),
        ("model.quantizer.ema_decay=1.5", "model.quantizer.ema_decay"),
        ("data.source=imagenet", "data.source"),
        ("data.heldout_fraction=1.0", "data.heldout_fraction"),
        ("optim.cooldown=0.5", "optim.cooldown"),  # needs optim.schedule=linear
        ("optim.schedule=wsd", "optim.schedule"),
        ("optim.group_lr.lm=-1", "optim.group_lr.lm"),
        ("trainer.loggers=[tensorboard,mlflow]", "trainer.loggers"),
        ("optim.betas=[0.9]", "optim.betas"),
    ],
)
def test_bad_values_name_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.lpix"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["=3"])


def test_override_values_are_typed():
    cfg = load_config(None, ["optim.betas=[0.5,0.6]", "trainer.devices=2", "run.overwrite=true", "teacher.run=a/b"])
    assert cfg.optim.betas == [0.5, 0.6] and cfg.trainer.devices == 2 and cfg.run.overwrite is True
    assert cfg.teacher.run == "a/b"


def test_config_name_lookup_and_missing_name():
    assert resolve_config_path("base") == CONFIG_DIR / "base.yaml"
    with pytest.raises(ConfigError) as e:
        resolve_config_path("tokenizer/evotok_tinny")
    assert "tokenizer/evotok_tinny" in str(e.value)


def test_global_batch_size_derives_accumulation():
    cfg = load_config(None, ["data.batch_size=16", "trainer.global_batch_size=64"])
    assert accumulate_steps(cfg) == 4
    with pytest.raises(ConfigError, match="trainer.global_batch_size"):
        load_config(None, ["data.batch_size=16", "trainer.global_batch_size=40"])


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.lpix=3", "data.resolution=64"])
    assert from_dict(to_dict(cfg)) == cfg


def test_two_core_defaults():
    cfg = load_config(None)
    assert cfg.data.num_workers <= 1 and cfg.trainer.threads <= 2


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_experiment_yaml_resolves(path):
    cfg = load_config(str(path))
    assert cfg.depth == max(cfg.model.lpix, cfg.model.lsem)


def test_with_overrides_checks_like_the_command_line():
    from evotok.config import with_overrides

    cfg = load_config(None)
    new = with_overrides(cfg, ["data.source=realphotos", "data.resolution=64"])
    assert new.data.source == "realphotos" and new.data.resolution == 64 and cfg.data.source == "evoshapes"
    assert with_overrides(cfg, []) is cfg
    with pytest.raises(ConfigError, match="did you mean 'data.source'"):
        with_overrides(cfg, ["data.sourc=folder"])
    with pytest.raises(ConfigError, match="'data.source'"):
        with_overrides(cfg, ["data.source=imagenet"])


def test_cached_teacher_tokens_refuse_augmented_images():
    with pytest.raises(ConfigError, match=r"teacher\.cache_features.*data\.augment"):
        load_config(None, ["teacher.cache_features=true", "data.augment=true"])
    assert load_config(None, ["teacher.cache_features=true"]).teacher.cache_features


def test_global_batch_accumulation_reads_device_lists_and_strings_as_lightning_does():
    from evotok.config import _num_devices, accumulate_steps

    assert [_num_devices(v) for v in (1, 4, [0, 1, 2], "0,1", "3", "auto", -1, "-1")] == [1, 4, 3, 2, 3, None, None, None]
    cfg = load_config(None, ["data.batch_size=8", "trainer.global_batch_size=64", "trainer.devices=[0,1]"])
    assert accumulate_steps(cfg) == 4  # 64 / (8 x 2)
    # devices=auto on this CPU machine: Lightning's CPU accelerator counts one device
    cfg = load_config(None, ["data.batch_size=8", "trainer.global_batch_size=64", "trainer.devices=auto",
                             "trainer.accelerator=cpu"])
    assert accumulate_steps(cfg) == 8

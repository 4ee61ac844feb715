"""Typed configuration for every stage.

Merge order: schema (the dataclasses below) <- ``experiments/configs/base.yaml`` <- experiment YAML
<- ``key=value`` overrides from the command line. Unknown keys and wrong types fail with the full key
path and the closest valid key; derived values (the quantizer depth = max(lpix, lsem)) cannot be set.

This module imports no torch, so ``evotok --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from evotok.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "experiments" / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"

STAGES = ("teacher", "tokenizer", "lm", "understanding", "generation", "checker")

# Keys a user may not set, with the reason printed when they try.
DERIVED_KEYS = {
    "model.quantizer.depth": "it is derived as max(model.lpix, model.lsem); set model.lpix / model.lsem",
    "model.depth": "it is derived as max(model.lpix, model.lsem); set model.lpix / model.lsem",
}


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------------------------- schema


@dataclass
class QuantizerConfig:
    """Residual quantizer. The depth is not a field: it is max(model.lpix, model.lsem)."""

    codebook_size: int = 1024
    dim: int = 32
    ema_decay: float = 0.99
    ema_warmup: int = 0  # steps during which code vectors stay fixed
    restart_threshold: float = 1.0  # a code whose EMA cluster size falls below this is restarted
    impl: str = "auto"  # auto | ref | cpp | cuda | gemm
    l2_normalize: bool = False


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name in evotok.models.tokenizer.PRESETS
    lpix: int = 4
    lsem: int = 16
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    encoder_weights: str = ""  # ViT-encoder presets: open_clip weights file or teacher run to init the tower ("" = random)


@dataclass
class LossConfig:
    recon: str = "l2"  # l2 | l1
    recon_weight: float = 1.0
    lpips_weight: float = 0.0
    lpips_weights: str = ""  # local path to the LPIPS backbone weights (no downloads)
    gan_weight: float = 0.5
    gan_start: int = 20000
    disc_layers: int = 3
    disc_channels: int = 64
    commit_weight: float = 1.0
    sem_weight: float = 1.0
    sem_folds: int = 4


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    disc_lr: float = 1e-4
    warmup_steps: int = 0
    # tokenizer: linear decay of the learning rate to 0 over the last `cooldown` fraction of the run's budget
    # (trainer.max_steps or trainer.max_minutes, whichever ends it first); 0 keeps it constant after warm-up
    cooldown: float = 0.0


@dataclass
class TeacherConfig:
    arch: str = "evotok-teacher-tiny-avg"  # an open_clip model name (embedded default registered by us)
    weights: str = ""  # local weights file for a real open_clip model
    run: str = ""  # a teacher run folder from `evotok train teacher` (embedded default)
    random_init: bool = False  # tests only: an untrained teacher of `arch` (never a silent default)
    lr_schedule: str = "cosine"  # teacher training: cosine | constant, after optim.warmup_steps of linear warm-up
    # tokenizer training: compute the frozen teacher's tokens of the whole train split once (at the start of
    # training, inside its clock) and look them up by item index; needs a map-style source, no data.augment
    cache_features: bool = False


@dataclass
class LMConfig:
    preset: str = "tiny"
    path: str = ""  # local Hugging Face checkpoint folder for real runs


@dataclass
class DataConfig:
    source: str = "evoshapes"  # evoshapes | folder | llava | webdataset | realphotos
    root: str = ""  # folder / shard pattern / LLaVA JSON file, for the non-procedural sources
    image_root: str = ""  # where LLaVA JSON image paths are resolved (default: the JSON's folder)
    resolution: int = 32
    batch_size: int = 64  # per device
    num_workers: int = 0  # 0 suits a 2-core machine: EvoShapes is cached in memory
    seed: int = 0
    cache_dir: str = ".cache/evotok"
    train_size: int = 50000
    val_size: int = 5000
    test_size: int = 5000
    heldout_fraction: float = 0.1  # fraction of (colour, shape) pairs held out of train
    noise_sigma: float = 0.02
    on_bad_file: str = "skip"  # skip (count, warn once) | error
    augment: bool = False  # random crop + flip for real images


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0  # wall-clock limit, 0 = none
    devices: Any = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"  # bf16-mixed on GPU for real runs
    accumulate: int = 1
    global_batch_size: int = 0  # 0 = batch_size * devices * nodes * accumulate; else accumulate is derived
    val_every_n_steps: int = 500
    log_every_n_steps: int = 20
    image_log_every_n_steps: int = 500
    ckpt_every_n_steps: int = 200  # last.ckpt cadence: a killed run loses at most this many steps
    limit_val_batches: float = 1.0
    threads: int = 2  # torch intra-op threads
    progress_bar: bool = True


@dataclass
class EvalConfig:
    split: str = "val"
    max_images: int = 0  # 0 = the whole split
    fid_features: str = "teacher"  # teacher | inception
    inception_weights: str = ""  # local torch-fidelity Inception weights for real-data rFID


@dataclass
class RunConfig:
    dir: str = "runs"
    name: str = "default"
    seed: int = 0
    overwrite: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def depth(self) -> int:
        """Total quantizer depth L = max(Lpix, Lsem)."""
        return max(self.model.lpix, self.model.lsem)


CHOICES = {
    "model.quantizer.impl": ("auto", "ref", "cpp", "cuda", "gemm"),
    "loss.recon": ("l2", "l1"),
    "data.source": ("evoshapes", "folder", "llava", "webdataset", "realphotos"),
    "data.on_bad_file": ("skip", "error"),
    "eval.split": ("train", "val", "test", "heldout"),
    "eval.fid_features": ("teacher", "inception"),
}

POSITIVE = (
    "model.lpix", "model.lsem", "model.quantizer.codebook_size", "model.quantizer.dim",
    "data.resolution", "data.batch_size", "trainer.num_nodes", "trainer.accumulate", "loss.sem_folds",
)


# ------------------------------------------------------------------------------------- merge + check


def _all_paths(schema_cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(schema_cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        sub = _dataclass_type(schema_cls, f)
        if sub is not None:
            out.extend(_all_paths(sub, path + "."))
    return out


def _dataclass_type(owner: type, f: dataclasses.Field) -> Optional[type]:
    default_factory = f.default_factory  # type: ignore[misc]
    if default_factory is not dataclasses.MISSING:
        try:
            value = default_factory()
        except TypeError:
            return None
        if dataclasses.is_dataclass(value):
            return type(value)
    return None


VALID_KEYS = _all_paths(Config)


def suggest(key: str, candidates: Iterable[str] = VALID_KEYS) -> str:
    """' (did you mean 'x'?)' for the closest valid key, or ''."""
    candidates = list(candidates)
    best = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not best:  # compare the last segment alone: 'model.quantizer.codebok' -> '...codebook_size'
        leaf = key.rsplit(".", 1)[-1]
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates if c.rsplit(".", 1)[0] == key.rpartition(".")[0]}
        hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
        best = [leaves[hit[0]]] if hit else []
    return f" (did you mean '{best[0]}'?)" if best else ""


def _check_keys(tree: Any, source: str, prefix: str = "") -> None:
    """Raise ConfigError on the first key of ``tree`` that the schema does not have."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path in DERIVED_KEYS:
            raise ConfigError(f"config key '{path}' (from {source}) cannot be set: {DERIVED_KEYS[path]}")
        if path not in VALID_KEYS:
            leaf = path
            while isinstance(value, dict) and value:  # name the full path a user typed: 'dat.batch_size'
                key, value = next(iter(value.items()))
                leaf = f"{leaf}.{key}"
            raise ConfigError(f"unknown config key '{leaf}' (from {source}){suggest(leaf)}")
        if isinstance(value, dict) and any(p.startswith(path + ".") for p in VALID_KEYS):
            _check_keys(value, source, path + ".")


def _parse_override(item: str) -> tuple[str, Any]:
    from omegaconf import OmegaConf

    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    parsed = OmegaConf.create({"v": raw} if raw == "" else f"v: {raw}")
    return key, OmegaConf.to_container(parsed)["v"]


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or a NAME looked up under experiments/configs/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for cand in (p, CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(str(q.relative_to(CONFIG_DIR).with_suffix("")) for q in CONFIG_DIR.rglob("*.yaml") if q != BASE_CONFIG)
    hint = difflib.get_close_matches(name_or_path, known, n=1, cutoff=0.4)
    more = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(
        f"config '{name_or_path}' not found: not a file and not a name under {CONFIG_DIR}{more}; "
        f"known names: {', '.join(known)}"
    )


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # omegaconf/yaml parse errors
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    experiment: Optional[str] = None,
    overrides: Iterable[str] = (),
    base: Optional[Path] = BASE_CONFIG,
) -> Config:
    """Merge schema <- base.yaml <- experiment <- overrides and return a validated Config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers: list[tuple[str, dict]] = []
    if base is not None and Path(base).is_file():
        layers.append((str(base), _load_yaml(Path(base))))
    if experiment:
        path = resolve_config_path(experiment)
        layers.append((str(path), _load_yaml(path)))
    for item in overrides:
        key, value = _parse_override(item)
        layers.append((f"command line '{item}'", _nest(key, value)))

    merged = OmegaConf.structured(Config)
    for source, tree in layers:
        _check_keys(tree, source)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(tree))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"bad value for config key '{key}' (from {source}): {_first_line(e)}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: Iterable[str] = ()) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied, checked like command-line overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    if not overrides:
        return cfg
    merged = OmegaConf.structured(cfg)
    for item in overrides:
        key, value = _parse_override(item)
        tree = _nest(key, value)
        _check_keys(tree, f"override '{item}'")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(tree))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad value for config key '{key}' (from override '{item}'): {_first_line(e)}") from None
    new: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(new)
    return new


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _get(cfg: Config, path: str) -> Any:
    obj: Any = cfg
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> None:
    """Value checks the types alone cannot express; each error names its key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if not 0.0 < cfg.model.quantizer.ema_decay < 1.0:
        raise ConfigError(f"config key 'model.quantizer.ema_decay' must be in (0, 1), got {cfg.model.quantizer.ema_decay}")
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError(f"config key 'data.heldout_fraction' must be in [0, 1), got {cfg.data.heldout_fraction}")
    if not 0.0 <= cfg.optim.cooldown < 1.0:
        raise ConfigError(f"config key 'optim.cooldown' must be in [0, 1), got {cfg.optim.cooldown}")
    if cfg.teacher.cache_features and cfg.data.augment:
        raise ConfigError(
            "config key 'teacher.cache_features' = true needs data.augment = false: augmented train images "
            "change the teacher's tokens every epoch"
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must hold two numbers, got {cfg.optim.betas}")
    if cfg.trainer.global_batch_size:
        per_step = cfg.data.batch_size * _num_devices(cfg.trainer.devices) * cfg.trainer.num_nodes
        if cfg.trainer.global_batch_size % per_step:
            raise ConfigError(
                f"config key 'trainer.global_batch_size' = {cfg.trainer.global_batch_size} is not a multiple of "
                f"data.batch_size * devices * num_nodes = {per_step}"
            )


def _num_devices(devices: Any) -> int:
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    return 1  # "auto": resolved by Lightning; one device on CPU


def accumulate_steps(cfg: Config) -> int:
    """Gradient accumulation: derived from trainer.global_batch_size when that is set."""
    if not cfg.trainer.global_batch_size:
        return cfg.trainer.accumulate
    per_step = cfg.data.batch_size * _num_devices(cfg.trainer.devices) * cfg.trainer.num_nodes
    return cfg.trainer.global_batch_size // per_step


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, including the derived depth as a comment."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    return f"# derived: depth L = max(lpix, lsem) = {cfg.depth}\n{text}"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> Config:
    """Rebuild a Config from a saved dict (config.yaml or a checkpoint's hyper-parameters)."""
    from omegaconf import OmegaConf

    _check_keys(tree, "saved config")
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(tree))
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg

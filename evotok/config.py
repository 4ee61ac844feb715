"""Typed configuration for every stage.

Merge order: schema (the dataclasses below) <- ``experiments/configs/base.yaml`` <- experiment YAML (after
the files it ``extends:``, in order) <- ``key=value`` overrides from the command line. Unknown keys and wrong
types fail with the full key path and the closest valid key; derived values (the quantizer depth =
max(lpix, lsem)) cannot be set. When the stage is known, a key the stage does not read is an error naming
the key and the stage (the registry in evotok/stages.py lists what each stage reads).

Sections: ``model`` / ``loss`` (the tokenizer), ``teacher``, ``tokenizer`` / ``understanding`` (hand-over
of upstream runs), ``lm`` (the language model), ``mllm`` (the understanding bridge), ``gen`` (the generation
head), ``checker``, and the shared ``optim``, ``data``, ``trainer``, ``eval``, ``run``.

Experiment files are found in the checkout's ``experiments/`` folder, else in the copy installed with the
package (``evotok/_experiments``); see :func:`experiment_dirs`.

This module imports no torch, so ``evotok --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from evotok.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGED_EXPERIMENTS = Path(__file__).resolve().parent / "_experiments"  # written by setup.py's build_py


def experiment_dirs(kind: str) -> list[Path]:
    """Folders searched for ``kind`` ('configs' | 'pipelines' | 'sweeps'): the checkout's
    ``experiments/<kind>`` (an editable install or a source tree), then the copy installed with the package."""
    return [d for d in (REPO_ROOT / "experiments" / kind, PACKAGED_EXPERIMENTS / kind) if d.is_dir()] or [
        REPO_ROOT / "experiments" / kind
    ]


CONFIG_DIR = experiment_dirs("configs")[0]
BASE_CONFIG = CONFIG_DIR / "base.yaml"

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
    ema_warmup: int = 0  # steps during which the EMA vector sums stay frozen (sizes and restarts run; the reference's vq_warmup)
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
    # ViT-encoder presets: the tower's input normalisation, (x - mean) / std on [0, 1] images; empty = the
    # teacher's (teacher.mean / teacher.std / teacher.pretrained_tag) when the tower is the teacher's arch, else
    # the arch's own preprocessing as open_clip's pretrained configs give it
    encoder_mean: list = field(default_factory=list)
    encoder_std: list = field(default_factory=list)


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
    """The optimiser of every stage. The learning rate is a function of the step alone (evotok.lit.optim):
    ``optim.warmup_steps`` of linear warm-up, then ``schedule``: constant; cosine to ``min_lr_ratio * lr`` at
    trainer.max_steps; or linear: constant, then a linear cool-down to 0 over the last ``cooldown`` fraction
    of trainer.max_steps."""

    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    cooldown: float = 0.0  # schedule=linear: the fraction of trainer.max_steps the cool-down takes
    min_lr_ratio: float = 0.0  # schedule=cosine: the final learning rate as a fraction of lr
    # per parameter group learning rates, by the group names the stage defines (others use `lr`):
    # tokenizer: encoder, pixel_decoder, semantic_decoder, disc; understanding: projector, lm;
    # generation: projector, head, lm
    group_lr: Dict[str, float] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    arch: str = "evotok-teacher-tiny-avg"  # an open_clip model name (embedded default registered by us)
    weights: str = ""  # local weights file for a real open_clip model
    run: str = ""  # a teacher run folder from `evotok train teacher` (embedded default)
    random_init: bool = False  # tests only: an untrained teacher of `arch` (never a silent default)
    # input normalisation (x - mean) / std on [0, 1] images. Explicit mean/std win; else the preprocessing of
    # open_clip's pretrained config `pretrained_tag` for `arch` (e.g. 'webli' for the SigLIP2 towers: 0.5 / 0.5);
    # else, when every pretrained tag of `arch` agrees, theirs; else the model config's (open_clip's default
    # is OpenAI CLIP's mean/std, which the embedded teachers were trained with)
    pretrained_tag: str = ""
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)
    # tokenizer training: compute the frozen teacher's tokens of the whole train split once (at the start of
    # training) and look them up by item index; needs a map-style source, no data.augment
    cache_features: bool = False


@dataclass
class RunRef:
    """A hand-over section: the upstream run a later stage reads (``tokenizer.run``, ``understanding.run``)."""

    run: str = ""


@dataclass
class LMConfig:
    preset: str = "tiny"  # stand-in LM size (evotok.models.lm.PRESETS)
    path: str = ""  # a local Hugging Face folder (a real LLM, or an exported stand-in)
    run: str = ""  # an `evotok train lm` run folder
    vocab_size: int = 1024  # stand-in LM: the tokenizer trained on EvoShapes text
    max_length: int = 128  # tokens per sequence (longer conversations follow the truncation policy)
    gradient_checkpointing: bool = False


@dataclass
class MLLMConfig:
    """The understanding bridge: EvoTok features -> 2-layer GELU MLP projector -> the LM."""

    phase: int = 1  # 1: projector only, caption conversations; 2: projector + LM, question/answer conversations
    features: str = "semantic"  # semantic: the semantic decoder's output from z_l; latent: raw z_l
    depth: int = 0  # l; 0 = Lsem for semantic features, Lpix for latent ones
    cache_features: bool = True  # the frozen tokenizer's features computed once per item


@dataclass
class GenConfig:
    """The generation head: LM + input projection of z_Lpix + depth transformer over the Lpix codes."""

    phase: int = 1  # 1: projection + depth transformer (LM frozen); 2: everything
    depth_layers: int = 2  # the depth transformer (6 in the paper)
    depth_width: int = 128
    depth_heads: int = 4
    caption_dropout: float = 0.1  # empty prompt in training: the unconditional branch of CFG
    # sampling defaults of `evotok generate` / `evotok eval geneval` (the paper's: CFG 3.0, top-k 900, top-p 0.96)
    cfg_scale: float = 3.0
    top_k: int = 900  # 0 = off
    top_p: float = 0.96
    temperature: float = 1.0


@dataclass
class CheckerConfig:
    width: int = 32  # the classifier's base channel count
    run: str = ""  # a checker run (`evotok train checker`): what `evotok eval geneval` scores images with


@dataclass
class DataConfig:
    source: str = "evoshapes"  # evoshapes | folder | llava | webdataset | realphotos
    preset: str = "evoshapes"  # EvoShapes variant (DATA_PRESETS): evoshapes (32 px default) | evoshapes64 (harder, 64 px)
    root: str = ""  # folder / shard pattern / LLaVA JSON file, for the non-procedural sources
    val_root: str = ""  # webdataset: val/test shard pattern (e.g. ImageNet val); set => no hash split of data.root
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
    # EvoShapes items' LLaVA-style conversations: qa (every question/answer round, like LLaVA-665k: understanding
    # phase 2) or caption (one "Describe the image." round, like LLaVA-558k: phase 1)
    conversations: str = "qa"


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # the run's length: schedules are functions of the step
    max_minutes: float = 0.0  # a safety stop only (0 = none); a run it stops did not finish its schedule
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
    loggers: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard | csv | wandb (offline)


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
    tokenizer: RunRef = field(default_factory=RunRef)
    lm: LMConfig = field(default_factory=LMConfig)
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    understanding: RunRef = field(default_factory=RunRef)
    gen: GenConfig = field(default_factory=GenConfig)
    generation: RunRef = field(default_factory=RunRef)
    checker: CheckerConfig = field(default_factory=CheckerConfig)
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
    "data.conversations": ("qa", "caption"),
    "eval.split": ("train", "val", "test", "heldout"),
    "eval.fid_features": ("teacher", "inception"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "mllm.features": ("semantic", "latent"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"),
}
# EvoShapes presets -> the data.resolution values each supports (() = any even value >= 8); the registry itself is
# evotok.data.evoshapes.PRESETS (kept torch-free here; tests/test_data_evoshapes.py keeps the two in step)
DATA_PRESETS: Dict[str, tuple] = {"evoshapes": (), "evoshapes64": (64,)}
LIST_CHOICES = {"trainer.loggers": ("tensorboard", "csv", "wandb")}
OPEN_DICTS = ("optim.group_lr",)  # dict-valued keys whose entries are free names

POSITIVE = (
    "model.lpix", "model.lsem", "model.quantizer.codebook_size", "model.quantizer.dim",
    "data.resolution", "data.batch_size", "trainer.num_nodes", "trainer.accumulate", "loss.sem_folds",
    "lm.vocab_size", "lm.max_length", "gen.depth_layers", "gen.depth_width", "gen.depth_heads", "checker.width",
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
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


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
        if path in OPEN_DICTS and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' (from {source}) must be a mapping of names to numbers, got {value!r}")
        if isinstance(value, dict) and path not in OPEN_DICTS and any(p.startswith(path + ".") for p in VALID_KEYS):
            _check_keys(value, source, path + ".")


def leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    """The dotted paths of the leaves of a nested dict (an open-dict key counts as one leaf)."""
    if not isinstance(tree, dict) or (prefix and prefix.rstrip(".") in OPEN_DICTS):
        return [prefix.rstrip(".")] if prefix else []
    out: list[str] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in OPEN_DICTS:
            out.extend(leaf_paths(value, path + "."))
        else:
            out.append(path)
    return out


def check_stage_keys(tree: Any, source: str, stage: str) -> None:
    """Raise ConfigError on the first key of ``tree`` that ``stage`` does not read (evotok/stages.py)."""
    from evotok.stages import get_stage

    entry = get_stage(stage)
    for path in leaf_paths(tree):
        if not entry.reads_key(path):
            why = entry.notes.get(path) or next((v for k, v in entry.notes.items() if path.startswith(k + ".")), "")
            reads = ", ".join(entry.all_reads())
            raise ConfigError(
                f"config key '{path}' (from {source}) is not read by stage '{stage}'"
                f"{': ' + why if why else ''} (stage '{stage}' reads {reads})"
            )


def stage_reads(stage: str, key: str) -> bool:
    """Whether ``stage`` reads config key ``key`` (pipelines apply global overrides only where they are read)."""
    from evotok.stages import get_stage

    return get_stage(stage).reads_key(key)


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


def override_key(item: str) -> str:
    """The key of a ``key=value`` override."""
    return _parse_override(item)[0]


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def known_config_names() -> list[str]:
    names: set[str] = set()
    for root in experiment_dirs("configs"):
        names.update(str(q.relative_to(root).with_suffix("")) for q in root.rglob("*.yaml") if q.name != "base.yaml")
    return sorted(names)


def resolve_config_path(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    """A path to a YAML file, or a NAME (with or without .yaml) looked up next to ``relative_to`` (a file that
    extends it), then under each folder of :func:`experiment_dirs` ('configs')."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cands = [p]
    if relative_to is not None:
        cands += [relative_to.parent / name_or_path, relative_to.parent / f"{name_or_path}.yaml"]
    roots = experiment_dirs("configs")
    for root in roots:
        cands += [root / name_or_path, root / f"{name_or_path}.yaml"]
    for cand in cands:
        if cand.is_file():
            return cand
    known = known_config_names()
    hint = difflib.get_close_matches(name_or_path, known, n=1, cutoff=0.4)
    more = f" (did you mean '{hint[0]}'?)" if hint else ""
    looked = ", ".join(str(r) for r in roots) + (f", {relative_to.parent}" if relative_to is not None else "")
    raise ConfigError(
        f"config '{name_or_path}' not found: not a file and not a name under {looked}{more}; "
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


EXTENDS_KEYS = ("extends", "defaults")


def experiment_layers(name_or_path: str) -> list[tuple[str, dict]]:
    """The layers of an experiment file, parents first: the files it ``extends:`` (a name or a list of names,
    each resolved next to the file, then as a config name; each parent's own parents first), then the file.
    A cycle is an error naming the chain."""
    return _layers(resolve_config_path(name_or_path), ())


def _layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, dict]]:
    real = path.resolve()
    if real in chain:
        names = " -> ".join(str(p) for p in (*chain, real))
        raise ConfigError(f"config files extend each other in a cycle: {names}")
    data = _load_yaml(path)
    parents: Any = None
    for key in EXTENDS_KEYS:
        if key in data:
            if parents is not None:
                raise ConfigError(f"config file {path} sets both 'extends' and 'defaults'; use one")
            parents = data.pop(key)
    if parents is None:
        parents = []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError(f"config file {path}: 'extends' must be a config name or a list of names, got {parents!r}")
    out: list[tuple[str, dict]] = []
    for parent in parents:
        out.extend(_layers(resolve_config_path(parent, relative_to=path), (*chain, real)))
    out.append((str(path), data))
    return out


def load_config(
    experiment: Optional[str] = None,
    overrides: Iterable[str] = (),
    base: Optional[Path] = BASE_CONFIG,
    stage: Optional[str] = None,
) -> Config:
    """Merge schema <- base.yaml <- experiment (its ``extends:`` chain first) <- overrides; validate.

    With ``stage``, every key set by the experiment chain or an override must be one the stage reads, and the
    stage's own value checks run (e.g. ``data.resolution`` against the tokenizer preset)."""
    layers: list[tuple[str, dict]] = []
    if base is not None and Path(base).is_file():
        layers.append((str(base), _load_yaml(Path(base))))
    if experiment:
        layers.extend(experiment_layers(experiment))
    for item in overrides:
        key, value = _parse_override(item)
        layers.append((f"command line '{item}'", _nest(key, value)))
    return _merge(layers, stage)


def _merge(layers: Iterable[tuple[str, dict]], stage: Optional[str], start: Any = None) -> Config:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(Config if start is None else start)
    for source, tree in layers:
        _check_keys(tree, source)
        if stage is not None:
            check_stage_keys(tree, source, stage)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(tree))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"bad value for config key '{key}' (from {source}): {_first_line(e)}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg, stage)
    return cfg


def with_overrides(cfg: Config, overrides: Iterable[str] = (), stage: Optional[str] = None) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied, checked like command-line overrides."""
    overrides = list(overrides)
    if not overrides:
        return cfg
    layers = []
    for item in overrides:
        key, value = _parse_override(item)
        layers.append((f"override '{item}'", _nest(key, value)))
    return _merge(layers, stage, start=cfg)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def get_key(cfg: Config, path: str) -> Any:
    obj: Any = cfg
    for p in path.split("."):
        obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
    return obj


_get = get_key


def validate(cfg: Config, stage: Optional[str] = None) -> None:
    """Value checks the types alone cannot express; each error names its key. With ``stage``, also the
    stage's own checks (its registry entry's ``validate``)."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {', '.join(allowed)}")
    for key, allowed in LIST_CHOICES.items():
        value = _get(cfg, key)
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise ConfigError(f"config key '{key}' = {list(value)!r}: each entry one of {', '.join(allowed)}, at least one")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if not 0.0 < cfg.model.quantizer.ema_decay < 1.0:
        raise ConfigError(f"config key 'model.quantizer.ema_decay' must be in (0, 1), got {cfg.model.quantizer.ema_decay}")
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError(f"config key 'data.heldout_fraction' must be in [0, 1), got {cfg.data.heldout_fraction}")
    if cfg.data.preset not in DATA_PRESETS:
        raise ConfigError(f"config key 'data.preset' = {cfg.data.preset!r} is not an EvoShapes preset"
                          f"{suggest(cfg.data.preset, DATA_PRESETS)}; presets: {', '.join(DATA_PRESETS)}")
    supported = DATA_PRESETS[cfg.data.preset]
    if cfg.data.source == "evoshapes" and supported and cfg.data.resolution not in supported:
        raise ConfigError(f"config key 'data.resolution' = {cfg.data.resolution} is not supported by data.preset "
                          f"'{cfg.data.preset}' (supported: {', '.join(map(str, supported))})")
    o = cfg.optim
    if o.schedule == "linear" and not 0.0 < o.cooldown <= 1.0:
        raise ConfigError(f"config key 'optim.cooldown' must be in (0, 1] with optim.schedule=linear, got {o.cooldown}")
    if o.schedule != "linear" and o.cooldown != 0.0:
        raise ConfigError(
            f"config key 'optim.cooldown' = {o.cooldown} is only read by optim.schedule=linear "
            f"(optim.schedule = {o.schedule!r}); set optim.schedule=linear or optim.cooldown=0"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"config key 'optim.min_lr_ratio' must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0:
        raise ConfigError(f"config key 'optim.warmup_steps' must be >= 0, got {o.warmup_steps}")
    for name, lr in o.group_lr.items():
        if not lr > 0:
            raise ConfigError(f"config key 'optim.group_lr.{name}' must be positive, got {lr}")
    if o.schedule != "constant" and cfg.trainer.max_steps <= 0:
        raise ConfigError(
            f"config key 'trainer.max_steps' must be positive with optim.schedule={o.schedule!r} "
            f"(the schedule is a function of the step), got {cfg.trainer.max_steps}"
        )
    if cfg.trainer.max_minutes < 0:
        raise ConfigError(f"config key 'trainer.max_minutes' must be >= 0, got {cfg.trainer.max_minutes}")
    if cfg.teacher.cache_features and cfg.data.augment:
        raise ConfigError(
            "config key 'teacher.cache_features' = true needs data.augment = false: augmented train images "
            "change the teacher's tokens every epoch"
        )
    for mean_key, std_key in (("teacher.mean", "teacher.std"), ("model.encoder_mean", "model.encoder_std")):
        mean, std = _get(cfg, mean_key), _get(cfg, std_key)
        if bool(mean) != bool(std):
            raise ConfigError(f"config keys '{mean_key}' and '{std_key}' go together: set both (3 numbers each) or neither")
        if mean and (len(mean) != 3 or len(std) != 3 or not all(float(v) > 0 for v in std)):
            raise ConfigError(
                f"config keys '{mean_key}' / '{std_key}' must hold 3 numbers each (one per RGB channel, std > 0), "
                f"got {list(mean)} / {list(std)}"
            )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must hold two numbers, got {cfg.optim.betas}")
    g = cfg.gen
    if not 0.0 < g.top_p <= 1.0:
        raise ConfigError(f"config key 'gen.top_p' must be in (0, 1], got {g.top_p}")
    for key, v in (("gen.top_k", g.top_k), ("gen.temperature", g.temperature), ("gen.cfg_scale", g.cfg_scale)):
        if v < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {v}")
    if not 0.0 <= cfg.gen.caption_dropout < 1.0:
        raise ConfigError(f"config key 'gen.caption_dropout' must be in [0, 1), got {cfg.gen.caption_dropout}")
    for key in ("mllm.phase", "gen.phase"):
        if _get(cfg, key) not in (1, 2):
            raise ConfigError(f"config key '{key}' must be 1 or 2, got {_get(cfg, key)}")
    n_devices = _num_devices(cfg.trainer.devices)
    if cfg.trainer.global_batch_size and n_devices is not None:  # "auto": checked when the Trainer is built
        per_step = cfg.data.batch_size * n_devices * cfg.trainer.num_nodes
        if cfg.trainer.global_batch_size % per_step:
            raise ConfigError(
                f"config key 'trainer.global_batch_size' = {cfg.trainer.global_batch_size} is not a multiple of "
                f"data.batch_size * devices * num_nodes = {per_step}"
            )
    if stage is not None:
        from evotok.stages import _import, get_stage

        entry = get_stage(stage)
        if entry.validate:
            _import(entry.validate)(cfg)


def validate_tokenizer(cfg: Config) -> None:
    """The tokenizer stage's value checks: the preset exists and fits data.resolution."""
    from evotok.models.presets import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(
            f"config key 'model.preset' = {cfg.model.preset!r} is not a tokenizer preset"
            f"{suggest(cfg.model.preset, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    try:
        PRESETS[cfg.model.preset]().check_resolution(cfg.data.resolution, cfg.model.preset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.loss.sem_folds < 1:
        raise ConfigError(f"config key 'loss.sem_folds' must be positive, got {cfg.loss.sem_folds}")


def _num_devices(devices: Any) -> Optional[int]:
    """Devices per node that ``trainer.devices`` names, when the config alone says it (as Lightning reads the
    value: an int count, a list of indices, "N" or "i,j,..."); None for "auto" / -1 (all devices: known only
    on the machine, see :func:`accumulate_steps`)."""
    if isinstance(devices, bool):
        return 1
    if isinstance(devices, int):
        return None if devices == -1 else max(devices, 1)
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    text = str(devices).strip()
    if text in ("auto", "-1", ""):
        return None
    if "," in text:
        return max(len([t for t in text.split(",") if t.strip()]), 1)
    return max(int(text), 1) if text.isdigit() else None


def accumulate_steps(cfg: Config) -> int:
    """Gradient accumulation: derived from trainer.global_batch_size when that is set, for the device count
    of this node (``devices: auto`` / -1 are resolved through Lightning's accelerators here)."""
    if not cfg.trainer.global_batch_size:
        return cfg.trainer.accumulate
    n = _num_devices(cfg.trainer.devices)
    if n is None:
        from evotok.lit.train import device_count

        n = device_count(cfg.trainer.accelerator, cfg.trainer.devices)
    per_step = cfg.data.batch_size * n * cfg.trainer.num_nodes
    return max(cfg.trainer.global_batch_size // per_step, 1)


def to_dict(cfg: Config, stage: Optional[str] = None) -> dict:
    """The config as a nested dict; with ``stage``, only the keys that stage reads."""
    tree = dataclasses.asdict(cfg)
    return tree if stage is None else stage_tree(tree, stage)


def stage_tree(tree: dict, stage: str) -> dict:
    """The sub-tree of ``tree`` that ``stage`` reads."""
    from evotok.stages import get_stage

    entry = get_stage(stage)

    def keep(node: dict, prefix: str) -> dict:
        out = {}
        for k, v in node.items():
            path = f"{prefix}{k}"
            if not entry.reads_key(path):
                continue
            if isinstance(v, dict) and path not in OPEN_DICTS and not any(
                path == r or path.startswith(r + ".") for r in entry.all_reads()
            ):
                out[k] = keep(v, path + ".")
            else:
                out[k] = v
        return out

    return keep(tree, "")


def to_yaml(cfg: Config, stage: Optional[str] = None) -> str:
    """The resolved config as YAML (with ``stage``: only what that stage reads), the derived depth as a
    comment when the model section is shown."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg, stage)))
    if stage is None or "model" in to_dict(cfg, stage):
        text = f"# derived: depth L = max(lpix, lsem) = {cfg.depth}\n{text}"
    return text


# Saved configs (config.yaml, checkpoint hyper-parameters) of earlier versions: old key -> how it maps now.
_RENAMED = {
    "teacher.lr_schedule": "optim.schedule",
}


def migrate_saved(tree: dict) -> dict:
    """Bring a saved config of an earlier version to the current schema (a copy):

    - ``teacher.lr_schedule`` (teacher training: cosine | constant) -> ``optim.schedule``;
    - ``optim.cooldown`` > 0 without ``optim.schedule`` (tokenizer: a cool-down over the run's budget) ->
      ``optim.schedule: linear`` (the fraction now counts trainer.max_steps);
    - ``optim.disc_lr`` -> ``optim.group_lr.disc``.
    """
    import copy

    tree = copy.deepcopy(tree)
    optim = tree.setdefault("optim", {}) if isinstance(tree.get("optim", {}), dict) else {}
    teacher = tree.get("teacher") if isinstance(tree.get("teacher"), dict) else {}
    old_schedule = teacher.pop("lr_schedule", None)
    if "schedule" not in optim:
        if float(optim.get("cooldown", 0.0) or 0.0) > 0:
            optim["schedule"] = "linear"
        elif old_schedule is not None:
            optim["schedule"] = old_schedule
    if "disc_lr" in optim:
        optim.setdefault("group_lr", {}).setdefault("disc", optim.pop("disc_lr"))
    return tree


def from_dict(tree: dict, source: str = "saved config") -> Config:
    """Rebuild a Config from a saved dict (config.yaml or a checkpoint's hyper-parameters), migrating the
    keys of earlier versions (:func:`migrate_saved`); a key this version does not know fails naming it."""
    tree = migrate_saved(tree)
    try:
        _check_keys(tree, source)
    except ConfigError as e:
        raise ConfigError(
            f"{e}. The run was made by a version of the suite whose config this one cannot read; "
            f"remove or rename that key in the run's config.yaml (and re-save the checkpoint's "
            f"hyper_parameters['config'] the same way) to load it"
        ) from None
    return _merge([(source, tree)], None)

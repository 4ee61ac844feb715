"""The stage registry: the one place that lists every stage of the suite.

Each :class:`Stage` names the config keys it reads, the module that builds its LightningModule, its batch
builder (the fields a batch carries, the function mapping a common-schema item to them, and its collate),
the upstream runs it reads (hand-over keys) and the ``metrics.json`` names it writes. The CLI's stage
choices, ``--dry-run``, the DataModule's stage views, the hand-over records and the pipeline read this
registry; adding a stage is one new module plus one entry in ``STAGES``.

No torch import here: ``evotok --help`` reads the registry.

A stage module (``Stage.module``) provides ``build(cfg, upstream) -> LightningModule`` (``upstream`` maps each
hand-over key to its resolved :class:`evotok.handover.Upstream`) and ``describe(cfg) -> str`` for
``--dry-run``; optionally ``make_collate(cfg, module)`` when the stage's batches need the module (the
language-model stages tokenise with the model's tokenizer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from evotok.errors import UserError


class StageNotBuilt(UserError, NotImplementedError):
    """The stage exists in the design but this version has no implementation of it."""


class UnknownStage(UserError, ValueError):
    """A stage name that is not in the registry."""


# Hand-over keys: the config key naming an upstream, and the stage that produces it ("" = an external
# artefact: a weights file or a Hugging Face folder, fingerprinted the same way).
HANDOVER: dict[str, str] = {
    "teacher.run": "teacher",
    "teacher.weights": "",
    "tokenizer.run": "tokenizer",
    "lm.run": "lm",
    "lm.path": "",
    "understanding.run": "understanding",
    "generation.run": "generation",
    "checker.run": "checker",
}

# Keys every stage reads.
COMMON = ("data", "trainer", "run")


@dataclass(frozen=True)
class BatchSpec:
    """What a stage's batches carry and how they are built from common-schema items (evotok/data)."""

    fields: tuple[str, ...]  # keys of a collated batch
    view: str  # "module:function": item dict -> the stage's fields
    task: str = ""  # LLaVA-JSON task the stage keeps ("understanding" | "generation"); "" = every item
    collate: str = "evotok.data.collate:collate"  # "module:function" (items) -> batch, when no module-made one

    def view_fn(self) -> Callable[[dict], dict]:
        return _import(self.view)

    def collate_fn(self) -> Callable[[list], dict]:
        return _import(self.collate)


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    reads: tuple[str, ...]  # config keys or sections (prefixes) the stage reads, besides COMMON
    batch: BatchSpec
    module: Optional[str] = None  # provides build(cfg, upstream) and describe(cfg); None = not built yet
    upstream: tuple[str, ...] = ()  # hand-over keys the stage may read (see HANDOVER)
    metrics: tuple[str, ...] = ()  # metrics.json scalar names its training run writes
    eval_metrics: tuple[str, ...] = ()  # metrics.json scalar names its `evotok eval` command adds
    per_depth: tuple[str, ...] = ()  # metrics.json per-depth names its training or evaluation writes
    validate: Optional[str] = None  # "module:function" (cfg) -> None, value checks at load (torch-free)
    monitor: str = ""  # the validation metric that picks best.ckpt
    artifact: str = ""  # what later stages load from a run, relative to its folder ("" = its checkpoint)
    notes: dict[str, str] = field(default_factory=dict)  # key -> why the stage does not read it (error hint)

    @property
    def built(self) -> bool:
        return self.module is not None

    def all_reads(self) -> tuple[str, ...]:
        return (*self.reads, *COMMON)

    def reads_key(self, path: str) -> bool:
        """Whether the stage reads config key ``path`` (a section prefix or the key itself is listed)."""
        return any(path == r or path.startswith(r + ".") or r.startswith(path + ".") for r in self.all_reads())

    def lit_module(self):
        if self.module is None:
            raise StageNotBuilt(
                f"stage '{self.name}' is not built yet in this version of the suite; built stages: "
                f"{', '.join(s.name for s in STAGES.values() if s.built)}"
            )
        return importlib.import_module(self.module)


def _import(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_TOKENIZER_METRICS = ("val/psnr", "val/mse", "val/clipsim_sem", "val/clipsim_sem_d1", "val/usage_min")
_RECON_PER_DEPTH = ("rfid", "psnr", "ssim", "clipsim_pix", "clipsim_sem", "usage", "perplexity")
_VQA_TYPES = ("shape", "count", "color", "texture", "background")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "teacher", "stage 0: the small CLIP teacher on EvoShapes semantic-only captions",
            reads=("teacher.arch", "optim"),
            batch=BatchSpec(("image", "caption_sem", "labels"), "evotok.data.views:teacher_view"),
            module="evotok.lit.teacher_module",
            metrics=("val/zeroshot_shape", "val/zeroshot_count", "zeroshot_shape", "zeroshot_count"),
            monitor="val/zeroshot_shape",
            notes={"teacher.run": "the teacher stage trains a teacher; teacher.run is what later stages read"},
        ),
        Stage(
            "tokenizer", "stage 1: the EvoTok tokenizer (RVQ, pixel decoder at Lpix, semantic decoder at Lsem)",
            reads=("model", "loss", "optim", "teacher", "eval"),
            batch=BatchSpec(("image", "labels", "index"), "evotok.data.views:tokenizer_view"),
            module="evotok.lit.tokenizer_module",
            upstream=("teacher.run", "teacher.weights"),
            metrics=_TOKENIZER_METRICS,
            per_depth=_RECON_PER_DEPTH,
            validate="evotok.config:validate_tokenizer",
            monitor="val/psnr",
        ),
        Stage(
            "lm", "the stand-in language model: a small causal LM pretrained on EvoShapes text",
            reads=("lm.preset", "lm.vocab_size", "lm.max_length", "optim"),
            batch=BatchSpec(("text", "caption", "qa"), "evotok.data.views:lm_view"),
            module="evotok.lit.lm_module",
            metrics=("val/loss", "val/perplexity"),
            monitor="val/loss",
            artifact="hf",
            notes={"lm.path": "the lm stage trains the stand-in LM; lm.path is what later stages read",
                   "lm.run": "the lm stage trains the stand-in LM; lm.run is what later stages read"},
        ),
        Stage(
            "understanding", "stage 2: EvoTok features spliced into the LM (LLaVA-style), VQA",
            reads=("tokenizer.run", "lm.run", "lm.path", "lm.max_length", "lm.gradient_checkpointing", "mllm", "optim",
                   "eval", "understanding.run"),
            batch=BatchSpec(("image", "index", "conversations", "qa"), "evotok.data.views:understanding_view",
                            task="understanding"),
            module="evotok.lit.understanding_module",
            upstream=("tokenizer.run", "lm.run", "lm.path", "understanding.run"),
            metrics=("val/loss", "val/vqa_overall", "val/blind_overall"),
            eval_metrics=(*(f"vqa/{t}" for t in _VQA_TYPES), *(f"blind/{t}" for t in _VQA_TYPES), "vqa/overall"),
            per_depth=tuple(f"vqa_{t}" for t in _VQA_TYPES),
            monitor="val/loss",
        ),
        Stage(
            "generation", "stage 3: text-to-image over residual codes (LM + depth transformer, CFG)",
            reads=("tokenizer.run", "lm.run", "lm.path", "lm.max_length", "lm.gradient_checkpointing",
                   "understanding.run", "generation.run", "checker.run", "gen", "optim", "eval"),
            batch=BatchSpec(("index", "caption", "labels"), "evotok.data.views:generation_view", task="generation"),
            module="evotok.lit.generation_module",
            upstream=("tokenizer.run", "lm.run", "lm.path", "understanding.run", "generation.run"),
            metrics=("val/ce", *(f"ce_depth{k}" for k in range(1, 5))),
            eval_metrics=("geneval/overall", "gen_fd"),
            monitor="val/ce",
        ),
        Stage(
            "checker", "a classifier of EvoShapes factors that scores generated images (GenEval-style)",
            reads=("checker.width", "optim"),
            batch=BatchSpec(("image", "labels"), "evotok.data.views:checker_view"),
            module="evotok.lit.checker_module",
            metrics=("val/acc_mean", *(f"acc/{t}" for t in _VQA_TYPES)),
            monitor="val/acc_mean",
        ),
    )
}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        import difflib

        hint = difflib.get_close_matches(name, STAGE_NAMES, n=1)
        more = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UnknownStage(f"unknown stage '{name}'{more}; stages: {', '.join(STAGE_NAMES)}")
    return STAGES[name]


def built_stages() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.built)


def producer(handover_key: str) -> str:
    """The stage whose runs a hand-over key names ('' for external weights files and HF folders)."""
    return HANDOVER[handover_key]

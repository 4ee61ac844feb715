"""The frozen teacher: an open_clip CLIP model that plays SigLIP2's part (DESIGN §1, §2).

It gives the semantic decoder its target (penultimate-layer patch tokens) and defines the CLIPSIM
feature space (the L2-normalised pooled image embedding).

Three ways to get one (``load_teacher``), never touching the network:

- ``teacher.run=RUN_DIR``: the embedded default, a small CLIP trained by ``evotok train teacher``;
- ``teacher.arch=NAME teacher.weights=FILE``: any open_clip architecture with a local weights file;
- ``teacher.random_init=true``: an untrained ``teacher.arch`` (tests only).

The embedded architectures (``evotok-teacher-tiny-avg``, the default, and ``evotok-teacher-tiny``) are
registered with open_clip's own config registry (``open_clip.add_model_config``) by
``register_open_clip_configs()``, which ``build_clip`` calls; importing this module changes nothing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evotok.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from evotok.config import Config

# open_clip model configs we ship: name -> the JSON dict open_clip's registry holds.
# Width 128, 4 layers, patch 8 at 32 px (a 4x4 token grid; each 16 px EvoShapes cell is 2x2 patches).
# Calibrated on a 2-core CPU: 91-93% zero-shot shape / 99.9% count in 3 min; patch 4 gave 22-41% shape.
# "-avg" (the default) pools by averaging the patch tokens, as SigLIP-style towers pool from patch tokens
# rather than a CLS token; its penultimate patch tokens then carry the image's semantics, not just where
# objects are. Ridge regression of the 3-min teachers' penultimate tokens on EvoShapes labels (6k train ->
# 2k val images, per-token cosine of the fit): CLS pooling -- cell occupancy alone 0.89, shape+count 0.40;
# average pooling -- occupancy 0.63, shape+count 0.65 (zero-shot accuracy the same, 96% shape / 100% count).
_TINY_VISION = {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8}
_TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}
OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "evotok-teacher-tiny-avg": {"embed_dim": 128, "vision_cfg": {**_TINY_VISION, "pool_type": "avg"}, "text_cfg": _TINY_TEXT},
    "evotok-teacher-tiny": {"embed_dim": 128, "vision_cfg": _TINY_VISION, "text_cfg": _TINY_TEXT},  # CLS-token pooling
}

HOW_TO_GET_A_TEACHER = (
    "train the embedded teacher with `evotok train teacher --config teacher/tiny` and pass "
    "teacher.run=<its run folder> (e.g. teacher.run=runs/teacher/tiny), or set teacher.arch=<open_clip model name> "
    "and teacher.weights=<local weights file> for a real open_clip model"
)


class TeacherError(UserError, ValueError):
    """No usable teacher in the config; the message says how to get one."""


class Normalization(NamedTuple):
    """An image tower's input normalisation, (x - mean) / std on [0, 1] images, and where it came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # printed by --dry-run and stored in the run's provenance

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}


def resolve_normalization(
    arch: str, pretrained_tag: str = "", mean: Sequence[float] = (), std: Sequence[float] = (), keys: str = "teacher"
) -> Normalization:
    """The normalisation an open_clip ``arch`` expects, first rule that applies:

    1. explicit ``mean`` / ``std`` (config keys ``<keys>.mean`` / ``<keys>.std``);
    2. the preprocessing open_clip's pretrained config ``pretrained_tag`` of ``arch`` records (a tag that
       ``arch`` does not have is an error naming the tags it has);
    3. when ``arch`` has pretrained tags and all of them agree, theirs (e.g. SigLIP2 towers: 0.5 / 0.5);
    4. the model config's ``preprocess_cfg``, else open_clip's default (OpenAI CLIP's mean/std) -- what
       ``open_clip.create_model`` gives an arch without a tag, and what the embedded teachers train with.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg

    if mean or std:
        if len(mean) != 3 or len(std) != 3:
            raise TeacherError(f"{keys} mean/std need 3 numbers each, got {list(mean)} / {list(std)}")
        return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std), "config")  # type: ignore[arg-type]
    register_open_clip_configs()
    tags = list(open_clip.list_pretrained_tags_by_model(arch))
    if pretrained_tag:
        if pretrained_tag not in tags:
            raise TeacherError(
                f"{keys}.pretrained_tag = {pretrained_tag!r} is not an open_clip pretrained tag of {arch!r}; "
                f"its tags: {', '.join(tags) or 'none'} (or set {keys} mean/std explicitly)"
            )
        pre = open_clip.get_pretrained_cfg(arch, pretrained_tag)
        return Normalization(tuple(pre["mean"]), tuple(pre["std"]), f"open_clip pretrained config {arch}/{pretrained_tag}")
    if tags:
        pres = [open_clip.get_pretrained_cfg(arch, t) for t in tags]
        stats = {(tuple(p.get("mean", ())), tuple(p.get("std", ()))) for p in pres}
        if len(stats) == 1 and all(len(v) == 3 for v in next(iter(stats))):
            m, s = next(iter(stats))
            return Normalization(m, s, f"open_clip pretrained configs of {arch} (tags {', '.join(tags)} agree)")
    cfg = open_clip.get_model_config(arch) or {}
    default = PreprocessCfg()
    pre = {"mean": default.mean, "std": default.std, **(cfg.get("preprocess_cfg") or {})}
    src = "model config preprocess_cfg" if cfg.get("preprocess_cfg") else "open_clip default (OpenAI CLIP)"
    if len(tags) > 1:
        src += f"; its pretrained tags {', '.join(tags)} disagree: set {keys}.pretrained_tag"
    return Normalization(tuple(pre["mean"]), tuple(pre["std"]), f"{src} for {arch}")


def teacher_normalization(cfg: "Config") -> Normalization:
    """The teacher's normalisation from ``cfg.teacher`` (see :func:`resolve_normalization`)."""
    t = cfg.teacher
    return resolve_normalization(t.arch, t.pretrained_tag, t.mean, t.std, keys="teacher")


class TeacherOutput(NamedTuple):
    tokens_BTc: torch.Tensor  # penultimate-block patch tokens (no CLS), (B, gh*gw, width)
    pooled_BE: torch.Tensor  # L2-normalised image embedding (the CLIPSIM space), (B, embed_dim)


# ----------------------------------------------------------------------------------------- registry


def register_open_clip_configs() -> None:
    """Register ``OPEN_CLIP_CONFIGS`` with open_clip's registry (idempotent; writes JSON to a temp folder)."""
    import open_clip

    missing = {k: v for k, v in OPEN_CLIP_CONFIGS.items() if k not in open_clip.list_models()}
    if not missing:
        return
    folder = Path(tempfile.gettempdir()) / "evotok_open_clip_configs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in missing.items():
        path = folder / f"{name}.json"
        text = json.dumps(cfg, indent=2)
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(f".{id(cfg)}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        open_clip.add_model_config(path)


def build_clip(arch: str, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised open_clip model of ``arch`` (no download: pretrained weights are never requested);
    ``device="meta"`` builds it without allocating (for sizes)."""
    import open_clip

    register_open_clip_configs()
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise TeacherError(
            f"teacher.arch = {arch!r}: schema names load from a hub or folder by themselves; give a plain open_clip "
            f"architecture name in teacher.arch and the local weights file in teacher.weights"
        )
    if open_clip.get_model_config(arch) is None:
        raise TeacherError(
            f"teacher.arch = {arch!r} is not an open_clip architecture; known: {', '.join(open_clip.list_models()[:8])}, ..."
        )
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights loaded": we load them ourselves
    try:
        with torch.device(device):
            return open_clip.create_model(
                arch, pretrained=None, pretrained_image=False, pretrained_text=False, load_weights=False, device=device
            )
    finally:
        root.setLevel(level)


# ------------------------------------------------------------------------------------------ wrapper


class Teacher(nn.Module):
    """An open_clip CLIP model seen as a teacher. Image inputs are (B, 3, H, W) in [0, 1]; the model's
    mean/std normalisation (and a resize to its input size, if the images differ) happens inside."""

    def __init__(self, clip: nn.Module, arch: str = "", normalization: Optional[Normalization] = None):
        """``normalization`` None: the mean/std open_clip attached to ``clip`` (its model preprocessing)."""
        super().__init__()
        from open_clip import get_model_preprocess_cfg

        self.clip = clip
        self.arch = arch
        pp = get_model_preprocess_cfg(clip)
        size = pp.get("size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
        if normalization is None:
            normalization = Normalization(tuple(pp.get("mean", (0.5,) * 3)), tuple(pp.get("std", (0.5,) * 3)),
                                          "the open_clip model's preprocessing")
        self.normalization = normalization
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = None
        self._frozen = False
        self._shape_cache: Optional[tuple[tuple[int, int], int]] = None

    # --- sizes
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def embed_dim(self) -> int:
        out = getattr(self.visual, "output_dim", None)
        return int(out) if isinstance(out, int) else self._probe_pooled_dim()

    @property
    def token_grid(self) -> tuple[int, int]:
        grid = getattr(self.visual, "grid_size", None)
        if grid is not None:
            return (int(grid[0]), int(grid[1]))
        return self._probe_tokens()[0]

    @property
    def width(self) -> int:
        transformer = getattr(self.visual, "transformer", None)
        if transformer is not None and hasattr(transformer, "width"):
            return int(transformer.width)
        return self._probe_tokens()[1]

    def _probe_tokens(self) -> tuple[tuple[int, int], int]:
        if self._shape_cache is None:
            dev = self.mean.device
            with torch.no_grad():
                out = self._intermediates(torch.zeros(1, 3, *self.image_size, device=dev), fmt="NCHW", pooled=False)
            x = out["image_intermediates"][0]
            self._shape_cache = ((int(x.shape[-2]), int(x.shape[-1])), int(x.shape[1]))
        return self._shape_cache

    def _probe_pooled_dim(self) -> int:
        with torch.no_grad():
            return int(self.pooled(torch.zeros(1, 3, *self.image_size, device=self.mean.device)).shape[-1])

    # --- images
    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the model's normalised input (resized to its input size if needed)."""
        x = images_BCHW.float()
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def _num_blocks(self) -> Optional[int]:
        for owner, attr in ((getattr(self.visual, "transformer", None), "resblocks"), (getattr(self.visual, "trunk", None), "blocks")):
            blocks = getattr(owner, attr, None) if owner is not None else None
            if blocks is not None:
                return len(blocks)
        return None

    def _intermediates(self, images_BCHW: torch.Tensor, fmt: str = "NLC", pooled: bool = True) -> dict:
        """open_clip's ``forward_intermediates``; ``["image_intermediates"][0]`` is the penultimate block's
        output (the paper's ``hidden_states[-2]``), prefix (CLS) tokens dropped."""
        n = self._num_blocks()
        if n is not None and n >= 2:  # only the penultimate block; without the pooled output, skip the last block
            indices, stop_early = [n - 2], not pooled
        else:  # the last two blocks, whatever their count
            indices, stop_early = 2, False
        return self.visual.forward_intermediates(
            self.preprocess(images_BCHW), indices=indices, stop_early=stop_early, intermediates_only=not pooled,
            output_fmt=fmt,
        )

    def encode(self, images_BCHW: torch.Tensor) -> TeacherOutput:
        """Patch tokens and pooled embedding in one pass."""
        out = self._intermediates(images_BCHW, pooled=True)
        return TeacherOutput(out["image_intermediates"][0], F.normalize(out["image_features"], dim=-1))

    def image_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer patch tokens without CLS: (B, gh*gw, width)."""
        return self._intermediates(images_BCHW, pooled=False)["image_intermediates"][0]

    def pooled(self, images_BCHW: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image embedding (B, embed_dim), L2-normalised unless ``normalize=False``: the CLIPSIM space."""
        feats = self.clip.encode_image(self.preprocess(images_BCHW))
        return F.normalize(feats, dim=-1) if normalize else feats

    # --- text
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.arch) if self.arch else open_clip.get_tokenizer("ViT-B-32")
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) text embedding, L2-normalised unless ``normalize=False``."""
        if getattr(self, "text_dropped", False):
            raise TeacherError("this teacher's text tower was dropped (Teacher.drop_text: the tokenizer stage reads "
                               "only images); load the teacher again for text")
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.clip.encode_text(tokens.to(self.mean.device), normalize=normalize)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    # --- state
    def drop_text(self) -> "Teacher":
        """Free the text tower (the tokenizer stage reads only images: the paper's teacher is a vision tower):
        every submodule, parameter and buffer of the open_clip model besides ``visual`` and the logit
        scale/bias is set to None. For SigLIP2-L that is 566 M of 882 M parameters. Text methods then raise."""
        keep = {"visual", "logit_scale", "logit_bias"}
        for name in [n for n, _ in self.clip.named_children() if n not in keep]:
            setattr(self.clip, name, None)
        for name in [n for n, _ in self.clip.named_parameters(recurse=False) if n not in keep]:
            setattr(self.clip, name, None)
        for name in [n for n, _ in self.clip.named_buffers(recurse=False) if n not in keep]:
            setattr(self.clip, name, None)
        self.text_dropped = True
        return self

    def freeze(self) -> "Teacher":
        """eval mode (kept when a parent module calls .train()) and no gradients."""
        self._frozen = True
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(mode and not getattr(self, "_frozen", False))


# ------------------------------------------------------------------------------------------ loading


class TokenTable:
    """Per-item features of a whole split computed once by a frozen model (the teacher's patch tokens, the
    understanding stage's image features), looked up by item index (``batch["index"]``).

    Rows are stored in float16 on the CPU (EvoShapes train, teacher tokens: 50,000 x 16 tokens x 128 = 205 MB); a
    lookup of an index that was never filled raises instead of returning garbage."""

    def __init__(self, tokens_NTC: torch.Tensor, filled_N: torch.Tensor):
        self.tokens_NTC, self.filled_N = tokens_NTC, filled_N

    @classmethod
    @torch.no_grad()
    def build(cls, fn: "Callable[[torch.Tensor], torch.Tensor]", batches: Iterable[dict], size: int,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16) -> "TokenTable":
        """``fn(images)`` (e.g. ``teacher.image_features``) of every batch (dicts with ``image`` and ``index`` <
        ``size``)."""
        tokens, filled = None, torch.zeros(size, dtype=torch.bool)
        for batch in batches:
            index = batch["index"].long()
            out = fn(batch["image"].to(device)).to("cpu", dtype)
            if tokens is None:
                tokens = torch.zeros(size, *out.shape[1:], dtype=dtype)
            tokens[index] = out
            filled[index] = True
        if tokens is None:
            raise ValueError("TokenTable.build: no batches")
        return cls(tokens, filled)

    def summed_over_ranks(self, chunk_rows: int = 4096) -> "TokenTable":
        """The full table from every rank's share (each index filled by exactly one rank, zeros elsewhere): an
        all-reduce sum of the rows (in float32, ``chunk_rows`` rows at a time) and of the filled mask."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        counts = self.filled_N.to(torch.int32)
        dist.all_reduce(counts)
        if int(counts.max()) > 1:
            raise ValueError("TokenTable.summed_over_ranks: an index was filled by more than one rank")
        for a in range(0, len(self.tokens_NTC), chunk_rows):
            rows = self.tokens_NTC[a:a + chunk_rows].float()
            dist.all_reduce(rows)
            self.tokens_NTC[a:a + chunk_rows] = rows.to(self.tokens_NTC.dtype)
        self.filled_N = counts > 0
        return self

    @property
    def nbytes(self) -> int:
        return self.tokens_NTC.numel() * self.tokens_NTC.element_size()

    def __len__(self) -> int:
        return int(self.filled_N.sum())

    def __getitem__(self, index_B: torch.Tensor) -> torch.Tensor:
        """(B, T, C) float32 tokens of the items ``index_B``."""
        index = index_B.long().cpu()
        if index.numel() and (index.min() < 0 or index.max() >= self.filled_N.numel() or not self.filled_N[index].all()):
            raise KeyError(f"TokenTable: item indices {index.tolist()[:8]} are not all in the table")
        return self.tokens_NTC[index].float()


def _strip_prefix(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def teacher_from_weights(arch: str, weights: str | Path, normalization: Optional[Normalization] = None) -> Teacher:
    """open_clip ``arch`` with a local weights file, loaded by open_clip's own ``load_checkpoint``
    (open_clip state dicts as .pt/.bin/.safetensors, big_vision .npz for SigLIP)."""
    import open_clip

    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher weights file {str(path)!r} (config key teacher.weights) does not exist: put a local open_clip "
            f"checkpoint for teacher.arch={arch!r} there (.pt/.bin/.safetensors state dict or big_vision .npz; nothing "
            f"is downloaded), or {HOW_TO_GET_A_TEACHER}"
        )
    clip = build_clip(arch)
    try:
        open_clip.load_checkpoint(clip, str(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"teacher.weights {str(path)!r} does not fit teacher.arch={arch!r}: {str(e)[:500]}") from None
    return Teacher(clip, arch=arch, normalization=normalization)


def teacher_from_run(run_or_ckpt: str | Path, normalization: Optional[Normalization] = None) -> Teacher:
    """The teacher trained in a teacher run folder (best.ckpt, else last.ckpt) or from a teacher .ckpt."""
    from evotok.runs import RunError, load_checkpoint_file, resolve_run

    try:
        run, ckpt = resolve_run(run_or_ckpt)
    except RunError as e:
        raise TeacherError(f"teacher.run: {e}; {HOW_TO_GET_A_TEACHER}") from None
    obj = load_checkpoint_file(ckpt)
    if "state_dict" not in obj:
        raise TeacherError(f"teacher.run: {ckpt} is not a teacher checkpoint (no state_dict)")
    arch = None
    hp = obj.get("hyper_parameters", {}) or {}
    if isinstance(hp.get("config"), dict):
        arch = hp["config"].get("teacher", {}).get("arch")
    if arch is None:
        arch = run.load_config().teacher.arch
    clip = build_clip(arch)
    state = _strip_prefix(obj["state_dict"], ("teacher.clip.",))
    clip.load_state_dict(state, strict=True)
    return Teacher(clip, arch=arch, normalization=normalization)


RANDOM_INIT_SEED = 0


def load_teacher(cfg: "Config") -> Teacher:
    """A frozen Teacher from ``cfg.teacher``: ``random_init`` (an explicit opt-in for tests, so it wins over
    a ``run`` that base.yaml may set), else the ``run`` folder, else ``arch`` + local ``weights``."""
    t = cfg.teacher
    if t.random_init:
        # seeded apart from the global RNG, so every load (training, eval, analysis) rebuilds the same teacher
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            teacher = Teacher(build_clip(t.arch), arch=t.arch, normalization=teacher_normalization(cfg))
    elif t.run:
        norm = teacher_normalization(cfg) if (t.mean or t.pretrained_tag) else None  # a run: what it trained with
        teacher = teacher_from_run(t.run, normalization=norm)
    elif t.weights:
        teacher = teacher_from_weights(t.arch, t.weights, normalization=teacher_normalization(cfg))
    else:
        raise TeacherError(f"no teacher configured (teacher.run and teacher.weights are empty): {HOW_TO_GET_A_TEACHER}")
    return teacher.freeze()


def export_weights(teacher: Teacher, path: str | Path) -> Path:
    """Save the open_clip state dict: loadable with teacher.arch=<arch> teacher.weights=<path>."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in teacher.clip.state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------- zero-shot


def zero_shot_classifier(teacher: Teacher, prompt_sets: Sequence[Sequence[str] | str]) -> torch.Tensor:
    """(C, E) class embeddings: per class, the normalised mean of its prompts' normalised text embeddings."""
    rows = []
    for prompts in prompt_sets:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows.append(F.normalize(teacher.encode_text(prompts).mean(0), dim=-1))
    return torch.stack(rows)


def class_prompts(factor: str, preset: str = "evoshapes") -> list[list[str]]:
    """EvoShapes zero-shot prompts for ``factor`` in the vocabulary of ``preset`` (``data.preset``): the per-class
    caption ensembles for semantic factors, else one prompt per class."""
    from evotok.data import evoshapes

    if factor in evoshapes.SEMANTIC_FACTORS:
        return [list(p) for p in evoshapes.zero_shot_prompt_sets(factor, preset=preset)]
    return [[p] for p in evoshapes.zero_shot_prompts(factor, preset=preset)]


@torch.no_grad()
def zero_shot_accuracy(
    teacher: Teacher, batches, factors: Sequence[str] = ("shape", "count"), max_images: int = 0, preset: str = "evoshapes",
) -> dict[str, float]:
    """Zero-shot accuracy per factor over ``batches`` (dicts with ``image`` and ``labels``; EvoShapes ``preset``)."""
    was_training = teacher.training
    teacher.eval()
    classifiers = {f: zero_shot_classifier(teacher, class_prompts(f, preset)) for f in factors}
    correct = {f: 0 for f in factors}
    total = {f: 0 for f in factors}
    seen = 0
    for batch in batches:
        images = batch["image"].to(teacher.mean.device)
        if max_images:
            images = images[: max_images - seen]
        emb = teacher.pooled(images)
        for f in factors:
            labels = batch["labels"][f][: len(images)].to(emb.device)
            keep = labels >= 0
            pred = (emb @ classifiers[f].T).argmax(-1)
            correct[f] += int((pred[keep] == labels[keep]).sum())
            total[f] += int(keep.sum())
        seen += len(images)
        if max_images and seen >= max_images:
            break
    teacher.train(was_training)
    return {f: correct[f] / max(total[f], 1) for f in factors}

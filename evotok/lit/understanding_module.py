"""Stage 2, understanding (DESIGN.md §1, LLaVA-1.5 recipe): the frozen EvoTok tokenizer's features (by default
the semantic decoder's output from z_Lsem) through a 2-layer GELU MLP projector into the language model.

- ``mllm.phase=1``: the projector alone learns (the LM frozen), on caption conversations (``data.conversations
  =caption`` for EvoShapes, a LLaVA-558k-style JSON for real data);
- ``mllm.phase=2``: projector and LM learn (``optim.group_lr.projector`` / ``optim.group_lr.lm``), on
  question/answer conversations (``data.conversations=qa``, LLaVA-665k style), starting from a phase-1 run
  named by ``understanding.run``.

Upstreams: ``tokenizer.run`` (the frozen tokenizer), ``lm.run`` or ``lm.path`` (the LM), optionally
``understanding.run`` (the run whose projector and LM this one starts from). Checkpoints hold what trains: the
projector, and the LM in phase 2; the frozen tokenizer (and the phase-1 LM) come back from the upstreams.
Batches are built per message by the registry's collate (:func:`make_collate`): a record that cannot be
encoded (no ``<image>``, two of them, an empty conversation, a first answer beyond ``lm.max_length``) is
skipped and counted, with one warning naming the first few.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from evotok.config import Config, from_dict, to_dict
from evotok.lit.base import StageModule
from evotok.models.conversation import ConversationError, collate_encoded, encode_conversation
from evotok.models.mllm import FeatureSource, ImageFeatures, MultimodalLM, build_mllm

VQA_VAL_BATCHES = 4  # validation asks every question of the first batches' images (greedy answers)
WARN_FIRST = 5


def frozen_prefixes(cfg: Config) -> tuple[str, ...]:
    """State-dict prefixes that checkpoints leave out: the tokenizer always, the LM while it is frozen."""
    return ("mllm.features.",) + (("mllm.lm.",) if cfg.mllm.phase == 1 else ())


class UnderstandingModule(StageModule):
    """Wires a plain :class:`MultimodalLM` to the answer-token loss, AdamW with per-group learning rates, the
    step schedule and VQA validation."""

    stage = "understanding"
    monitor, monitor_mode = "val/loss", "min"

    def __init__(self, cfg: Config, mllm: MultimodalLM, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg, "understanding")})
        self.mllm, self.tokenizer = mllm, tokenizer
        self.n_image_tokens = mllm.features.n_tokens
        if cfg.mllm.phase == 1:
            mllm.lm.requires_grad_(False)
        if cfg.lm.gradient_checkpointing:
            mllm.lm.gradient_checkpointing_enable()
        self.table = None  # TokenTable of the train split's features (mllm.cache_features), built at train start
        self.skipped: list[str] = []
        self.logged_scalars: dict[str, float] = {}
        self._val: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------- data
    def features(self, batch: dict) -> torch.Tensor:
        """The frozen tokenizer's features of the batch's images: from the cache table when built, else computed."""
        if self.table is not None and self.training:
            return self.table[batch["index"]].to(self.device)
        return self.mllm.image_features(batch["image"].to(self.device))

    def _count_skips(self, batch: dict) -> None:
        new = batch.get("skipped") or []
        if new and len(self.skipped) < WARN_FIRST:
            warnings.warn(f"understanding: skipped record(s) that cannot be encoded: {'; '.join(new[:WARN_FIRST])} "
                          f"(further skips are counted in metrics.json as train/skipped_records)", stacklevel=2)
        self.skipped.extend(new)

    def on_train_start(self) -> None:
        if self.cfg.mllm.cache_features and self.table is None:
            from evotok.models.teacher import TokenTable

            dm = self.trainer.datamodule
            size = len(getattr(dm.dataset("train"), "base", dm.dataset("train")))
            self.table = TokenTable.build(self.mllm.image_features, dm.dataloader("train", batch_size=256), size,
                                          device=self.device)

    # --------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        self._count_skips(batch)
        if batch["lm"] is None:
            return None
        out = self.mllm(batch["lm"], self.features(batch))
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["index"]))
        self.logged_scalars["train/skipped_records"] = float(len(self.skipped))
        return out.loss

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.mllm.param_groups()

    def frozen_prefixes(self) -> tuple[str, ...]:
        return frozen_prefixes(self.cfg)

    # ------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        from evotok.eval.vqa import VQATally

        self._val = {"loss": torch.zeros(2, dtype=torch.float64, device=self.device), "vqa": VQATally()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["lm"] is None:
            return
        feats = self.features(batch)
        out = self.mllm(batch["lm"], feats)
        n = (batch["lm"].labels_BT[:, 1:] != -100).sum()
        self._val["loss"] += torch.stack([out.loss.detach().double() * n, n.double()])
        if batch_idx < VQA_VAL_BATCHES and batch.get("qa"):
            from evotok.eval.vqa import ask

            blind = feats.roll(1, dims=0)
            for j, q in enumerate(batch["qa"][0]):
                questions = [item[j]["question"] for item in batch["qa"]]
                self._val["vqa"].add(q["type"], ask(self.mllm, self.tokenizer, feats, questions),
                                     ask(self.mllm, self.tokenizer, blind, questions),
                                     [item[j]["answer"] for item in batch["qa"]])

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        loss = self._val["loss"]
        self.log("val/loss", (loss[0] / loss[1].clamp_min(1)).float(), prog_bar=True)
        for k, v in self._val["vqa"].scalars().items():
            self.log(f"val/{k.replace('/', '_')}", float(v), prog_bar=k == "vqa/overall")
        self._val = {}

# --------------------------------------------------------------------------------------------- building


def components(cfg: Config, upstream: dict) -> tuple[MultimodalLM, Any]:
    """The multimodal LM of ``cfg`` from its resolved upstreams (frozen tokenizer, LM, and the weights of
    ``understanding.run`` when given), and the text tokenizer."""
    from evotok.api import load_tokenizer
    from evotok.lit.lm_module import load_run_lm

    if "tokenizer.run" not in upstream:
        from evotok.config import ConfigError

        raise ConfigError("config key 'tokenizer.run' is empty: the understanding stage reads a trained tokenizer run")
    evotok = load_tokenizer(upstream["tokenizer.run"].artifact)
    features = ImageFeatures(evotok, FeatureSource(cfg.mllm.features, cfg.mllm.depth))
    lm, tokenizer = load_run_lm(upstream)
    torch.manual_seed(cfg.run.seed)
    mllm = build_mllm(lm, tokenizer, features.width, features)
    if "understanding.run" in upstream:
        load_trained(mllm, upstream["understanding.run"].artifact)
    return mllm, tokenizer


def load_trained(mllm: MultimodalLM, ckpt_path) -> None:
    """The projector (and the LM, when the checkpoint holds it) of an understanding checkpoint into ``mllm``."""
    from evotok.models.mllm import BridgeError
    from evotok.runs import load_checkpoint_file

    state = {k[len("mllm."):]: v for k, v in load_checkpoint_file(ckpt_path)["state_dict"].items() if k.startswith("mllm.")}
    mine = mllm.state_dict()
    bad = [k for k, v in state.items() if k not in mine or mine[k].shape != v.shape]
    if bad or not any(k.startswith("projector.") for k in state):
        raise BridgeError(f"{ckpt_path} does not fit this model (e.g. {bad[:3] or 'no projector weights'}): its "
                          f"features or LM differ from this config's mllm.features / lm.*")
    mllm.load_state_dict(state, strict=False)


def build(cfg: Config, upstream: dict) -> UnderstandingModule:
    mllm, tokenizer = components(cfg, upstream)
    return UnderstandingModule(cfg, mllm, tokenizer)


def make_collate(cfg: Config, module: UnderstandingModule):
    """The stage's batches (registry hook): :func:`conversation_collate` with the module's text tokenizer."""
    return conversation_collate(module.tokenizer, module.n_image_tokens, cfg.lm.max_length)


def conversation_collate(tokenizer, n_image_tokens: int, max_length: int):
    """Understanding batches: each conversation tokenised per message (labels on the answers only), right-padded,
    with the images, item indices and question/answer pairs; unusable records are dropped and named in
    ``skipped``."""

    def collate(items: list[dict]) -> dict[str, Any]:
        enc, keep, skipped = [], [], []
        for it in items:
            try:
                enc.append(encode_conversation(it["conversations"], tokenizer, n_image_tokens, max_length,
                                               record_id=str(it["index"])))
                keep.append(it)
            except ConversationError as e:
                skipped.append(str(e))
        return {
            "lm": collate_encoded(enc, tokenizer.pad_token_id, side="right") if enc else None,
            "image": torch.stack([it["image"] for it in keep]) if keep else torch.zeros(0),
            "index": torch.tensor([it["index"] for it in keep], dtype=torch.long),
            "qa": [it["qa"] for it in keep] if keep and all(it.get("qa") for it in keep) else [],
            "skipped": skipped,
        }

    return collate


def load_understanding(run_or_ckpt) -> tuple[MultimodalLM, Any, Config]:
    """A trained understanding run (folder or checkpoint): its multimodal LM in eval mode, the text tokenizer and
    the run's config, upstreams found through the run's records and verified."""
    from evotok.handover import verified_upstreams, with_upstreams
    from evotok.models.mllm import BridgeError
    from evotok.runs import load_checkpoint_file, resolve_run

    _, ckpt = resolve_run(run_or_ckpt)
    hp = load_checkpoint_file(ckpt, mmap=True).get("hyper_parameters") or {}
    if "mllm" not in (hp.get("config") or {}):
        raise BridgeError(f"{ckpt} is not an understanding checkpoint (no mllm section in its config)")
    cfg = from_dict(hp["config"], source=f"the config saved in {ckpt}")
    upstream = {k: v for k, v in verified_upstreams(run_or_ckpt, cfg, "understanding").items() if k != "understanding.run"}
    mllm, tokenizer = components(cfg, upstream)
    load_trained(mllm, ckpt)
    return mllm.eval(), tokenizer, with_upstreams(cfg, upstream)


def describe(cfg: Config) -> str:
    """For ``--dry-run``: what trains and from which upstreams (the models themselves come from those runs)."""
    trains = "the projector (LM frozen)" if cfg.mllm.phase == 1 else "the projector and the LM"
    depth = cfg.mllm.depth or ("Lsem" if cfg.mllm.features == "semantic" else "Lpix")
    src = "the semantic decoder's output" if cfg.mllm.features == "semantic" else "raw z_l"
    lm = f"lm.run={cfg.lm.run}" if cfg.lm.run else f"lm.path={cfg.lm.path or '(not set)'}"
    start = f"; starts from understanding.run={cfg.understanding.run}" if cfg.understanding.run else ""
    return (f"# understanding phase {cfg.mllm.phase}: trains {trains} on data.conversations={cfg.data.conversations}; "
            f"features: {src} at depth {depth} of tokenizer.run={cfg.tokenizer.run or '(not set)'}; {lm}{start}\n"
            f"# parameters: 2-layer GELU projector (feature width -> LM hidden) + the LM; sizes are read from the "
            f"upstream runs when training starts")

"""The ``lm`` stage: the stand-in LLM (DESIGN.md §2), a small Qwen2-style causal LM pretrained on EvoShapes text.

Its tokenizer is trained first, on the train split's text (captions, questions, answers and the chat roles), with
the `tokenizers` library; then the LM learns plain next-token prediction over each item's caption and its
question/answer pairs rendered as ChatML turns (no image: it learns the language, the chat format and the
answer priors, the part a pretrained LLM plays). When the run finishes, the best weights and the tokenizer are
saved as a standard Hugging Face folder, ``<run>/hf`` (``save_pretrained``): later stages load it through the
same path as any local HF checkpoint (``lm.run`` = the run folder, or ``lm.path`` = an HF folder).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from evotok.config import Config, from_dict, to_dict
from evotok.lit.base import StageModule
from evotok.lit.optim import lr_groups, step_scheduler
from evotok.models.conversation import IGNORE_INDEX, encode_conversation
from evotok.models.lm import build_lm, get_arch, save_lm, tokenizer_from_json, tokenizer_to_json, train_text_tokenizer

HF_FOLDER = "hf"
CORPUS_ITEMS = 20000  # train items whose text trains the tokenizer (the EvoShapes vocabulary is small)


def chat_turns(item: dict) -> list[dict]:
    """An item's caption and question/answer pairs as one text-only LLaVA-style conversation."""
    from evotok.data.evoshapes import CAPTION_QUESTION

    turns: list[dict] = []
    if item.get("caption"):
        turns += [{"from": "human", "value": CAPTION_QUESTION}, {"from": "gpt", "value": item["caption"]}]
    for q in item.get("qa") or []:
        turns += [{"from": "human", "value": q["question"]}, {"from": "gpt", "value": q["answer"]}]
    return turns


def corpus(cfg: Config, n: int = CORPUS_ITEMS) -> list[str]:
    """Texts that train the stand-in tokenizer: per train item its text lines, and each question and answer
    on its own (in ChatML an answer starts a line, and byte-level BPE tells 'star' from ' star')."""
    from evotok.data.evoshapes import CAPTION_QUESTION
    from evotok.data.sources import build_dataset
    from evotok.data.views import lm_view

    ds = build_dataset(cfg.data, "train")
    texts = [CAPTION_QUESTION]
    for i in range(min(n, len(ds))):
        item = lm_view(ds[i])
        texts.append(item["text"])
        texts += [s for q in item["qa"] for s in (q["question"], q["answer"])]
        texts.append(item["caption"])
    return texts


def encode_item(item: dict, tokenizer, max_length: int) -> torch.Tensor:
    """Token ids of one pretraining sequence: the ChatML rendering of :func:`chat_turns` (the format later stages
    use), else the plain text followed by the end-of-text token; cut at ``max_length`` (pretraining text, no
    answers to protect)."""
    turns = chat_turns(item)
    if turns:
        ids = encode_conversation(turns, tokenizer, 1, None, require_image=False).input_ids_T.tolist()
    else:
        ids = tokenizer.encode(item["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return torch.tensor(ids[:max_length], dtype=torch.long)


class LMModule(StageModule):
    """Wires a plain HF causal LM to next-token cross-entropy, AdamW (no weight decay on norms and biases) and the
    step schedule."""

    stage = "lm"
    monitor, monitor_mode = "val/loss", "min"

    def __init__(self, config: dict, tokenizer_json: Optional[str] = None):
        super().__init__()
        self.cfg: Config = from_dict(config)
        tokenizer = (tokenizer_from_json(tokenizer_json) if tokenizer_json
                     else train_text_tokenizer(corpus(self.cfg), self.cfg.lm.vocab_size))
        self.save_hyperparameters({"config": to_dict(self.cfg, "lm"), "tokenizer_json": tokenizer_to_json(tokenizer)})
        self.tokenizer = tokenizer
        self.lm = build_lm(get_arch(self.cfg.lm.preset), tokenizer)
        self._val = torch.zeros(2, dtype=torch.float64)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and summed token cross-entropy, and the number of predicted tokens."""
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                                  reduction="sum")
        return total, (labels != IGNORE_INDEX).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, n = self._loss(batch)
        loss = total / n.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, n = self._loss(batch)
        self._val += torch.stack([total.double(), n.double()])

    def on_validation_epoch_end(self) -> None:
        red = self.trainer.strategy.reduce(self._val, reduce_op="sum") if self.trainer.world_size > 1 else self._val
        loss = red[0] / red[1].clamp_min(1)
        self.log("val/loss", loss.float(), prog_bar=True)
        self.log("val/perplexity", loss.exp().float())

    def configure_optimizers(self):
        o = self.cfg.optim
        decay = [p for n, p in self.lm.named_parameters() if p.ndim >= 2 and "norm" not in n]
        no_decay = [p for n, p in self.lm.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
        groups = [*lr_groups({"lm": decay}, o, "lm", weight_decay=o.weight_decay),
                  *lr_groups({"lm": no_decay}, o, "lm", weight_decay=0.0)]
        opt = torch.optim.AdamW(groups, betas=tuple(o.betas))
        return {"optimizer": opt, "lr_scheduler": step_scheduler(opt, o, self.cfg.trainer.max_steps)}

    def on_run_finished(self, run, trainer) -> None:
        """Save the best weights (else the last) with the tokenizer as ``<run>/hf``, a standard HF folder."""
        from evotok.runs import load_checkpoint_file

        ckpt = run.best_ckpt if run.best_ckpt.is_file() else run.last_ckpt
        if ckpt.is_file():
            state = load_checkpoint_file(ckpt)["state_dict"]
            self.lm.load_state_dict({k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")})
        out = save_lm(self.lm, self.tokenizer, run.path / HF_FOLDER)
        print(f"stand-in LM saved as a Hugging Face folder: {out.resolve()}")


def make_collate(cfg: Config, module: LMModule):
    """Batches of right-padded token ids, labels on every real token (plain language-model pretraining)."""
    tokenizer, max_length = module.tokenizer, cfg.lm.max_length

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [encode_item(it, tokenizer, max_length) for it in items]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), int(tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)], mask[b, : len(s)] = s, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}

    return collate


def build(cfg: Config, upstream: dict) -> LMModule:
    return LMModule(to_dict(cfg, "lm"))


def describe(cfg: Config) -> str:
    """For ``--dry-run``: the stand-in LM's size (vocabulary at most lm.vocab_size), built on the meta device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = get_arch(cfg.lm.preset)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=cfg.lm.vocab_size, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            max_position_embeddings=a.max_positions, tie_word_embeddings=a.tie_embeddings))
    n = sum(p.numel() for p in model.parameters())
    return (f"# stand-in LM preset {cfg.lm.preset!r} (Qwen2-style): hidden {a.hidden}, {a.layers} layers, {a.heads} "
            f"heads ({a.kv_heads} kv); {n / 1e6:.2f} M parameters with a vocabulary of {cfg.lm.vocab_size}; "
            f"sequences of at most {cfg.lm.max_length} tokens; saved as <run>/{HF_FOLDER} when finished")


def load_run_lm(upstream: dict[str, Any]):
    """The LM an understanding or generation run reads: ``lm.run`` (a stand-in run's HF export) or ``lm.path``."""
    from evotok.models.lm import LMError, load_lm

    if "lm.run" in upstream:
        return load_lm(upstream["lm.run"].artifact)
    if "lm.path" in upstream:
        return load_lm(upstream["lm.path"].path)
    raise LMError("no language model configured: set lm.run (an `evotok train lm` run) or lm.path (a local HF folder)")

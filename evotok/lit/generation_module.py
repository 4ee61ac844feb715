"""Stage 3, text-to-image generation over residual codes (DESIGN.md §1): the LM reads the prompt and emits one
hidden state per image position; a depth transformer predicts that position's Lpix codes one after another;
the next LM input is the projection of the position's z_Lpix.

- ``gen.phase=1``: the code projection, begin-of-image embedding and depth transformer learn, the LM frozen;
- ``gen.phase=2``: everything learns (``optim.group_lr.projector`` / ``head`` / ``lm``).

Upstreams: ``tokenizer.run`` (the frozen tokenizer: codebooks, and the codes cache of the split, built once by
``evotok data codes`` or at the start of training, refused when made by another tokenizer), ``lm.run`` /
``lm.path`` (the LM), optionally ``understanding.run`` (its LM weights start this run; a phase-1 understanding
run has none and changes nothing) and ``generation.run`` (the run whose weights this one starts from: phase 2
after phase 1).

Prompts: ChatML, the caption in the user turn, the image in the assistant turn. For EvoShapes items the caption
names a random subset of the factors (the shape always; every factor half of the time), so partial prompts
("two stars") are in distribution; ``gen.caption_dropout`` of the prompts are the empty user turn, the
unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from evotok.config import Config, from_dict, to_dict
from evotok.lit.base import StageModule
from evotok.models.conversation import collate_encoded, encode_generation_prompt
from evotok.models.generator import GeneratorConfig, ImageGenerator

FACTOR_ORDER = ("count", "color", "texture", "shape", "background")


def frozen_prefixes(cfg: Config) -> tuple[str, ...]:
    return ("generator.lm.",) if cfg.gen.phase == 1 else ()


def training_caption(item: dict, gen: torch.Generator) -> str:
    """The prompt text of a training item: with EvoShapes labels, every factor half of the time, else the shape
    and a random subset of the other factors; without labels the item's caption."""
    from evotok.data.evoshapes import partial_caption

    labels = item.get("labels") or {}
    if labels and all(int(labels.get(f, -1)) >= 0 for f in FACTOR_ORDER):
        if float(torch.rand((), generator=gen)) < 0.5:
            factors = FACTOR_ORDER
        else:
            keep = torch.rand(len(FACTOR_ORDER), generator=gen) < 0.5
            factors = tuple(f for f, k in zip(FACTOR_ORDER, keep.tolist()) if k or f == "shape")
        return partial_caption(labels, factors)
    return item.get("caption", "")


class GenerationModule(StageModule):
    """Wires a plain :class:`ImageGenerator` to the per-depth code cross-entropy, AdamW with per-group learning
    rates and the step schedule; codes come from the tokenizer's codes cache by item index."""

    stage = "generation"
    monitor, monitor_mode = "val/ce", "min"

    def __init__(self, cfg: Config, generator: ImageGenerator, tokenizer: Any, codes: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg, "generation")})
        self.generator, self.tokenizer, self.codes = generator, tokenizer, codes
        if cfg.gen.phase == 1:
            generator.lm.requires_grad_(False)
        if cfg.lm.gradient_checkpointing:
            generator.lm.gradient_checkpointing_enable()
        self._val = torch.zeros(0)
        self.logged_scalars: dict[str, float] = {}

    def _codes(self, split: str, index: torch.Tensor) -> torch.Tensor:
        from evotok.data.codes import lookup

        return lookup(self.codes[split], index).to(self.device)

    def _out(self, batch: dict, split: str):
        p = batch["prompt"]
        return self.generator(p.input_ids_BT.to(self.device), p.attention_mask_BT.to(self.device),
                              self._codes(split, batch["index"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._out(batch, "train")
        B = len(batch["index"])
        self.log("train/ce", out.loss, prog_bar=True, batch_size=B)
        for k, ce in enumerate(out.ce_per_depth_D.detach(), 1):
            self.log(f"train/ce_depth{k}", ce, batch_size=B)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(self.generator.config.lpix + 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._out(batch, "val")
        B = len(batch["index"])
        self._val += torch.cat([out.ce_per_depth_D.detach().double() * B, torch.tensor([B], dtype=torch.float64, device=self.device)])

    def on_validation_epoch_end(self) -> None:
        if self._val.numel() == 0 or self._val[-1] == 0:
            return
        ce = self._val[:-1] / self._val[-1]
        self.log("val/ce", ce.mean().float(), prog_bar=True)
        for k, v in enumerate(ce, 1):
            self.log(f"val/ce_depth{k}", v.float())
            self.logged_scalars[f"ce_depth{k}"] = float(v)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.generator.param_groups()

    def frozen_prefixes(self) -> tuple[str, ...]:
        return frozen_prefixes(self.cfg)


# --------------------------------------------------------------------------------------------- building


def generator_config(cfg: Config, lpix: int) -> GeneratorConfig:
    return GeneratorConfig(lpix=lpix, head_width=cfg.gen.depth_width, head_layers=cfg.gen.depth_layers,
                           head_heads=cfg.gen.depth_heads)


def components(cfg: Config, upstream: dict) -> tuple[ImageGenerator, Any, Any]:
    """The generator of ``cfg`` from its resolved upstreams, the text tokenizer and the frozen EvoTok tokenizer."""
    from evotok.api import load_tokenizer
    from evotok.config import ConfigError
    from evotok.lit.lm_module import load_run_lm

    if "tokenizer.run" not in upstream:
        raise ConfigError("config key 'tokenizer.run' is empty: the generation stage reads a trained tokenizer run")
    evotok = load_tokenizer(upstream["tokenizer.run"].artifact)
    lm, tokenizer = load_run_lm(upstream)
    if "understanding.run" in upstream:
        from evotok.runs import load_checkpoint_file

        state = load_checkpoint_file(upstream["understanding.run"].artifact)["state_dict"]
        lm_state = {k[len("mllm.lm."):]: v for k, v in state.items() if k.startswith("mllm.lm.")}
        if lm_state:
            lm.load_state_dict(lm_state, strict=True)
    torch.manual_seed(cfg.run.seed)
    gen = ImageGenerator(generator_config(cfg, evotok.lpix), lm, evotok.quantizer.codebooks_LKd.detach().clone())
    if "generation.run" in upstream:
        load_trained(gen, upstream["generation.run"].artifact)
    return gen, tokenizer, evotok


def load_trained(gen: ImageGenerator, ckpt_path) -> None:
    """A generation checkpoint's weights into ``gen`` (the LM's only when the checkpoint holds them: phase 2)."""
    from evotok.models.generator import GenerationConfigError
    from evotok.runs import load_checkpoint_file

    state = {k[len("generator."):]: v for k, v in load_checkpoint_file(ckpt_path)["state_dict"].items()
             if k.startswith("generator.")}
    missing, unexpected = gen.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("lm.")]:
        raise GenerationConfigError(f"{ckpt_path} does not fit the generator its config describes "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def build(cfg: Config, upstream: dict) -> GenerationModule:
    from evotok.data.codes import ensure_codes

    gen, tokenizer, _ = components(cfg, upstream)
    tok_up = upstream["tokenizer.run"]
    codes = {split: ensure_codes(tok_up.path, tok_up.fingerprint, cfg.data, split) for split in ("train", "val")}
    return GenerationModule(cfg, gen, tokenizer, codes)


def make_collate(cfg: Config, module: GenerationModule):
    """Generation batches: prompt ids (right-padded; ``gen.caption_dropout`` of them the empty turn) and item
    indices (the codes come from the cache). The random choices depend only on run.seed and the batch's items."""
    tokenizer, dropout, seed = module.tokenizer, cfg.gen.caption_dropout, cfg.run.seed

    def collate(items: list[dict]) -> dict[str, Any]:
        index = [int(it["index"]) for it in items]
        gen = torch.Generator().manual_seed(hash((seed, *index[:8], len(index))) % 2**63)
        texts = ["" if float(torch.rand((), generator=gen)) < dropout else training_caption(it, gen) for it in items]
        prompts = [encode_generation_prompt(t, tokenizer) for t in texts]
        return {"prompt": collate_encoded(prompts, tokenizer.pad_token_id, side="right"),
                "index": torch.tensor(index, dtype=torch.long), "text": texts}

    return collate


def load_generation(run_or_ckpt):
    """A trained generation run: its generator in eval mode, the text tokenizer, the frozen EvoTok tokenizer and
    the run's config (its hand-over keys set to the upstreams' absolute paths, found through the run's records
    and verified)."""
    from evotok.handover import verified_upstreams, with_upstreams
    from evotok.models.generator import GenerationConfigError
    from evotok.runs import load_checkpoint_file, resolve_run

    _, ckpt = resolve_run(run_or_ckpt)
    tree = (load_checkpoint_file(ckpt, mmap=True).get("hyper_parameters") or {}).get("config") or {}
    if "gen" not in tree:
        raise GenerationConfigError(f"{ckpt} is not a generation checkpoint (no gen section in its config)")
    cfg = from_dict(tree, source=f"the config saved in {ckpt}")
    upstream = {k: v for k, v in verified_upstreams(run_or_ckpt, cfg, "generation").items() if k != "generation.run"}
    gen, tokenizer, evotok = components(cfg, upstream)
    load_trained(gen, ckpt)
    return gen.eval(), tokenizer, evotok, with_upstreams(cfg, upstream)


def describe(cfg: Config) -> str:
    trains = "the code projection + depth transformer (LM frozen)" if cfg.gen.phase == 1 else "everything, the LM too"
    lm = f"lm.run={cfg.lm.run}" if cfg.lm.run else f"lm.path={cfg.lm.path or '(not set)'}"
    return (f"# generation phase {cfg.gen.phase}: trains {trains}; depth transformer {cfg.gen.depth_layers} "
            f"layers x width {cfg.gen.depth_width}, {cfg.gen.depth_heads} heads; caption dropout "
            f"{cfg.gen.caption_dropout}; tokenizer.run={cfg.tokenizer.run or '(not set)'}; {lm}\n"
            f"# parameters: sizes come from the upstream runs (the LM, the tokenizer's Lpix codebooks) when training starts")

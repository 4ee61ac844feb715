"""The ``checker`` stage: trains the GenEval-style factor classifier (evotok/models/checker.py) on EvoShapes and
records its held-out accuracy per factor (``acc/<factor>`` on the test split, ``heldout_acc/<factor>`` on the
held-out colour x shape pairs) in metrics.json."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evotok.config import Config, from_dict, to_dict
from evotok.lit.base import StageModule
from evotok.data.evoshapes import preset_of
from evotok.models.checker import FACTORS, Checker, build_checker


class CheckerModule(StageModule):
    stage = "checker"
    monitor, monitor_mode = "val/acc_mean", "max"

    def __init__(self, config: dict):
        super().__init__()
        self.cfg: Config = from_dict(config)
        self.save_hyperparameters({"config": to_dict(self.cfg, "checker")})
        self.checker: Checker = build_checker(self.cfg.checker.width, preset_of(self.cfg.data))
        self._val: dict[str, torch.Tensor] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.checker(batch["image"])
        loss = sum(F.cross_entropy(out.logits[f], batch["labels"][f], ignore_index=-1) for f in FACTORS)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {f: torch.zeros(2, dtype=torch.float64, device=self.device) for f in FACTORS}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = {f: v.argmax(-1) for f, v in self.checker(batch["image"]).logits.items()}
        for f in FACTORS:
            keep = batch["labels"][f] >= 0
            self._val[f] += torch.stack([(pred[f][keep] == batch["labels"][f][keep]).sum().double(), keep.sum().double()])

    def on_validation_epoch_end(self) -> None:
        accs = {f: float(v[0] / v[1].clamp_min(1)) for f, v in self._val.items()}
        for f, a in accs.items():
            self.log(f"val/acc_{f}", a)
        self.log("val/acc_mean", sum(accs.values()) / len(accs), prog_bar=True)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"checker": list(self.checker.parameters())}

    def on_run_finished(self, run, trainer) -> dict[str, float]:
        """Accuracy per factor of the best checkpoint on the test split and the held-out pairs, into metrics.json."""
        from evotok.runs import write_metrics

        checker = load_checker(run.path).to(self.device)
        dm = trainer.datamodule
        scalars = {}
        for split, prefix in (("test", "acc"), ("heldout", "heldout_acc")):
            acc = checker_accuracy(checker, dm.dataloader(split, batch_size=256))
            scalars.update({f"{prefix}/{f}": a for f, a in acc.items()})
        write_metrics(run, "checker", trainer.global_step, scalars=scalars)
        print("checker accuracy (test): " + ", ".join(f"{f} {scalars[f'acc/{f}']:.3f}" for f in FACTORS))
        return scalars


@torch.no_grad()
def checker_accuracy(checker: Checker, batches) -> dict[str, float]:
    correct = {f: 0 for f in FACTORS}
    total = {f: 0 for f in FACTORS}
    for batch in batches:
        pred = checker.read(batch["image"].to(next(checker.parameters()).device))
        for f in FACTORS:
            lab = batch["labels"][f].to(pred[f].device)
            keep = lab >= 0
            correct[f] += int((pred[f][keep] == lab[keep]).sum())
            total[f] += int(keep.sum())
    return {f: correct[f] / max(total[f], 1) for f in FACTORS}


def load_checker(run_or_ckpt) -> Checker:
    """The checker of a checker run folder (best.ckpt, else last.ckpt) or checkpoint, in eval mode."""
    from evotok.runs import CheckpointError, load_checkpoint_file, resolve_run

    _, ckpt = resolve_run(run_or_ckpt)
    obj = load_checkpoint_file(ckpt)
    tree = (obj.get("hyper_parameters") or {}).get("config") or {}
    if "checker" not in tree:
        raise CheckpointError(f"{ckpt} is not a checker checkpoint (no checker section in its config)")
    checker = build_checker(from_dict(tree).checker.width, preset_of(from_dict(tree).data))
    checker.load_state_dict({k[len("checker."):]: v for k, v in obj["state_dict"].items() if k.startswith("checker.")})
    return checker.eval()


def build(cfg: Config, upstream: dict) -> CheckerModule:
    return CheckerModule(to_dict(cfg, "checker"))


def describe(cfg: Config) -> str:
    n = sum(p.numel() for p in build_checker(cfg.checker.width, preset_of(cfg.data)).parameters())
    return (f"# checker: CNN of width {cfg.checker.width} with heads for {', '.join(FACTORS)}; {n / 1e6:.2f} M "
            f"parameters")

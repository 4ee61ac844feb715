"""LightningModule for the tokenizer stage: wires the EvoTok model, the frozen teacher, the losses and a
PatchGAN discriminator. The nn.Modules compute; this file only adds optimisation, logging and checkpoints.

Step semantics: manual optimisation with two optimisers. Only the generator's ``optimizer.step()`` (Lightning's
optimizer wrapper) advances ``trainer.global_step``; the discriminator steps (only while the GAN is active,
``step >= loss.gan_start`` and ``loss.gan_weight > 0``) through the strategy's public ``optimizer_step`` (the
same precision plugin and strategy path, without the manual loop's step count). So ``trainer.max_steps``,
``loss.gan_start``, ``model.quantizer.ema_warmup``, the learning-rate schedule and every logging cadence count
generator steps (= batches when ``trainer.accumulate`` is 1). Gradient accumulation over
``accumulate_steps(cfg)`` batches is done here (Lightning refuses it for manual optimisation): the Trainer gets
``accumulate_grad_batches=1`` for this module (``module.handles_accumulation`` is True).

Parameter groups (``optim.group_lr``): encoder, pixel_decoder, semantic_decoder (generator optimiser) and disc.

Frozen modules (the teacher, LPIPS) are not written into checkpoints; they are rebuilt from the config.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch

from evotok.config import Config, accumulate_steps, from_dict, to_dict
from evotok.lit.optim import apply_lr, lr_groups, lr_multiplier
from evotok.eval.metrics import psnr
from evotok.models.codestats import code_counts, usage_perplexity
from evotok.models.discriminator import PatchDiscriminator
from evotok.models.losses import TokenizerLoss, token_cosine
from evotok.models.tokenizer import build_tokenizer

FROZEN_PREFIXES = ("teacher.", "loss.lpips.")


def log_depths(depth: int) -> list[int]:
    """Depths shown in image grids: 1, 2, 4, ... and always L."""
    out, l = [], 1
    while l < depth:
        out.append(l)
        l *= 2
    return out + [depth]


class TokenizerModule(L.LightningModule):
    monitor = "val/psnr"
    monitor_mode = "max"
    handles_accumulation = True
    # DDP: the discriminator gets no gradient in the generator's backward pass (nor the generator in the
    # discriminator's, nor the discriminator at all before loss.gan_start), so DDP must look for unused parameters:
    # evotok.lit.train.build_trainer turns trainer.strategy=auto on several devices into
    # DDPStrategy(find_unused_parameters=True)
    ddp_find_unused_parameters = True
    # ... and without broadcasting buffers at every forward: the codebooks' EMA statistics are summed over the ranks
    # and restarts chosen on rank 0 and broadcast (evotok/models/quantizer.py), so the ranks' codebooks are already
    # identical; DDP's default broadcast would copy them (about 130 MiB at paper size) from rank 0 every step
    ddp_broadcast_buffers = False

    def __init__(
        self, config: dict | Config, teacher: Optional[torch.nn.Module] = None,
        teacher_width: Optional[int] = None, teacher_grid: Optional[list] = None,
    ):
        """``teacher_width`` / ``teacher_grid`` are saved hyper-parameters (so ``load_from_checkpoint`` works);
        when given they must agree with the teacher that ``config`` builds."""
        super().__init__()
        cfg = config if isinstance(config, Config) else from_dict(config)
        self.cfg = cfg
        self.automatic_optimization = False
        if teacher is None:
            from evotok.models.teacher import load_teacher

            teacher = load_teacher(cfg).drop_text()  # only its image tower is read here
        self.teacher = teacher
        width, grid = int(teacher.width), tuple(int(g) for g in teacher.token_grid)
        if (teacher_width is not None and teacher_width != width) or (teacher_grid is not None and tuple(teacher_grid) != grid):
            raise ValueError(
                f"the teacher of this config has width {width} and grid {grid}, the checkpoint was trained with "
                f"{teacher_width} and {tuple(teacher_grid or ())}: check teacher.arch / teacher.run / teacher.weights"
            )
        self.save_hyperparameters({"config": to_dict(cfg, "tokenizer"), "teacher_width": width, "teacher_grid": list(grid)})
        self.model = build_tokenizer(cfg, width, grid)
        self.loss = TokenizerLoss(cfg.loss)
        self.disc = PatchDiscriminator(cfg.loss.disc_layers, cfg.loss.disc_channels)
        self.accumulate = accumulate_steps(cfg)
        self.batches_seen = 0  # batches through training_step in this process (tests check step semantics)
        self.last_val: dict[str, Any] = {}
        self.last_loss_terms: dict[str, torch.Tensor] = {}  # this step's named losses, read by the NaN guard
        self.logged_scalars: dict[str, float] = {}  # latest train scalars, mirrored into metrics.json
        self.teacher_table = None  # TokenTable of the train split when teacher.cache_features (built at train start)
        self._val: dict[str, torch.Tensor] = {}

    def provenance_extra(self) -> dict[str, Any]:
        """Written into the run's provenance.json: the input normalisation the teacher and the encoder use."""
        t = getattr(self.teacher, "normalization", None)
        norm = {"teacher": t.as_dict() if t is not None else None}
        enc = getattr(self.model.encoder, "normalization", None)
        norm["encoder"] = enc.as_dict() if enc is not None else {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                                 "source": "CNN encoder: [0, 1] mapped to [-1, 1]"}
        return {"normalization": norm}

    # ------------------------------------------------------------------------------- optimisers
    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Named parameter groups (``optim.group_lr`` keys); the discriminator's is ``disc``."""
        m = self.model
        named = {"encoder": list(m.encoder.parameters()), "pixel_decoder": list(m.pixel_decoder.parameters()),
                 "semantic_decoder": list(m.semantic_decoder.parameters())}
        covered = {id(p) for ps in named.values() for p in ps}
        rest = [p for p in m.parameters() if id(p) not in covered]
        if rest:
            named["quantizer"] = rest
        return {**named, "disc": list(self.disc.parameters())}

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = lr_groups(self.param_groups(), o, "tokenizer")
        betas = (float(o.betas[0]), float(o.betas[1]))
        opt_g = torch.optim.Adam([g for g in groups if g["name"] != "disc"], betas=betas, weight_decay=o.weight_decay)
        opt_d = torch.optim.Adam([g for g in groups if g["name"] == "disc"], betas=betas, weight_decay=o.weight_decay)
        return [opt_g, opt_d]

    def _set_lr(self, opt, step: int) -> None:
        apply_lr(opt, lr_multiplier(step, self.trainer.max_steps, self.cfg.optim))

    def _clip(self, opt) -> None:
        if self.cfg.optim.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")

    def _step_uncounted(self, opt) -> None:
        """The discriminator's step: ``Strategy.optimizer_step`` (public API) on the wrapped torch optimizer
        runs the same precision-plugin and strategy path as ``LightningOptimizer.step()``, without the manual
        loop's step count, so ``trainer.global_step`` counts generator steps only."""
        self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None, model=self)

    # ------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        """Build (or load from its cache) the quantizer's kernel now, before the trainer's clock starts:
        a first JIT build takes 30-80 s, which trainer.max_minutes would otherwise count as training."""
        from evotok.ops.rvq import resolve_impl

        resolve_impl(self.cfg.model.quantizer.impl, self.device)

    def on_train_start(self) -> None:
        if self.cfg.teacher.cache_features and self.teacher_table is None:
            self.teacher_table = self._cache_teacher_tokens()

    def _cache_teacher_tokens(self):
        """The teacher's tokens of the whole train split (teacher.cache_features). Built here, after the
        trainer's clock started, so trainer.max_minutes counts the time it takes."""
        import time

        from torch.utils.data import IterableDataset

        from evotok.config import ConfigError
        from evotok.models.teacher import TokenTable

        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "dataset"):
            raise ConfigError("teacher.cache_features = true needs the suite's EvoTokDataModule (trainer.fit(datamodule=...))")
        ds = dm.dataset("train")
        if isinstance(ds, IterableDataset):
            raise ConfigError(
                f"teacher.cache_features = true needs a map-style train source; data.source = "
                f"'{self.cfg.data.source}' streams its items: set teacher.cache_features=false"
            )
        size = len(getattr(ds, "base", ds))
        gh, gw = self.teacher.token_grid
        gib = size * gh * gw * self.teacher.width * 2 / 2**30
        if gib > 8:
            raise ConfigError(
                f"teacher.cache_features = true would hold {gib:.1f} GiB of teacher tokens ({size} train items); "
                "set teacher.cache_features=false"
            )
        start = time.perf_counter()
        world, rank = int(self.trainer.world_size), int(self.global_rank)
        # several ranks: each encodes every world-th item and the shares are summed, so the table costs 1/world each
        indices = range(rank, size, world) if world > 1 else None
        table = TokenTable.build(self.teacher.image_features, dm.dataloader("train", batch_size=256, indices=indices),
                                 size, device=self.device)
        if world > 1:
            table = table.summed_over_ranks()
        if self.global_rank == 0:
            print(f"teacher tokens of {len(table):,} train images cached in {time.perf_counter() - start:.1f} s "
                  f"({table.nbytes / 2**20:.0f} MiB)")
        return table

    def _teacher_tokens(self, batch: dict) -> torch.Tensor:
        """The frozen teacher's patch tokens of the batch: from the table when cached, else computed."""
        images = batch["image"]
        if self.teacher_table is not None and "index" in batch:
            return self.teacher_table[batch["index"]].to(images.device)
        with torch.no_grad():
            return self.teacher.image_features(images)

    def training_step(self, batch: dict, batch_idx: int):
        images = batch["image"]
        opt_g, opt_d = self.optimizers()
        step = self.global_step  # generator steps done so far
        self.batches_seen += 1
        self.model.quantizer.set_step(step)
        first = batch_idx % self.accumulate == 0
        last = (batch_idx + 1) % self.accumulate == 0

        target = self.model.semantic_target(self._teacher_tokens(batch)).float()
        out = self.model(images)
        gan_on = self.loss.gan_active(step)
        self.disc.requires_grad_(False)
        terms = self.loss(images, out.recon, out.semantic, target, out.quant.commit_loss, step, disc=self.disc if gan_on else None)
        self.last_loss_terms = {("train/loss" if k == "total" else f"train/{k}"): v.detach()
                                for k, v in terms._asdict().items()}
        if first:
            opt_g.zero_grad(set_to_none=True)
        self.manual_backward(terms.total / self.accumulate)
        if last:
            self._set_lr(opt_g, step)
            self._clip(opt_g)
            opt_g.step()

        d_loss = None
        if gan_on:
            self.disc.requires_grad_(True)
            d_loss = self.loss.disc_loss(self.disc(images), self.disc(out.recon.detach().float()))
            if first:
                opt_d.zero_grad(set_to_none=True)
            self.last_loss_terms["train/disc"] = d_loss.detach()
            self.manual_backward(d_loss / self.accumulate)
            if last:
                self._set_lr(opt_d, step)
                self._clip(opt_d)
                self._step_uncounted(opt_d)

        t = self.cfg.trainer
        if last and t.log_every_n_steps > 0 and step % t.log_every_n_steps == 0:
            logs = {f"train/{k}": v for k, v in terms._asdict().items()}
            logs["train/loss"] = logs.pop("train/total")
            if d_loss is not None:
                logs["train/disc"] = d_loss
            for l in range(self.model.depth):
                logs[f"train/usage_d{l + 1:02d}"] = out.quant.usage_L[l]
                logs[f"train/perplexity_d{l + 1:02d}"] = out.quant.perplexity_L[l]
            logs["train/lr"] = opt_g.param_groups[0]["lr"]
            self._write_train_scalars(logs, step)
        if self.trainer.progress_bar_callback is not None:
            self.log("train/recon_step", terms.recon.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        if t.image_log_every_n_steps > 0 and step % t.image_log_every_n_steps == 0 and last:
            self._log_images(images, out.quant.z_cum, step)
        return terms.total.detach()

    def _write_train_scalars(self, logs: dict[str, Any], step: int) -> None:
        """Train scalars go to the loggers directly, every trainer.log_every_n_steps generator steps, and
        into metrics.json (``logged_scalars``). Lightning's ``self.log`` moves its result record on every call;
        the 2 x L + 8 scalars of every step took about 7% of a tiny CPU run (500 steps in 113 s, 104 s now)."""
        floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in logs.items()}
        self.logged_scalars.update(floats)
        for logger in self.loggers:
            logger.log_metrics(floats, step=step)

    @torch.no_grad()
    def _log_images(self, images: torch.Tensor, z_cum: torch.Tensor, step: int, n: int = 8) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_image") or self.global_rank != 0:
            return
        from torchvision.utils import make_grid

        depths = log_depths(self.model.depth)
        x = images[:n].float()
        cols = [x] + [self.model.decode_pixels(z_cum[l - 1][:n].detach(), l).float().clamp(0, 1) for l in depths]
        grid = make_grid(torch.stack(cols, 1).flatten(0, 1), nrow=len(cols), padding=1)
        exp.add_image(f"recon/original_then_depths_{'_'.join(map(str, depths))}", grid.cpu(), step)

    # ------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        L_, K = self.model.depth, self.cfg.model.quantizer.codebook_size
        dev = self.device
        self._val = {
            "psnr": torch.zeros((), device=dev, dtype=torch.float64),
            "mse": torch.zeros((), device=dev, dtype=torch.float64),
            "cos_sem": torch.zeros((), device=dev, dtype=torch.float64),
            "cos_sem_d1": torch.zeros((), device=dev, dtype=torch.float64),
            "n": torch.zeros((), device=dev, dtype=torch.float64),
            "counts": torch.zeros(L_ * K, device=dev, dtype=torch.float64),
        }

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        m, v = self.model, self._val
        q = m.quantize(images)
        recon = m.pixel_decoder(q.z_cum[m.lpix - 1]).float().clamp(0, 1)
        mse = (recon - images.float()).pow(2).flatten(1).mean(1)
        v["mse"] += mse.sum().double()
        v["psnr"] += psnr(recon, images.float()).sum().double()
        target = m.semantic_target(self.teacher.image_features(images)).float()
        sem_L, sem_1 = m.semantic_decoder(q.z_cum[m.lsem - 1]), m.semantic_decoder(q.z_cum[0])
        v["cos_sem"] += token_cosine(sem_L, target).sum().double()
        v["cos_sem_d1"] += token_cosine(sem_1, target).sum().double()
        v["n"] += images.shape[0]
        v["counts"] += code_counts(q.codes, m.depth, self.cfg.model.quantizer.codebook_size).flatten()

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        red = {k: self.trainer.strategy.reduce(t, reduce_op="sum") for k, t in self._val.items()}
        n = red["n"].clamp_min(1)
        usage, perplexity = usage_perplexity(red["counts"].view(self.model.depth, -1))
        logs = {
            "val/psnr": red["psnr"] / n,
            "val/mse": red["mse"] / n,
            "val/clipsim_sem": red["cos_sem"] / n,
            "val/clipsim_sem_d1": red["cos_sem_d1"] / n,
            "val/usage_min": usage.min(),
        }
        for l in range(self.model.depth):
            logs[f"val/usage_d{l + 1:02d}"] = usage[l]
            logs[f"val/perplexity_d{l + 1:02d}"] = perplexity[l]
        logs = {k: t.float() for k, t in logs.items()}
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=False)
        self.last_val = {
            "step": int(self.global_step),
            "scalars": {k.split("/", 1)[1]: float(t) for k, t in logs.items() if "_d" not in k or "clipsim" in k},
            "usage": usage.tolist(),
            "perplexity": perplexity.tolist(),
        }
        self._val = {}

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(FROZEN_PREFIXES)]:
            del sd[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for k, t in self.state_dict().items():
            if k.startswith(FROZEN_PREFIXES):
                sd[k] = t

    def on_run_finished(self, run, trainer) -> None:
        """Write the last validation's per-depth codebook usage / perplexity (whole val split) into metrics.json
        (its scalars are already there: the trainer's metrics callback mirrors every logged value)."""
        from evotok.runs import write_metrics

        if not self.last_val:
            return
        write_metrics(
            run, "tokenizer", trainer.global_step,
            per_depth={"usage": self.last_val["usage"], "perplexity": self.last_val["perplexity"]},
        )


def build(cfg: Config, upstream: dict) -> TokenizerModule:
    """The tokenizer stage's LightningModule (called by evotok.lit.train.train); its teacher comes from the
    resolved upstream (``teacher.run`` / ``teacher.weights``), or ``teacher.random_init``."""
    from evotok.handover import with_upstreams
    from evotok.models.teacher import load_teacher

    return TokenizerModule(cfg, teacher=load_teacher(with_upstreams(cfg, upstream)).drop_text())


def describe(cfg: Config) -> str:
    """For ``--dry-run``: see :func:`evotok.models.sizes.describe_tokenizer` (meta device, no weights read)."""
    from evotok.models.sizes import describe_tokenizer

    return describe_tokenizer(cfg)

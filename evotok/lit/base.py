"""What the automatically optimised stage modules share: AdamW over named parameter groups
(``optim.group_lr``) with the step schedule, gradient clipping from ``optim.grad_clip``, and checkpoints that
leave out the frozen weights an upstream run already holds (restored from the module on load)."""

from __future__ import annotations

import lightning as L
import torch

from evotok.config import Config
from evotok.lit.optim import lr_groups, step_scheduler


class StageModule(L.LightningModule):
    """Subclasses set ``stage`` (the registry name), ``cfg`` (the resolved Config) and define
    :meth:`param_groups`; :meth:`frozen_prefixes` names state-dict prefixes left out of checkpoints."""

    stage = ""
    cfg: Config

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        raise NotImplementedError

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ()

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(lr_groups(self.param_groups(), o, self.stage, weight_decay=o.weight_decay),
                                betas=tuple(o.betas))
        return {"optimizer": opt, "lr_scheduler": step_scheduler(opt, o, self.cfg.trainer.max_steps)}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.cfg.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes = self.frozen_prefixes()
        if prefixes:
            sd = checkpoint["state_dict"]
            for k in [k for k in sd if k.startswith(prefixes)]:
                del sd[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        prefixes = self.frozen_prefixes()
        if prefixes:
            sd = checkpoint["state_dict"]
            for k, t in self.state_dict().items():
                if k.startswith(prefixes):
                    sd[k] = t

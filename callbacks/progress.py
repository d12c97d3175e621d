"""A progress bar in GRPO steps ("GRPO step 2/3"), continuous across resumes, instead of Lightning's
epochs and batches (one Lightning epoch spans the whole run here).

The bar is set up when training starts, not when an epoch starts: a resumed run continues its
epoch, so Lightning calls no epoch-start hook and would show its plain "Training: 11/?".
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps

    @property
    def train_description(self) -> str:
        return "GRPO step"

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        self._show(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._show(trainer)  # not Lightning's "Epoch N" bar

    def _show(self, trainer: L.Trainer) -> None:
        done = trainer.datamodule.next_step if trainer.datamodule is not None else 0
        self.train_progress_bar.reset(total=self.total_steps)
        self.train_progress_bar.n = done
        self.train_progress_bar.set_description("GRPO step")
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_progress_bar.n = batch["step"] + 1
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        self.train_progress_bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

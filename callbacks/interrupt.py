"""Ctrl-C finishes the current GRPO step, then stops the run cleanly, so `last.ckpt` holds every
finished step and `ckpt_path=last` continues at the next one. A second Ctrl-C stops at once (the
last checkpoint then predates the step that was running).

Stopping mid-step would leave a half-updated policy that no checkpoint can describe; Lightning's
own KeyboardInterrupt handling stops wherever the signal lands, so the first SIGINT only raises a
flag that is read between steps. Under DDP every rank stops after the same step.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import lightning as L


class StopOnInterrupt(L.Callback):
    def __init__(self) -> None:
        self.requested = False
        self.stopped = False  # the run ended because of Ctrl-C
        self._previous: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this GRPO step, then saving last.ckpt and stopping "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):  # any rank asked: all stop
            self.stopped = True
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

"""A few scored rollouts every N steps, for reading what the model writes: a table in W&B and
`samples.jsonl` in the run's folder (beside checkpoints/ and metrics.csv).

The rollout callback leaves the step's decoded responses and reward signals in the batch; this
callback picks the first sample of the first `count` prompts. On resume, rows of steps the
resumed run writes again are dropped first, as metrics.csv does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

COLUMNS = ["step", "prompt", "response", "ground_truth", "verify", "format", "reflect", "reward"]


class SamplesCallback(L.Callback):
    def __init__(self, path: str | Path, every: int, count: int) -> None:
        self.path = Path(path)
        self.every = every
        self.count = count
        self._trimmed = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int) -> None:
        step = batch["step"]
        if step % self.every != 0 or "samples" not in batch or not trainer.is_global_zero:
            return
        s = batch.pop("samples")
        n = len(s["responses"]) // len(s["prompts"])
        rows = [
            {"step": step, "prompt": s["prompts"][i], "response": s["responses"][i * n], "ground_truth": s["truths"][i],
             **{key: float(s["rewards"][key][i * n]) for key in ("verify", "format", "reflect")},
             "reward": float(s["rewards"]["total"][i * n])}
            for i in range(min(self.count, len(s["prompts"])))
        ]
        self._append(rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("samples", columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows], step=step)

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if not self._trimmed and self.path.is_file():  # a resumed run writes these steps again
            first = rows[0]["step"]
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < first]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._trimmed = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

"""Held-out accuracy during training: every `every` GRPO steps (and after the last), sample one
response per problem of each configured benchmark slice with the current policy and log
`val/<bench>/accuracy` beside the three reward signals `val/<bench>/{verify,format,reflect}`, so the
number papers report is never confused with the composite training reward.

It runs after the rollout callback has pushed the step's weights to the engine (keep it after that
callback in the list), and uses the training prompt, so format and reflect mean what they mean in
training. Under DDP the first rank validates alone (the loggers live there). Each problem samples
from its own seed (seed, step, problem), never from the global RNG: validating never changes training.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from rlvr.data import Example
from rlvr.engines.protocol import RolloutEngine, SamplingParams
from rlvr.evaluate import evaluate_benchmark
from rlvr.rewards import RewardScorer


class ValidationCallback(L.Callback):
    def __init__(
        self,
        benchmarks: dict[str, list[Example]],
        engine: RolloutEngine,
        scorer: RewardScorer,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingParams,
        every: int,
        total_steps: int,
        seed: int = 0,
        system_prompt: str | None = None,
        instruction: str = "",
        shots: Sequence[tuple[str, str]] = (),
    ) -> None:
        if every < 1:
            raise ValueError(f"validation.every must be at least 1, got {every}")
        self.benchmarks = benchmarks
        self.engine = engine
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.every = every
        self.total_steps = total_steps
        self.seed = seed
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.shots = shots

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int) -> None:
        done = batch["step"] + 1
        if (done % self.every and done != self.total_steps) or not trainer.is_global_zero:
            return  # under DDP the first rank validates; the others wait at the next step's all-reduce
        began = time.perf_counter()
        metrics: dict[str, float] = {}
        for name, examples in self.benchmarks.items():
            result, _ = evaluate_benchmark(
                name, examples, self.engine, self.tokenizer, self.scorer, self.sampling,
                seed=self.seed, step=done, system_prompt=self.system_prompt, instruction=self.instruction,
                shots=self.shots,
            )
            metrics[f"val/{name}/accuracy"] = result.pass1
            for signal in ("verify", "format", "reflect"):
                metrics[f"val/{name}/{signal}"] = getattr(result, signal)
            metrics[f"val/{name}/response_length"] = result.mean_length
        metrics["time/validation_s"] = time.perf_counter() - began
        # Straight to the loggers: `self.log` would repeat these values on every later step of the
        # epoch (one epoch spans the run). callback_metrics lets a sweep or a checkpoint use them.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=batch["step"])
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

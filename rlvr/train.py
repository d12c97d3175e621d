"""Train with GRPO: `python -m rlvr.train mode=quick gpu=cpu [key=value ...]` (or `rlvr-train`).

The composition root: checks the config (rlvr.cli), builds the data, policy, engine, reward,
callbacks, logger and trainer, calls `fit` (resuming from `ckpt_path`), prints where the run is and
what to do next, and returns the metric a sweep optimizes. Training logic lives in rlvr.module,
rollouts in callbacks.rollout.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlvr import cli
from rlvr.cli import check_config, check_overrides, fail, grpo_config, model_argument, prompt_shots, quiet
from rlvr.errors import UserError

if TYPE_CHECKING:  # the training stack is imported in train(): a wrong command fails before Lightning's import
    import lightning as L

    from callbacks.validation import ValidationCallback
    from rlvr.engines.protocol import RolloutEngine
    from rlvr.rewards import RewardScorer

CONF_DIR = str(cli.CONF_DIR)
log = logging.getLogger(__name__)
# Lightning warns that manual optimization saves the weights after the update: that is what resume needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # a resume: it should


def validation(cfg: DictConfig, engine: RolloutEngine, scorer: RewardScorer, tokenizer, steps: int) -> ValidationCallback:
    from callbacks.validation import ValidationCallback
    from rlvr.data import load_benchmark
    from rlvr.engines.protocol import SamplingParams
    from rlvr.evaluate import benchmark_source

    v = cfg.validation
    sources = OmegaConf.to_container(cfg.benchmark_sources, resolve=True)
    benchmarks = {name: load_benchmark(benchmark_source(name, sources), limit=v.limit) for name in v.benchmarks}
    sampling = SamplingParams(1, v.temperature, cfg.rollout.top_p, v.max_new_tokens)
    return ValidationCallback(benchmarks, engine, scorer, tokenizer, sampling, every=v.every, total_steps=steps,
                              seed=cfg.seed, system_prompt=cfg.prompt.system, instruction=cfg.prompt.instruction,
                              shots=prompt_shots(cfg.prompt))


def reward_scorer(cfg: DictConfig) -> RewardScorer:
    """The reward module with the run's weights (a sweep sets reward.alpha/beta/gamma) and prompt
    instruction (for the reflect signal; validation shares this scorer). By default the processes of
    one node share its cores."""
    from rlvr.rewards import RewardScorer, weights_from_env

    weights = weights_from_env((cfg.reward.alpha, cfg.reward.beta, cfg.reward.gamma))
    workers = cfg.reward.workers if cfg.reward.workers is not None else max(1, (os.cpu_count() or 1) // cfg.devices)
    return RewardScorer(weights, timeout=cfg.reward.timeout, workers=workers, instruction=cfg.prompt.instruction)


def optimized_metric(cfg: DictConfig) -> str:
    """What a sweep maximizes: held-out accuracy when validation runs, else training accuracy."""
    if cfg.optimized_metric:
        return cfg.optimized_metric
    return f"val/{cfg.validation.benchmarks[0]}/accuracy" if cfg.validation.benchmarks else "reward/accuracy"


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None, checked: bool = False) -> float | None:
    """Builds and runs one training job. `extra_callbacks` (a benchmark's step timer, say) run
    before rlvr's own, so their batch hooks bracket the rollout too."""
    if not checked:
        check_config(cfg)
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    quiet()  # again: importing Lightning gives it its own console handler, which would print every line twice

    from callbacks.interrupt import StopOnInterrupt
    from callbacks.progress import StepProgressBar
    from callbacks.rollout import RolloutCallback
    from callbacks.samples import SamplesCallback
    from rlvr.checkpoints import AtomicCheckpointIO, RunCheckpoint, make_present, resolve_ckpt_path
    from rlvr.data import PromptDataModule, load_examples
    from rlvr.distributed import make_strategy, shards_weights
    from rlvr.adapters import AdapterSpec, apply, lightning_precision
    from rlvr.engines.factory import make_engine
    from rlvr.engines.protocol import EngineOptions, SamplingParams, decode_dtype
    from rlvr.loggers import close_loggers, make_loggers, save_run_config
    from rlvr.models import ModelSpec, check_context, load_model, load_tokenizer
    from rlvr.module import GRPOModule
    from rlvr.report import run_summary

    L.seed_everything(cfg.seed, workers=True)
    world = cfg.devices * cfg.num_nodes
    output_dir = Path(cfg.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)

    spec = ModelSpec.from_config(cfg.model)
    adapter = AdapterSpec.from_config(OmegaConf.to_container(cfg.adapter, resolve=True))
    tokenizer = load_tokenizer(spec)
    if adapter.enabled:  # the frozen base in the precision's dtype (or NF4), the adapter float32 (rlvr.adapters)
        base = load_model(spec, tokenizer, dtype=getattr(torch, decode_dtype(cfg.trainer.precision)))
        policy = apply(base, adapter, seed=cfg.seed).train()
    else:
        policy = load_model(spec, tokenizer, dtype=torch.float32).train()  # from_pretrained returns eval mode
    if cfg.model.gradient_checkpointing:  # non-reentrant: the variant that works under DDP and FSDP
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    data_options = OmegaConf.to_container(cfg.data, resolve=True)
    max_prompt_tokens = data_options.pop("max_prompt_tokens")
    datamodule = PromptDataModule(
        load_examples(**data_options), tokenizer, batch_size=cfg.batch_size, seed=cfg.seed,
        max_prompt_tokens=max_prompt_tokens, system_prompt=cfg.prompt.system, instruction=cfg.prompt.instruction,
        shots=prompt_shots(cfg.prompt),
    )
    datamodule.setup()
    check_context(policy, datamodule.longest_prompt, cfg.rollout.max_new_tokens)  # needs the model: here, not in check_config
    steps = cfg.steps if cfg.steps is not None else cfg.epochs * datamodule.batches_per_epoch

    sampling = SamplingParams(cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens)
    module = GRPOModule(policy, grpo_config(cfg), batch_size=cfg.batch_size, model_spec=asdict(spec), world=world,
                        adapter=asdict(adapter) if adapter.enabled else None)

    trainer_options = instantiate(cfg.trainer, _convert_="all")  # a strategy may be a _target_ object
    trainer_options["strategy"] = make_strategy(trainer_options["strategy"], world)  # fsdp2: rlvr.distributed
    trainer_options["precision"] = lightning_precision(trainer_options["precision"], adapter)
    # The engine generates with the policy itself, unless the strategy shards it: then with a full copy
    # that receives the gathered weights after every update (rlvr.distributed).
    engine_options = EngineOptions.from_config(OmegaConf.to_container(cfg.rollout, resolve=True),
                                               cfg.trainer.precision, seed=cfg.seed)
    sharded = shards_weights(trainer_options["strategy"]) and engine_options.engine == "hf"
    new_tokens = max(sampling.max_new_tokens, cfg.validation.max_new_tokens if cfg.validation.benchmarks else 0)
    engine = make_engine(engine_options, copy.deepcopy(policy) if sharded else policy, tokenizer,
                         max_model_len=datamodule.longest_prompt + new_tokens)
    scorer = reward_scorer(cfg)

    updates = module.updates_per_step  # optimizer steps per GRPO step; Lightning counts the former
    checkpoint = RunCheckpoint(output_dir / "checkpoints", cfg.save_every, cfg.keep_checkpoints, updates)
    if ckpt_path is not None and rank_zero_only.rank == 0:
        make_present(ckpt_path, output_dir / "checkpoints")  # an earlier step-N.ckpt: later ones go aside
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:
        save_run_config(output_dir, resolved, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])
    loggers = make_loggers(OmegaConf.to_container(cfg.logger), output_dir, resolved, resume=ckpt_path is not None)
    interrupt = StopOnInterrupt()
    trainer = L.Trainer(
        **trainer_options,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        max_steps=steps * updates,
        max_epochs=-1,
        logger=loggers,
        callbacks=[
            *(extra_callbacks or []),
            RolloutCallback(engine, scorer, tokenizer, sampling, seed=cfg.seed,  # pushes weights; keep it first
                            push_dtype=getattr(torch, engine_options.dtype),
                            dynamic_sampling=cfg.grpo.dynamic_sampling, max_sampling_rounds=cfg.grpo.max_sampling_rounds,
                            overlong_buffer=cfg.reward.overlong_buffer, overlong_penalty=cfg.reward.overlong_penalty),
            *([validation(cfg, engine, scorer, tokenizer, steps)] if cfg.validation.benchmarks else []),
            *([SamplesCallback(output_dir / "samples.jsonl", cfg.samples.every, cfg.samples.count)]
              if cfg.samples.every else []),
            checkpoint,
            interrupt,
            StepProgressBar(steps),
        ],
        use_distributed_sampler=False,  # StepSampler hands each rank its share of the step's batch
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        default_root_dir=output_dir,
        plugins=[AtomicCheckpointIO()],
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        scorer.close()
        engine.close()
        close_loggers(loggers)
    if trainer.is_global_zero:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        log.info("\n%s", run_summary(output_dir, overrides, steps))
    if interrupt.stopped:
        print(f"stopped by Ctrl-C after {datamodule.next_step} steps; {output_dir / 'checkpoints' / 'last.ckpt'} holds "
              f"them: continue with ckpt_path=last output_dir={output_dir}", file=sys.stderr)
        raise SystemExit(130)
    metric = trainer.callback_metrics.get(optimized_metric(cfg))
    return None if metric is None else float(metric)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_config(cfg, profile=HydraConfig.get().runtime.choices.get("gpu"))
        # Hydra's resolved run folder: each job of a multirun (`-m`) gets its own, and the processes
        # Lightning starts for DDP are handed the first process's (`output_dir` may hold `${now:}`).
        cfg.output_dir = str(run_dir)
        return train(cfg, checked=True)
    except UserError as error:  # a bad setting, data row or checkpoint: one line, status 2
        fail(error, run_dir)


def main() -> float | None:
    """`rlvr-train` and `python -m rlvr.train`: the checks that need no config come first."""
    quiet()
    argv = model_argument(sys.argv[1:])
    try:
        check_overrides(argv)
    except UserError as error:
        fail(error)
    sys.argv = [sys.argv[0], *argv]
    return _hydra_main()


if __name__ == "__main__":
    main()

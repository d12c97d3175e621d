"""Update time with fixed-row and token-budget micro-batches in each layout, side by side on the same rollout.

    nice -n 10 python benchmarks/update_batching.py --model smollm2-135m --scale 8 --threads 1
    nice -n 10 python benchmarks/update_batching.py --model tiny --threads 1

The rollout: 8 prompts x 8 samples with real lengths. Prompts are 8 MATH-500 problems under rlvr's
training prompt (conf/config.yaml) and the Qwen2.5 chat template; each sample's response length is
drawn from the lengths of MATH-500's 500 reference solutions (mean 219, max 1,389 tokens), all
tokenized with the Qwen2.5 tokenizer in ../shared. Every length is then divided by `--scale` (default
4, rounded up), so that the update fits this machine's memory and time on CPU: dividing all lengths
by one factor keeps each method's padding fraction (up to the rounding) and shrinks the matmuls.
Token ids are random (the content does not change the cost).

Fixed rows: 4 consecutive rows per micro-batch, padded (grpo.pack=false), as gpu=l4 ran before token
budgets. Token budget: 4 x (the longest prompt + the longest response), so that the widest micro-batch
is the fixed-row worst case, in three layouts (rlvr.module.layout): `rows`, padded rows sorted by length
(grpo.pack=false); `lanes`, rows back to back in lanes no wider than the longest row, the samples of a
prompt side by side sharing one copy of it (rlvr.grpo.lane_micro_batches; what grpo.pack=auto runs on
sdpa, so on CPU); `sequence`, each micro-batch one sequence, every row with its own prompt
(grpo.pack=sequence; what auto runs under flash or flex attention, a GPU's path, here on sdpa under a
dense (T x T) block-diagonal mask over its T tokens). Each round runs one update
(`GRPOModule.training_step`, no KL term, one update per step: the gradient passes only) with each
method, in alternating order, on the same weights (SGD with lr 0; AdamW's step would add the same
time to both). The update's time is the CPU time of the process (`time.process_time`), not the wall
clock: on a machine shared with other jobs the wall clock measures the share of the cores this job
got (both are printed per round). A method's time is its best round (the mean is printed beside
it).

It prints each method's micro-batch count, the tokens its forwards computed (padding included; a
shared prompt once), its padding fraction, update CPU seconds, its time as a ratio of the fixed rows',
and its FLOP rate as a fraction of this machine's measured fp32 matmul rate (both per CPU second per
thread): 6 x the decoder's matmul parameters per computed token plus 6 x the LM head's per response
token (it runs on those only), forward and backward; attention's own matmuls and the LM head's
recomputation in the backward (its chunks are checkpointed) are left out. The last line is
`token-budget/fixed-row update time ratio: X.XX`, for the layout that grpo.pack=auto takes with this
model (lanes on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from rlvr.cli import CONF_DIR, prompt_shots  # noqa: E402  (importing it registers conf's resolvers: prompt.instruction is one)
from rlvr.data import build_prompt  # noqa: E402
from rlvr.engines.protocol import Generation  # noqa: E402
from rlvr.grpo import GRPOConfig  # noqa: E402
from rlvr.models import ModelSpec, load_model, load_tokenizer  # noqa: E402
from rlvr.module import GRPOModule, layout, row_lengths  # noqa: E402
from rlvr.rewards import RewardBatch  # noqa: E402
from rlvr.rollout import Rollout, pack_rollout  # noqa: E402

SHARED = ROOT.parent / "shared"
PROMPTS, SAMPLES, FIXED_ROWS = 8, 8, 4


def math500_lengths(seed: int, scale: int) -> tuple[list[int], list[int]]:
    """8 prompts' lengths and 64 response lengths (8 per prompt), Qwen2.5 tokens divided by `scale`."""
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5")
    tokenizer.chat_template = (SHARED / "tokenizers" / "qwen2.5" / "qwen2_5.jinja").read_text()
    prompt = OmegaConf.load(Path(CONF_DIR) / "config.yaml").prompt
    rows = [json.loads(line) for line in (SHARED / "data" / "math500" / "test.jsonl").read_text().splitlines()]
    solutions = [len(tokenizer(row["solution"])["input_ids"]) for row in rows]
    rng = random.Random(seed)
    chosen = rng.sample(rows, PROMPTS)
    prompts = [len(tokenizer(build_prompt(r["problem"], tokenizer, prompt.system, prompt.instruction, prompt_shots(prompt)))["input_ids"])
               for r in chosen]
    responses = [rng.choice(solutions) for _ in range(PROMPTS * SAMPLES)]
    return [math.ceil(p / scale) for p in prompts], [math.ceil(r / scale) for r in responses]


def make_rollout(prompt_lengths: list[int], response_lengths: list[int], vocab: int, seed: int) -> Rollout:
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(100, vocab, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [ids(n) for n in prompt_lengths]
    completions = [ids(n) for n in response_lengths]
    rewards = torch.randint(0, 2, (len(completions),), generator=generator).float()
    zeros = torch.zeros_like(rewards)
    return pack_rollout(prompts, Generation(completions, [[0.0] * len(c) for c in completions]), SAMPLES,
                        pad_id=0, eos_ids=[], rewards=RewardBatch(rewards, zeros, zeros, rewards, 0))


class OneProcess:
    """What GRPOModule.training_step asks of a Lightning trainer, in one process."""

    world_size = 1

    class strategy:  # noqa: N801
        reduce = staticmethod(lambda tensor, reduce_op=None: tensor)
        reduce_boolean_decision = staticmethod(lambda decision, all=True: decision)  # noqa: A002


def update_module(policy: nn.Module, **micro: int | bool) -> tuple[GRPOModule, dict]:
    """A GRPOModule on `policy` whose training_step runs outside Lightning and records what it logs."""
    module = GRPOModule(policy, GRPOConfig(n=SAMPLES, kl_coef=0.0, **micro), batch_size=PROMPTS)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    module._trainer = OneProcess()
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.0])
    module.manual_backward = lambda loss: loss.backward()
    logged: dict = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)
    return module, logged


def matmul_rate(size: int = 2048, tries: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s per second of CPU time per thread: the best of `tries` square products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = math.inf
    for _ in range(tries):
        began = time.process_time()
        torch.mm(a, b)
        best = min(best, (time.process_time() - began) / torch.get_num_threads())
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model name")
    parser.add_argument("--scale", type=int, default=4, help="divide every length by this")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a machine shared with other jobs, where "
                             "OpenMP threads that wait for a descheduled peer make small ops ten times slower")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = ModelSpec.from_config(OmegaConf.load(Path(CONF_DIR) / "model" / f"{args.model}.yaml"))
    policy = load_model(spec, load_tokenizer(spec))
    prompt_lengths, response_lengths = math500_lengths(args.seed, args.scale)
    rollout = make_rollout(prompt_lengths, response_lengths, policy.config.vocab_size, args.seed)
    budget = FIXED_ROWS * (max(prompt_lengths) + max(response_lengths))
    fixed_name = f"fixed-row ({FIXED_ROWS})"
    methods = {fixed_name: dict(micro_batch_size=FIXED_ROWS, pack=False),
               **{f"budget {budget} {shape}": dict(micro_batch_tokens=budget, pack=False if shape == "rows" else shape)
                  for shape in ("rows", "lanes", "sequence")}}
    default = f"budget {budget} {layout('auto', policy)}"  # what grpo.pack=auto runs with this model
    modules = {name: update_module(policy, **micro) for name, micro in methods.items()}
    rows = rollout.input_ids.shape[0]
    useful = int(rollout.attention_mask.sum())
    responses = int(rollout.response_mask.sum())
    params = sum(m.weight.numel() for m in policy.modules() if isinstance(m, nn.Linear))
    head = policy.get_output_embeddings().weight.numel()  # runs on the response tokens only
    rate = matmul_rate()
    print(f"model {args.model}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, "
          f"{params / 1e6:.1f}M in matmuls; {torch.get_num_threads()} threads")
    print(f"rollout: {PROMPTS} prompts x {SAMPLES} samples, MATH-500 lengths (Qwen2.5 tokens) / {args.scale}: "
          f"prompt mean {statistics.mean(prompt_lengths):.0f} max {max(prompt_lengths)}, response mean "
          f"{statistics.mean(response_lengths):.0f} max {max(response_lengths)}; {useful} tokens in all")
    print(f"matmul rate: {rate / 1e9:.1f} GFLOP per CPU second per thread (fp32 2048x2048, best of 5)")

    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(args.rounds):
        for name in (list(methods) if round_ % 2 == 0 else list(reversed(methods))):
            module, logged = modules[name]
            cpu = time.process_time()
            module.training_step({"rollout": rollout, "step": round_}, round_)
            seconds[name].append(time.process_time() - cpu)
            print(f"  round {round_ + 1}: {name} {seconds[name][-1]:.1f} CPU s, {float(logged['time/update_s']):.1f} s "
                  "wall", flush=True)

    # The best round of each: the one least slowed by other jobs on the machine
    print(f"\n{'method':<24}{'micro-batches':>14}{'tokens computed':>16}{'padding_frac':>14}{'update CPU s best':>19}"
          f"{'mean':>8}{'/fixed-row':>12}{'computed/matmul':>17}")
    best = {name: min(s) for name, s in seconds.items()}
    for name, (module, logged) in modules.items():
        micro = module._micro_batches(rollout, torch.arange(rows))
        lengths = row_lengths(rollout, torch.arange(rows), shared=module._layout == "lanes")
        computed = sum(lengths.tokens(lanes) for lanes in micro)
        flops = 6 * (params - head) * computed + 6 * head * responses  # the decoder on every token, the head on responses
        rate_share = flops / (best[name] / torch.get_num_threads()) / rate
        print(f"{name:<24}{len(micro):>14}{computed:>16}{float(logged['train/padding_frac']):>14.3f}{best[name]:>19.2f}"
              f"{statistics.mean(seconds[name]):>8.2f}{best[name] / best[fixed_name]:>12.2f}{rate_share:>17.3f}")
    print(f"grpo.pack=auto with this model: {default}")
    print(f"token-budget/fixed-row update time ratio: {best[default] / best[fixed_name]:.2f}")


if __name__ == "__main__":
    main()

"""Cost of one decoding step's sampling in the HF engine, per sampler, on the logits' device.

    python benchmarks/sampler.py                    # 128 rows x 151,936 (Qwen2.5's vocabulary), CPU
    python benchmarks/sampler.py --device cuda

Compared side by side on the same logits:
- `per-row generators (before)`: Gumbel-max with one CPU `torch.Generator` per row, drawing
  rows x vocabulary exponentials in a Python loop and copying them to the device: what rlvr's HF
  engine did when the first H200 run generated 202 tokens/s;
- `counter-based Gumbel`: the same Gumbel-max with a vectorized counter-based hash on the device
  (one hash per vocabulary entry);
- `rlvr (inverse CDF)`: `rlvr.engines.hf.SeededSampler`, one counter-based uniform per row.
The last line is `before/rlvr time ratio: X.XX` (above 1: rlvr's sampler is faster).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from rlvr.engines.hf import SeededSampler, hash32, row_keys


def per_row_generators(seeds: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def sample(scores: torch.Tensor) -> torch.Tensor:
        exponential = torch.empty(len(generators), scores.shape[-1])
        for row, generator in zip(exponential, generators):
            row.exponential_(generator=generator)
        return (scores - exponential.log().to(scores.device)).argmax(dim=-1)

    return sample


def counter_gumbel(seeds: list[int], vocab: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    keys, vocab_hash, position = row_keys(seeds, device), hash32(torch.arange(vocab, device=device)), [0]

    def sample(scores: torch.Tensor) -> torch.Tensor:
        position[0] += 1
        step_keys = hash32(keys ^ hash32(torch.tensor(position[0], device=device)))
        uniform = ((hash32(step_keys[:, None] ^ vocab_hash[None, :]) >> 8).float() + 0.5) * 2.0**-24
        return (scores - (-uniform.log()).log()).argmax(dim=-1)

    return sample


def rlvr_sampler(seeds: list[int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    sampler = SeededSampler(seeds, temperature=1.0, top_p=1.0, device=device)
    return lambda scores: sampler(None, scores).argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    scores = torch.randn(args.rows, args.vocab, device=device)
    seeds = list(range(args.rows))
    samplers = {
        "per-row generators (before)": per_row_generators(seeds),
        "counter-based Gumbel": counter_gumbel(seeds, args.vocab, device),
        "rlvr (inverse CDF)": rlvr_sampler(seeds, device),
    }
    print(f"{args.rows} rows x {args.vocab} vocabulary on {device} ({torch.get_num_threads()} CPU threads)")
    print(f"{'sampler':30} {'ms per decoding step':>22}")
    times = {}
    for name, sample in samplers.items():
        sample(scores)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(args.steps):
            sample(scores)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - began) / args.steps * 1000
        print(f"{name:30} {times[name]:22.1f}")
    print(f"before/rlvr time ratio: {times['per-row generators (before)'] / times['rlvr (inverse CDF)']:.2f}")


if __name__ == "__main__":
    main()

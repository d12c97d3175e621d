"""Reward scoring speed: rlvr's batch scorer vs a plain serial loop over math-verify, in one run.

    python benchmarks/reward_throughput.py [--responses 4096] [--workers N] [--timeout 5]

Responses: MATH-500 gold solutions and GSM8K test solutions (their `#### N` boxed), cycled to the
requested count, plus a few pathological ones (a 200,000-character answer, 10,000 nested braces, a
power tower that makes sympy spin). The serial baseline is what a naive trainer does: math-verify's
parse + verify on the last box, one response after another, in the main thread with math-verify's own
timeouts. Prints responses per second for each, the ratio, and the worst time for one response.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"

PATHOLOGICAL = [
    ("\\boxed{" + "9" * 200_000 + "}", "9"),
    ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1"),
    ("\\boxed{(x+1)^{(x+1)^{(x+1)^{(x+1)^{99999}}}}}", "(x+1)^{(x+1)^{(x+1)^{(x+1)^{99998}}}}"),
    ("\\boxed{" + "+".join(["x"] * 20_000) + "}", "20000x"),
]


def load_pairs(count: int) -> list[tuple[str, str]]:
    math500 = [json.loads(line) for line in (SHARED / "data/math500/test.jsonl").open()]
    gsm8k = [json.loads(line) for line in (SHARED / "data/gsm8k/test.jsonl").open()]
    pairs = [(r["solution"], r["answer"]) for r in math500]
    for r in gsm8k:
        work, number = r["answer"].rsplit("####", 1)
        pairs.append((f"{work}\\boxed{{{number.strip()}}}", r["answer"]))
    base = count - len(PATHOLOGICAL)
    return [pairs[i % len(pairs)] for i in range(base)] + PATHOLOGICAL


def serial_math_verify(pairs: list[tuple[str, str]], timeout: int) -> tuple[float, float, int]:
    """The naive baseline: seconds in all, worst seconds for one, and how many passed."""
    from math_verify import parse, verify

    from rlvr.answers import ground_truth_answer, last_boxed

    worst, passed = 0.0, 0
    began = time.perf_counter()
    for response, truth in pairs:
        one = time.perf_counter()
        boxed = last_boxed(response)
        if boxed:
            gold = parse(f"${ground_truth_answer(truth)}$", parsing_timeout=timeout)
            pred = parse(f"${boxed}$", parsing_timeout=timeout)
            passed += bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
        worst = max(worst, time.perf_counter() - one)
    return time.perf_counter() - began, worst, passed


def batch_scorer(pairs: list[tuple[str, str]], workers: int, timeout: float) -> tuple[float, float, float, int, int]:
    """rlvr's RewardScorer: start-up seconds, scoring seconds, worst single response, passes, timeouts."""
    from rlvr.rewards import RewardScorer

    responses, truths = [p[0] for p in pairs], [p[1] for p in pairs]
    with RewardScorer(workers=workers, timeout=timeout) as scorer:
        began = time.perf_counter()
        scorer(["\\boxed{1}"], ["1"])  # start the pool; a trainer pays this once per run
        startup = time.perf_counter() - began
        began = time.perf_counter()
        result = scorer(responses, truths)
        elapsed = time.perf_counter() - began
        worst = 0.0
        for response, truth in pairs[-len(PATHOLOGICAL):] + pairs[:4]:  # the single-response worst case
            one = time.perf_counter()
            scorer([response], [truth])
            worst = max(worst, time.perf_counter() - one)
    return startup, elapsed, worst, int(result.verify.sum()), result.timeouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs each timed-out input whole

    pairs = load_pairs(args.responses)
    serial_s, serial_worst, serial_passed = serial_math_verify(pairs, int(args.timeout))
    startup, batch_s, batch_worst, batch_passed, timeouts = batch_scorer(pairs, args.workers, args.timeout)

    n = len(pairs)
    print(f"{n} responses ({n - len(PATHOLOGICAL)} gold MATH-500/GSM8K solutions + {len(PATHOLOGICAL)} pathological), "
          f"{os.cpu_count()} cores, time limit {args.timeout:g} s")
    print(f"{'scorer':<34}{'seconds':>9}{'resp/s':>10}{'worst one (s)':>15}{'verified':>10}")
    print(f"{'serial math-verify loop':<34}{serial_s:>9.2f}{n / serial_s:>10.0f}{serial_worst:>15.2f}{serial_passed:>10}")
    label = f"rlvr RewardScorer ({args.workers} workers)"
    print(f"{label:<34}{batch_s:>9.2f}{n / batch_s:>10.0f}{batch_worst:>15.2f}{batch_passed:>10}")
    print(f"pool start-up (once per run): {startup:.2f} s; timeouts counted: {timeouts}")
    print(f"rlvr/serial throughput ratio: {serial_s / batch_s:.2f}")


if __name__ == "__main__":
    main()

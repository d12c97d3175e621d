"""rlvr's vLLM engine against the same `vllm.LLM` called directly, in one process, on one engine.

    python benchmarks/engine_overhead.py                          # tiny-arith, 16 prompts x 8 x 64 tokens
    python benchmarks/engine_overhead.py --model smollm2-135m --prompts 8

`benchmarks/step_breakdown.py` compares a training run's rollouts with raw vLLM started in a
separate run; this isolates what rlvr's engine itself adds (one request per prompt with its own
seed, log-prob extraction, the wake/sleep bookkeeping). Rounds alternate, each after a prefix-cache
reset, with the same prompts and seeds on both sides; the last line is
`engine/raw throughput ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-arith", help="a conf/model name")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from vllm import SamplingParams as VLLMSampling

    from rlvr.engines.factory import make_engine
    from rlvr.engines.protocol import EngineOptions, SamplingParams
    from rlvr.engines.vllm import request_seed
    from rlvr.models import ModelSpec, load_model, load_tokenizer
    from rlvr.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = ModelSpec.from_config(compose(config_name="config", overrides=[f"model={args.model}"]).model)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    options = EngineOptions(engine="vllm", enforce_eager=True, cpu_kvcache_gib=2, max_num_seqs=256)
    engine = make_engine(options, model, tokenizer, max_model_len=args.prompt_tokens + args.max_new_tokens + 8)
    engine.load_weights(model.named_parameters())
    rng = random.Random(0)
    vocab = min(len(tokenizer), 250)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:1], params, [0])  # warm-up, untimed

    def rlvr(seeds: list[int]) -> int:
        return sum(len(t) for t in engine.generate(prompts, params, seeds).tokens)

    def raw(seeds: list[int]) -> int:
        sampling = [VLLMSampling(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens,
                                 seed=request_seed(s), logprobs=0, detokenize=False, stop_token_ids=engine.eos)
                    for s in seeds]
        outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        return sum(len(sample.token_ids) for request in outputs for sample in request.outputs)

    rates: dict[str, list[float]] = {"rlvr engine": [], "raw vllm.LLM": []}
    for round_ in range(args.rounds):
        seeds = [round_ * 1000 + i for i in range(args.prompts)]
        order = [("rlvr engine", rlvr), ("raw vllm.LLM", raw)]
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            engine.llm.reset_prefix_cache()
            began = time.perf_counter()
            tokens = run(seeds)
            rates[name].append(tokens / (time.perf_counter() - began))

    print(f"model {args.model}: {args.prompts} prompts x {args.n} samples, {args.prompt_tokens}-token prompts, "
          f"{args.max_new_tokens} new tokens, {args.rounds} alternating rounds")
    print(f"{'':14} {'median tok/s':>13} {'min':>8} {'max':>8}")
    for name, values in rates.items():
        print(f"{name:14} {statistics.median(values):13.0f} {min(values):8.0f} {max(values):8.0f}")
    ratio = statistics.median(rates["rlvr engine"]) / statistics.median(rates["raw vllm.LLM"])
    print(f"engine/raw throughput ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()

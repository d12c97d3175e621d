"""Peak GPU memory of a GRPO step per GPU profile, over both of its phases, against the card's
usable memory: computed on CPU through rlvr's own step, or measured on CUDA (`--cuda`).

    python benchmarks/memory.py                       # every profile with its model
    python benchmarks/memory.py --only gpu=l4,model=qwen2.5-math-1.5b,tokens=1024
    python benchmarks/memory.py --baseline            # the configuration of the first H200 run (48.4 GiB measured)
    python benchmarks/memory.py --cuda --mem-cap-gib 21.5 --only gpu=l4,model=qwen2.5-math-1.5b,tokens=1024

The two phases of a step:
- the update: rlvr's own `GRPOModule.training_step` on a rollout of real prompts (GSM8K with the
  Qwen2.5 tokenizer) and responses of the profile's full length, under the profile's precision,
  gradient checkpointing and optimizer. Two updates run and the peak is over both: from the second
  on, the optimizer's state is alive through the forward and backward passes. The vLLM engine
  sleeps meanwhile (level 2: weights and KV cache freed; its leftover, e.g. CUDA graph pools, is not
  counted);
- the rollout: what the trainer still holds once the step is done (weights, optimizer state, the
  reference, anything else left alive: the step frees its gradients) plus vLLM's share, which it
  re-maps on waking: `rollout.gpu_memory_utilization` x the card's usable memory (vLLM sizes it
  once, at start, from the total CUDA reports).
Both are compared with the card's usable memory less a CUDA context of about 1 GiB (outside torch's
allocator), the `budget` column. `fits` is whether the larger peak is within it.

On CPU the policy, the reference and the optimizer are fake tensors (torch's FakeTensorMode: shapes,
dtypes and storage sizes, no data), and a counter follows every tensor storage the step creates and
frees (`PeakMemory` here), as `torch.cuda.max_memory_allocated` would. One micro-batch is enough:
each is freed before the next, and gradients accumulate in place. With `--cuda` the same step runs on
real tensors and the allocator is read instead (vLLM is not there: its share is still computed).

`gpu=h100x8` (FSDP2 over 8 ranks) is a per-rank figure derived from a one-device run of the same
configuration: the weights, gradients, optimizer state and reference divided by 8, plus the
one-device run's transient memory (activations, log-prob chunks, optimizer temporaries), plus the
units FSDP2 gathers at once (the root unit, embeddings and LM head, and two decoder layers, each with
its full gradient before the reduce-scatter). An estimate, not a simulation of FSDP2. `gpu=a100x8`
(DDP) is `gpu=a100` plus DDP's gradient buckets, which stay allocated through the rollout.

The last line is `peak_gib gpu=<profile> model=<model> <value>` for gpu=l4 with Qwen2.5-Math-1.5B at
1,024 new tokens, the larger of its two peaks (its budget: 22.5 - 1 = 21.5 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
import time
import weakref
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from rlvr.cli import CONF_DIR, shared_folder  # noqa: E402
from rlvr.data import StepSampler, build_prompt, load_examples  # noqa: E402
from rlvr.engines.protocol import Generation  # noqa: E402
from rlvr.grpo import GRPOConfig  # noqa: E402
from rlvr.module import GRPOModule  # noqa: E402
from rlvr.rewards import RewardBatch  # noqa: E402
from rlvr.rollout import pack_rollout  # noqa: E402

SHARED = shared_folder()  # $RLVR_SHARED, else ../shared beside the repository
GIB = 2**30
# What CUDA reports as the card's total (less than its name: read on such cards), and the context
USABLE_GIB = {"l4": 22.5, "a100": 39.6, "a100x8": 79.6, "h100": 79.6, "h100x8": 79.6}
CONTEXT_GIB = 1.0
RANKS = {"h100x8": 8, "a100x8": 8}
_KEEP: list = []  # every fake run's module and optimizer, alive until the process exits without teardown
QWEN_VOCAB = dict(vocab_size=151936, bos_token_id=151643, eos_token_id=151643)
ARCHITECTURES = {  # the published configs of the models conf/model/ names (no weights needed)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, **QWEN_VOCAB),
    "qwen2.5-math-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                              tie_word_embeddings=True, **QWEN_VOCAB),
    "qwen2.5-math-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0,
                            tie_word_embeddings=False, vocab_size=152064, bos_token_id=151643, eos_token_id=151643),
}
DEFAULT_RUNS = [  # (profile, model, new tokens): each profile with its own model; the L4 target last
    ("h100x8", "qwen2.5-math-7b", None), ("h100", "qwen2.5-math-1.5b", None), ("a100", "qwen2.5-math-1.5b", None),
    ("a100x8", "qwen2.5-math-1.5b", None), ("l4", "qwen2.5-0.5b", None), ("l4", "qwen2.5-math-1.5b", 1024),
]


def config(profile: str, model: str, new_tokens: int | None, extra: list[str]) -> DictConfig:
    overrides = [f"gpu={profile}", f"model={model}", f"data.source={SHARED / 'data/gsm8k/train.jsonl'}", *extra]
    overrides += [f"rollout.max_new_tokens={new_tokens}"] if new_tokens else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def first_batch_prompts(cfg: DictConfig, tokenizer) -> list[list[int]]:
    """The prompts of the run's first step, as the data module builds them (the longest sets the width)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("max_prompt_tokens")
    examples = load_examples(**data)
    rows = StepSampler(len(examples), cfg.batch_size, cfg.seed).batch(0)
    texts = [build_prompt(examples[i].question, tokenizer, cfg.prompt.system, cfg.prompt.instruction) for i in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def rollout_for(cfg: DictConfig, prompts: list[list[int]], rows: int):
    """`rows` sequences (whole groups) with the longest prompts of the first batch and responses that
    run to the limit without EOS, as a random-init model's do: the worst case."""
    n, tokens = cfg.rollout.n, cfg.rollout.max_new_tokens
    groups = max(1, rows // n)
    longest = sorted(prompts, key=len, reverse=True)[:groups]
    completions = [[100 + (i % 1000) for i in range(tokens)] for _ in range(groups * n)]
    zeros = torch.zeros(groups * n)
    rewards = RewardBatch(zeros, zeros, zeros, torch.arange(groups * n, dtype=torch.float32) % 2, 0)
    generation = Generation(completions, [[0.0] * tokens for _ in completions])
    return pack_rollout(longest, generation, n, QWEN_VOCAB["eos_token_id"], [QWEN_VOCAB["eos_token_id"]], rewards)


class _OneDevice:
    """What GRPOModule.training_step asks of a Lightning trainer, on one device."""

    world_size = 1

    class strategy:  # noqa: N801
        @staticmethod
        def reduce(tensor, reduce_op=None):
            return tensor

        @staticmethod
        def reduce_boolean_decision(decision, all=True):  # noqa: A002
            return decision


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive (registered, or created in its context), as the
    CUDA allocator would (rounded up to 512 bytes), and keeps the peak. Storages are told apart by
    their address and forgotten when freed (a weak reference to the storage).

    Reads of a fake tensor's value (a loss or a gradient norm turned into a float for the logs)
    return 0: fake tensors have no data. Everything else runs as it is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = -(-storage.nbytes() // 512) * 512
        self.current += self.sizes[key]
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return False if args[0].dtype == torch.bool else 0
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) that also works on fake tensors (`.to` cannot swap a fake parameter, which the
    fake mode holds a weak reference to): new parameters, tied ones kept tied."""
    new: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_floating_point():
                if id(param) not in new:
                    new[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                sub._parameters[name] = new[id(param)]
    return module


def build_module(cfg: DictConfig, model: str, device: str, fake: contextlib.AbstractContextManager, prompts: int):
    """The policy (fp32 master weights, as train.py loads them; under `fake`, fake tensors; on CUDA,
    initialised there), then GRPOModule (which copies the reference) on the device, as Lightning
    leaves it, the precision plugin's cast for bf16-true, and the optimizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with fake, torch.device(device):
        policy = Qwen2ForCausalLM(Qwen2Config(**ARCHITECTURES[model], attn_implementation="sdpa"))
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    grpo = OmegaConf.to_container(cfg.grpo, resolve=True)
    c = GRPOConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                   optimizer=optim.pop("name"), **grpo, **optim)
    import rlvr.module

    reference_copy = rlvr.module.reference_copy  # with the fake-safe cast
    rlvr.module.reference_copy = lambda policy, dtype: cast(
        copy.deepcopy(policy), getattr(torch, dtype) if dtype else next(policy.parameters()).dtype)
    try:
        module = GRPOModule(policy, c, batch_size=prompts)  # the prompts of the simulated rollout: one update
    finally:
        rlvr.module.reference_copy = reference_copy
    if device != "cpu":  # (fake parameters cannot be swapped, and are on the CPU already)
        module.to(device)  # what Lightning does: `module.device` is then the device, so the step moves the rollout there
        module.on_fit_start()  # the reference follows
    if str(cfg.trainer.precision) == "bf16-true":
        cast(module.policy, torch.bfloat16)  # what Lightning's bf16-true plugin does to the LightningModule
    optimizers = module.configure_optimizers()
    return module, optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]


def one_update(cfg: DictConfig, module, optimizer, scheduler, rollout) -> None:
    module._trainer = _OneDevice()
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: scheduler
    module.manual_backward = lambda loss: loss.backward()
    module.log = lambda *args, **kwargs: None
    device = next(module.policy.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if str(cfg.trainer.precision) == "bf16-mixed" \
        else contextlib.nullcontext()
    with autocast:
        module.training_step({"rollout": rollout, "step": 0}, 0)


def untracked_step(optimizer: torch.optim.Optimizer, tracker: PeakMemory):
    """The optimizer's step outside the tracker (eager: torch.compile would refuse the fake tensors),
    then its new state counted. A compiled fused step's own temporaries are small and left out."""
    from torch.utils._python_dispatch import _pop_mode_temporarily

    step = optimizer.step

    def counted_step(*args, **kwargs):
        from unittest import mock

        eager = lambda fn=None, **options: fn if fn is not None else (lambda f: f)  # noqa: E731
        with _pop_mode_temporarily(), mock.patch.object(torch, "compile", eager):
            out = step(*args, **kwargs)
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    for leaf in _tensor_leaves(value):
                        tracker.add(leaf)
        return out

    return counted_step


def _tensor_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors under a tensor subclass (torchao's quantized optimizer states)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in _tensor_leaves(getattr(tensor, name))]
    return [tensor]


def _bytes(tensors) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _parts(module, optimizer) -> dict[str, float]:
    """GiB of the weights, gradients (the size of the weights), optimizer state and reference, and of
    what FSDP2 gathers at once: the root unit (all but the decoder layers) and two decoder layers,
    each with its full gradient."""
    policy = module.policy
    weights = _bytes(policy.parameters())
    state = [leaf for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
             for leaf in _tensor_leaves(v)]
    reference = _bytes(module._reference.model.parameters()) if module._reference is not None else 0
    layer = _bytes(policy.model.layers[0].parameters())
    root = weights - len(policy.model.layers) * layer
    return {"weights": weights / GIB, "optimizer": _bytes(state) / GIB, "reference": reference / GIB,
            "gathered": 2 * (root + 2 * layer) / GIB}


def measure(cfg: DictConfig, model: str, prompts: list[list[int]], cuda: bool) -> dict[str, float]:
    """Peak GiB over two updates, GiB held once the step is done (what the rollout shares the card
    with), and the parts of the persistent state."""
    rollout = rollout_for(cfg, prompts, cfg.grpo.micro_batch_size)
    groups = rollout.input_ids.shape[0] // cfg.rollout.n
    if cuda:
        module, optimizer, scheduler = build_module(cfg, model, "cuda", contextlib.nullcontext(), groups)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # after the build: the update's peak only
        for _ in range(2):
            one_update(cfg, module, optimizer, scheduler, rollout)
        gc.collect()
        return {"peak": torch.cuda.max_memory_allocated() / GIB, "held": torch.cuda.memory_allocated() / GIB,
                **_parts(module, optimizer)}

    from torch._subclasses.fake_tensor import FakeTensorMode

    module, optimizer, scheduler = build_module(cfg, model, "cpu", FakeTensorMode(allow_non_fake_inputs=True), groups)
    tracker = PeakMemory()
    if not isinstance(optimizer, torch.optim.AdamW):  # torchao's step is compiled, which refuses a dispatch mode
        optimizer.step = untracked_step(optimizer, tracker)
    held = [*module.policy.parameters(), *module.policy.buffers()]
    if module._reference is not None:
        held += [*module._reference.model.parameters(), *module._reference.model.buffers()]
    for tensor in held:
        tracker.add(tensor)
    with tracker:
        for _ in range(2):
            one_update(cfg, module, optimizer, scheduler, rollout)
        gc.collect()
    _KEEP.append((module, optimizer))  # destroying fake tensors inside torchao's state can crash: never destroyed
    return {"peak": tracker.peak / GIB, "held": tracker.current / GIB, **_parts(module, optimizer)}


def per_rank(profile: str, result: dict[str, float]) -> dict[str, float]:
    """A one-device result as one rank of `profile` sees it (see the module docstring)."""
    ranks = RANKS.get(profile)
    if ranks is None:
        return result
    grads = result["weights"]
    if profile == "a100x8":  # DDP: gradient buckets beside the gradients, allocated for good
        return {**result, "peak": result["peak"] + grads, "held": result["held"] + grads}
    state = result["weights"] + result["optimizer"] + result["reference"]
    transient = result["peak"] - state - grads
    return {**result, "peak": (state + grads) / ranks + transient + result["gathered"],
            "held": result["held"] - state * (1 - 1 / ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="one run: gpu=P,model=M[,tokens=N]")
    parser.add_argument("--baseline", action="store_true",
                        help="the first H200 run: gpu=h100, Qwen2.5-Math-1.5B, 16 prompts x 8 x 256 tokens, micro 16")
    parser.add_argument("--cuda", action="store_true", help="run the step on the GPU and read the allocator")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="with --cuda: cap this process's GPU memory (set_per_process_memory_fraction; the CUDA "
                             "context stays outside the cap), e.g. 21.5 to imitate an L4")
    parser.add_argument("override", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.cuda and args.mem_cap_gib:
        torch.cuda.set_per_process_memory_fraction(args.mem_cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers/qwen2.5")
    tokenizer.chat_template = (SHARED / "tokenizers/qwen2.5/qwen2_5_math.jinja").read_text()

    runs = DEFAULT_RUNS
    extra = list(args.override)
    if args.only:
        spec = dict(part.split("=") for part in args.only.split(","))
        runs = [(spec["gpu"], spec["model"], int(spec["tokens"]) if "tokens" in spec else None)]
    if args.baseline:
        runs = [("h100", "qwen2.5-math-1.5b", 256)]
        extra += ["batch_size=16", "rollout.n=8", "grpo.micro_batch_size=16", "model.gradient_checkpointing=false",
                  "grpo.reference_dtype=null"]

    where = torch.cuda.get_device_name() if args.cuda else "computed on CPU with fake tensors"
    cap = f", capped at {args.mem_cap_gib:g} GiB" if args.cuda and args.mem_cap_gib else ""
    print(f"peak GiB of a GRPO step per phase ({where}{cap}); rollout = held by the trainer + vLLM's share "
          f"(gpu_memory_utilization x usable); budget = usable - {CONTEXT_GIB:g} GiB CUDA context; x8: per rank")
    print(f"{'profile':<8}{'model':<19}{'tokens':>7}{'micro':>6}{'precision':>11}{'optimizer':>10}{'update':>8}"
          f"{'held':>6}{'vLLM':>6}{'rollout':>8}{'usable':>7}{'budget':>7}{'fits':>5}{'s':>5}")
    last = None
    for profile, model, tokens in runs:
        cfg = config(profile, model, tokens, extra)
        began = time.perf_counter()
        result = per_rank(profile, measure(cfg, model, first_batch_prompts(cfg, tokenizer), args.cuda))
        usable = USABLE_GIB[profile]
        vllm = cfg.rollout.gpu_memory_utilization * usable if cfg.rollout.engine == "vllm" else 0.0
        rollout_peak = result["held"] + vllm
        peak = max(result["peak"], rollout_peak)
        budget = usable - CONTEXT_GIB
        print(f"{profile:<8}{model:<19}{cfg.rollout.max_new_tokens:>7}{cfg.grpo.micro_batch_size:>6}"
              f"{str(cfg.trainer.precision):>11}{cfg.optim.name:>10}{result['peak']:>8.1f}{result['held']:>6.1f}"
              f"{vllm:>6.1f}{rollout_peak:>8.1f}{usable:>7.1f}{budget:>7.1f}{'yes' if peak <= budget else 'NO':>5}"
              f"{time.perf_counter() - began:>5.0f}", flush=True)
        last = (profile, model, peak if not args.baseline else result["peak"])
    if last is not None:
        print(f"peak_gib gpu={last[0]} model={last[1]} {last[2]:.1f}", flush=True)


if __name__ == "__main__":
    main()
    # Exit without the interpreter's teardown: destroying fake tensors inside torchao's quantized
    # optimizer state crashed it at exit in 3 of 8 runs on this CPU (torch 2.13, torchao 0.18),
    # after every figure above was printed, and once between two runs (hence _KEEP).
    sys.stderr.flush()
    os._exit(0)

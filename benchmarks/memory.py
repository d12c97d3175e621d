"""Peak GPU memory of the training side of a GRPO step, per GPU profile and model: measured on CUDA,
computed on CPU through the same code.

    python benchmarks/memory.py                       # every profile with its model, and gpu=l4 with 1.5B
    python benchmarks/memory.py --only gpu=l4,model=qwen2.5-math-1.5b,tokens=1024
    python benchmarks/memory.py --baseline            # the configuration of the first H200 run (48.4 GiB measured)

On CPU the policy, the KL reference and the optimizer are built on fake tensors (torch's
FakeTensorMode: shapes, dtypes and storage sizes, no data), and rlvr's own `GRPOModule.training_step`
runs one update on a rollout of real prompts (GSM8K with the Qwen2.5 tokenizer from ../shared) and
responses of the profile's full length, under the profile's precision (bf16 autocast, or bf16
weights), gradient checkpointing and optimizer. A counter follows every tensor the step
creates and frees (a small dispatch mode here, `PeakMemory`) and reports the peak, as
`torch.cuda.max_memory_allocated` would. One micro-batch
is enough: each is freed before the next, and gradients accumulate in place. With CUDA (`--cuda`) the
same step runs on real tensors and the allocator's peak is read instead.

The training side is what stays whichever engine generates. The last columns add the vLLM engine
of the profile (`rollout.engine=vllm`): while it is awake it holds `rollout.gpu_memory_utilization` of
the card beside the weights, reference and optimizer state; while the trainer updates it sleeps
(counted as 0: its leftover, e.g. CUDA graph pools, is not measured). The CUDA context (about 0.5
GiB per process) is outside torch's allocator and not counted either. The last line is
`peak_gib gpu=<profile> model=<model> <value>` for gpu=l4 with Qwen2.5-Math-1.5B at 1,024 new tokens.
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

from rlvr.data import StepSampler, build_prompt, load_examples  # noqa: E402
from rlvr.module import GRPOModule  # noqa: E402
from rlvr.rewards import RewardBatch  # noqa: E402
from rlvr.train import CONF_DIR  # noqa: E402

try:
    from rlvr.grpo import GRPOConfig
except ImportError:  # the code of the first H200 run (--baseline on that commit) kept it in rlvr.module
    from rlvr.module import GRPOConfig

SHARED = ROOT.parent / "shared"
GIB = 2**30
CARD_GIB = {"l4": 24, "a100": 80, "h100": 80, "a100x8": 80, "h100x8": 80}
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
DEFAULT_RUNS = [  # (profile, model, new tokens): each profile with its own model; the 24 GiB target last
    ("h100", "qwen2.5-math-7b", None), ("h100", "qwen2.5-math-1.5b", None), ("a100", "qwen2.5-math-1.5b", None),
    ("l4", "qwen2.5-0.5b", None), ("l4", "qwen2.5-math-1.5b", 1024),
]


def config(profile: str, model: str, new_tokens: int | None, extra: list[str]) -> DictConfig:
    overrides = [f"gpu={profile}", f"model={model}", f"data.source={SHARED / 'data/gsm8k/train.jsonl'}", *extra]
    overrides += [f"rollout.max_new_tokens={new_tokens}"] if new_tokens else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
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
    try:
        from rlvr.engines.protocol import Generation
        from rlvr.rollout import pack_rollout

        generation = Generation(completions, [[0.0] * tokens for _ in completions])
        return pack_rollout(longest, generation, n, QWEN_VOCAB["eos_token_id"], [QWEN_VOCAB["eos_token_id"]], rewards)
    except ImportError:  # rlvr before the vLLM engine (commit df1103f), for the baseline check
        from rlvr.module import pack_rollout

        return pack_rollout(longest, completions, n, QWEN_VOCAB["eos_token_id"], [QWEN_VOCAB["eos_token_id"]], rewards)


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
    """The policy (fp32 master weights, as train.py loads them; under `fake`, fake tensors), then
    GRPOModule (which copies the reference), the precision plugin's cast for bf16-true, the optimizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with fake:
        policy = Qwen2ForCausalLM(Qwen2Config(**ARCHITECTURES[model], attn_implementation="sdpa"))
    if device != "cpu":
        policy.to(device)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    fields = GRPOConfig.__dataclass_fields__
    grpo = {k: v for k, v in OmegaConf.to_container(cfg.grpo, resolve=True).items() if k in fields}
    if "optimizer" in fields:
        grpo["optimizer"] = optim.pop("name")
    else:
        optim.pop("name", None)
        optim.pop("bf16_stochastic_round", None)
    c = GRPOConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                   **grpo, **{k: v for k, v in optim.items() if k in fields})
    import rlvr.module

    # rlvr.module.reference_copy, with the fake-safe cast (older code copied the reference as it was)
    reference_copy = getattr(rlvr.module, "reference_copy", None)
    if reference_copy is not None:
        rlvr.module.reference_copy = lambda policy, dtype: cast(
            copy.deepcopy(policy), getattr(torch, dtype) if dtype else next(policy.parameters()).dtype)
    try:
        module = GRPOModule(policy, c, batch_size=prompts)  # the prompts of the simulated rollout: one update
    finally:
        if reference_copy is not None:
            rlvr.module.reference_copy = reference_copy
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


def measure(cfg: DictConfig, model: str, prompts: list[list[int]], cuda: bool) -> dict[str, float]:
    """Peak and persistent (weights, reference, optimizer state) GiB of one update."""
    rollout = rollout_for(cfg, prompts, cfg.grpo.micro_batch_size)
    groups = rollout.input_ids.shape[0] // cfg.rollout.n
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        module, optimizer, scheduler = build_module(cfg, model, "cuda", contextlib.nullcontext(), groups)
        one_update(cfg, module, optimizer, scheduler, rollout)
        optimizer.zero_grad(set_to_none=True)
        return {"peak": torch.cuda.max_memory_allocated() / GIB, "persistent": torch.cuda.memory_allocated() / GIB}

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
        one_update(cfg, module, optimizer, scheduler, rollout)
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
    return {"peak": tracker.peak / GIB, "persistent": tracker.current / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="one run: gpu=P,model=M[,tokens=N]")
    parser.add_argument("--baseline", action="store_true",
                        help="the first H200 run: gpu=h100, Qwen2.5-Math-1.5B, 16 prompts x 8 x 256 tokens, micro 16")
    parser.add_argument("--cuda", action="store_true", help="run the step on the GPU and read the allocator")
    parser.add_argument("override", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    from transformers import AutoTokenizer

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
                  "++grpo.reference_dtype=null"]  # ++: also on code without that key

    where = torch.cuda.get_device_name() if args.cuda else "computed on CPU with fake tensors"
    print(f"training-side peak of one GRPO update, GiB ({where}); vLLM awake = gpu_memory_utilization x card")
    header = f"{'profile':<8}{'model':<20}{'tokens':>7}{'micro':>6}{'precision':>11}{'optimizer':>10}" \
             f"{'update peak':>12}{'weights+ref+opt':>16}{'vLLM share':>11}{'with vLLM':>10}{'card':>6}{'s':>5}"
    print(header)
    last = None
    for profile, model, tokens in runs:
        cfg = config(profile, model, tokens, extra)
        began = time.perf_counter()
        result = measure(cfg, model, first_batch_prompts(cfg, tokenizer), args.cuda)
        vllm = cfg.rollout.gpu_memory_utilization * CARD_GIB[profile] if cfg.rollout.engine == "vllm" else 0.0
        total = max(result["peak"], result["persistent"] + vllm)
        print(f"{profile:<8}{model:<20}{cfg.rollout.max_new_tokens:>7}{cfg.grpo.micro_batch_size:>6}"
              f"{str(cfg.trainer.precision):>11}{cfg.optim.get('name', 'adamw'):>10}{result['peak']:>12.1f}"
              f"{result['persistent']:>16.1f}{vllm:>11.1f}{total:>10.1f}{CARD_GIB[profile]:>6}"
              f"{time.perf_counter() - began:>5.0f}", flush=True)
        last = (profile, model, total if not args.baseline else result["peak"])
    if last is not None:
        print(f"peak_gib gpu={last[0]} model={last[1]} {last[2]:.1f}", flush=True)


if __name__ == "__main__":
    main()
    # Exit without the interpreter's teardown: destroying fake tensors inside torchao's quantized
    # optimizer state crashed it at exit in 3 of 8 runs on this CPU (torch 2.13, torchao 0.18),
    # after every figure above was printed.
    sys.stderr.flush()
    os._exit(0)

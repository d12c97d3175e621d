"""Where metrics go: metrics.csv always, Weights & Biases on request.

Lightning's CSV writer deletes an existing metrics.csv when it starts, so a resumed run would lose
the history before the checkpoint. This one keeps the file, and on its first write drops only the
rows at or after the first step it is about to write: those a crashed run logged after its last
checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._trimmed = False

    def _check_log_dir_exists(self) -> None:
        """Keep the previous metrics.csv (the parent deletes it)."""

    def save(self) -> None:
        if self.metrics and not self._trimmed:
            self._trimmed = True
            self._drop_rows_from(min(m["step"] for m in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(row["step"]) < step]
        self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """`metrics.csv` in save_dir itself, kept across resumes."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir, name="", version="")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment


# ---------------------------------------------------------------------------------------------
# Weights & Biases, with an offline fallback
# ---------------------------------------------------------------------------------------------

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
REDACTED = "<redacted>"


def redact(config: Any) -> Any:
    """The config with every string that contains a secret from the environment replaced, so an
    `${oc.env:HF_TOKEN}` or a pasted key never reaches a logged config."""
    secrets = [os.environ[name] for name in SECRET_ENV if len(os.environ.get(name, "")) >= 8]
    if isinstance(config, dict):
        return {key: redact(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(value) for value in config]
    if isinstance(config, str) and any(secret in config for secret in secrets):
        return REDACTED
    return config


def has_wandb_credentials() -> bool:
    """An API key in the environment, or a `wandb login` entry in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def previous_wandb_run(save_dir: str | Path) -> str | None:
    """The id of the W&B run an earlier attempt wrote under save_dir/wandb, so a resume continues it."""
    latest = Path(save_dir) / "wandb" / "latest-run"
    if not latest.is_symlink():
        return None
    return os.readlink(latest).rsplit("-", 1)[-1] or None


def wandb_logger(options: dict[str, Any], save_dir: str | Path, resume: bool) -> WandbLogger:
    """A started W&B run: online when a key or login exists (and `mode` allows), else offline.

    If W&B cannot be reached, the run goes on offline (`wandb sync` uploads it later) and says so
    once; training never waits on or fails for the network.
    """
    try:
        import wandb  # the `wandb` extra; only a run that asks for W&B needs it
    except ImportError as error:
        raise ImportError('logger=wandb needs the wandb package: pip install -e ".[wandb]"') from error

    mode = options.get("mode") or "auto"
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
        if mode == "offline":
            log.warning("W&B: no API key or login, so this run logs offline under %s/wandb; "
                        "upload it later with `wandb sync`", save_dir)
    run_id = os.environ.get("WANDB_RUN_ID") or (previous_wandb_run(save_dir) if resume else None)

    def start(mode: str) -> WandbLogger:
        logger = WandbLogger(
            project=os.environ.get("WANDB_PROJECT") or options.get("project") or "rlvr",  # a sweep agent's wins
            entity=options.get("entity"), group=options.get("group"), tags=list(options.get("tags") or []),
            name=options.get("name"), save_dir=str(save_dir), id=run_id, mode=mode,
            settings=wandb.Settings(init_timeout=float(options.get("init_timeout", 60)), console="off"),
        )
        logger.experiment  # noqa: B018  starts the run now, so a network failure surfaces here
        return logger

    try:
        return start(mode)
    except Exception as error:  # wandb.errors.CommError and friends: unreachable, refused, timed out
        if mode != "online":
            raise
        log.warning("W&B unreachable (%s); this run goes on offline under %s/wandb; upload it later with "
                    "`wandb sync`", str(error).splitlines()[0], save_dir)
        wandb.finish()  # drop the half-started run before starting the offline one
        return start("offline")


def make_loggers(options: dict[str, Any], save_dir: str | Path, config: dict[str, Any], resume: bool) -> list[Logger]:
    """metrics.csv always (rlvr.report and resume read it), plus W&B when `logger=wandb`. The
    resolved config, secrets removed, goes to each; a resume keeps the first run's hparams.yaml."""
    csv_logger = ResumableCSVLogger(str(save_dir))
    loggers: list[Logger] = [csv_logger]
    if options.get("kind") == "wandb":
        loggers.append(wandb_logger(options, save_dir, resume))
    for logger in loggers:
        if not (logger is csv_logger and resume and (Path(save_dir) / "hparams.yaml").is_file()):
            logger.log_hyperparams(redact(config))
    return loggers


def save_run_config(save_dir: str | Path, config: dict[str, Any], overrides: list[str]) -> Path:
    """The resolved config (secrets removed) and the command-line overrides, in `.hydra/`. A resume
    writes its own to `.hydra/resume-K/` (K = 1, 2, ...), so the first run's files survive."""
    from omegaconf import OmegaConf

    folder = Path(save_dir) / ".hydra"
    if (folder / "config.yaml").is_file():
        folder = folder / f"resume-{len(list(folder.glob('resume-*'))) + 1}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(redact(config)))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml([str(o) for o in redact(overrides)]))
    return folder


def close_loggers(loggers: list[Logger]) -> None:
    """Finish a W&B run, so the next job of a multirun (same process) starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()

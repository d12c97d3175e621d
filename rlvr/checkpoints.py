"""Checkpoint files that survive a kill, a full disk, and a corrupt copy, on one timeline per run.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a kill at any moment leaves either the old file or the new one, never half of
one. A failed write (disk full) removes the temporary file and says which checkpoint is still
intact. Loading uses `weights_only=True` (rlvr's checkpoints hold only tensors and plain
containers), and a truncated or corrupt file is named, with the earlier checkpoints beside it.

One timeline per run folder: `last.ckpt` always holds the newest state of the run (also when the
run ends between two `save_every` boundaries, or on Ctrl-C), `step-N.ckpt` holds N GRPO steps done,
and resuming from an earlier `step-N.ckpt` makes it the present: the later checkpoints are moved
aside to `checkpoints/abandoned-<time>/` (never deleted), so `ckpt_path=last` cannot pick up the
abandoned branch.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlvr.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read, named with what to do instead."""


def checkpoints_in(folder: Path) -> list[Path]:
    """The .ckpt files in `folder`, newest first."""
    return sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)


def earlier_checkpoints(path: Path) -> list[Path]:
    """The other .ckpt files beside `path`, newest first."""
    return [p for p in checkpoints_in(path.parent) if p.resolve() != path.resolve()]


def _unreadable(path: Path, reason: str) -> CheckpointError:
    others = earlier_checkpoints(path)
    hint = f"; resume from an earlier one, e.g. ckpt_path={others[0]}" if others else ""
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}){hint}")


def load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True, and a clear error for a damaged file. mmap=True reads
    the structure and maps the tensors lazily: a cheap check that the file is whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise _unreadable(path, str(e).splitlines()[0][:200]) from None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means output_dir/checkpoints/last.ckpt; anything else must be an existing file. The
    file is opened here, so a damaged one stops the run before any model is built."""
    if ckpt_path is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}")
    load(path, mmap=True)
    return str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp`, fsync, rename; read with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            intact = [p.name for p in checkpoints_in(path.parent)]
            kept = f"the checkpoints already there are intact: {', '.join(intact)}" if intact else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {kept}") from e
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load(path, map_location=map_location if map_location is not None else "cpu")


def steps_done(path: Path) -> int:
    """GRPO steps a checkpoint holds (the data position), read without loading its tensors."""
    return int(load(path, mmap=True)["PromptDataModule"]["next_step"])


def make_present(ckpt_path: str | Path, folder: Path) -> list[Path]:
    """Resuming from `ckpt_path` (N steps): move the checkpoints in `folder` that hold more than N
    steps (or cannot be read) to `folder/abandoned-<time>/`, and say so in one line. Returns the
    moved files."""
    present = steps_done(Path(ckpt_path))

    def is_later(path: Path) -> bool:
        try:
            return steps_done(path) > present
        except CheckpointError:  # damaged: it cannot be the present either, so keep it aside, whole
            return True

    later = [p for p in checkpoints_in(folder) if p.resolve() != Path(ckpt_path).resolve() and is_later(p)]
    if not later:
        return []
    aside = folder / time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside.mkdir()
    for path in later:
        shutil.move(str(path), aside / path.name)
    log.warning("resuming at step %d: moved the later checkpoints (%s) to %s", present,
                ", ".join(sorted(p.name for p in later)), aside)
    return [aside / p.name for p in later]


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint on one timeline: `step-N.ckpt` every `save_every` GRPO steps (N =
    GRPO steps done, whatever the updates per step), the newest `keep` of them kept, and `last.ckpt`
    overwritten (never versioned as last-v1) and always written when training ends.

    Lightning writes `last` at the end only if it wrote none during the run, so a run whose length is
    not a multiple of save_every would end with a stale last.ckpt.
    """

    def __init__(self, folder: Path, save_every: int, keep: int, updates_per_step: int = 1) -> None:
        super().__init__(dirpath=folder, filename="step-{step}", every_n_train_steps=save_every * updates_per_step,
                         save_last=True, save_top_k=keep, monitor="step", mode="max", auto_insert_metric_name=False,
                         enable_version_counter=False)
        self.updates_per_step = updates_per_step

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.global_step // self.updates_per_step)  # GRPO steps, not updates
        return candidates

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

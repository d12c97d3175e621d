"""Checkpoint files that survive a kill, a full disk, and a corrupt copy.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a kill at any moment leaves either the old file or the new one, never half of
one. A failed write (disk full) removes the temporary file and says which checkpoint is still
intact. Loading uses `weights_only=True` (rlvr's checkpoints hold only tensors and plain
containers), and a truncated or corrupt file is named, with the earlier checkpoints beside it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(RuntimeError):
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

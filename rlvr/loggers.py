"""A CSV logger whose metrics.csv survives a resume.

Lightning's CSV writer deletes an existing metrics.csv when it starts, so a resumed run would lose
the history before the checkpoint. This one keeps the file, and on its first write drops only the
rows at or after the first step it is about to write: those a crashed run logged after its last
checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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

"""metrics.csv beside the exported student (and TensorBoard events where the package is installed)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from raydistill.contracts.students import METRICS_FIELDS, METRICS_NAME
from raydistill.io import storage

__all__ = ["MetricsLog"]


class MetricsLog:
    """One row per ``log_every`` steps, the file rewritten whole (works on object stores too)."""

    FIELDS = METRICS_FIELDS

    def __init__(self, output: str, resume_step: int):
        self.url = storage.join(output, METRICS_NAME)
        self.rows: list[dict] = []
        if resume_step > 0 and storage.exists(self.url):
            rows = list(csv.DictReader(io.StringIO(storage.read_text(self.url))))
            self.rows = [r for r in rows if int(r["step"]) <= resume_step]
        self.tensorboard = _tensorboard_writer(output)

    def add(self, row: dict) -> None:
        self.rows.append({k: row[k] for k in self.FIELDS})
        if self.tensorboard is not None:
            for key in ("loss", "kd", "ce", "lr", "tokens_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
            self.tensorboard.flush()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        storage.atomic_write_text(self.url, out.getvalue())


def _tensorboard_writer(output: str):
    """TensorBoard event files under <output>/tensorboard when the tensorboard package is installed."""
    if "://" in output:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(Path(output) / "tensorboard"))

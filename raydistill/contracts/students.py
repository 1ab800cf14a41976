"""What ``raydistill train`` leaves in its output for others (a sweep, ``raydistill evaluate``, a person).

- ``model/``: a plain Hugging Face model directory with the tokenizer it was trained with,
  loadable by ``AutoModelForCausalLM.from_pretrained``; written whole (atomically on local disk).
- ``summary.json``: parameters, tokens, the config and the data's identity; ``wall_seconds``
  is added once the driver has seen the run finish, so only a finished run has it.
- ``metrics.csv``: one row per ``log_every`` steps.
"""

from __future__ import annotations

import json

from raydistill.io import storage

__all__ = ["METRICS_FIELDS", "METRICS_NAME", "MODEL_DIR", "SUMMARY_NAME", "read_summary", "write_summary"]

MODEL_DIR = "model"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.csv"
METRICS_FIELDS = ("step", "loss", "kd", "ce", "lr", "tokens", "tokens_per_s", "seconds")


def read_summary(output: str) -> dict | None:
    """``<output>/summary.json``, or None if the run never got that far."""
    url = storage.join(output, SUMMARY_NAME)
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def write_summary(output: str, summary: dict) -> None:
    storage.atomic_write_text(storage.join(output, SUMMARY_NAME), json.dumps(summary, indent=1))

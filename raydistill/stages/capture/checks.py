"""What ``raydistill capture`` checks on the driver before it writes anything or starts an actor.

Each of these used to be found late: inside the Ray actors after ``plan.json``, ``tokenizer/`` and
``vocab.parquet`` were written (a teacher without ``config.json`` or weights), as an IndexError in a
GPT-2 teacher or silently on a RoPE one (windows longer than its positions), after a minute of hub
retries (a relative teacher path run from the wrong directory), on the rerun (an output inside the
corpus folder, whose records a rerun reads as documents), or never (actors the cluster can never
place: a hang). Now each is one ``error:`` line and the output stays untouched.
"""

from __future__ import annotations

from raydistill.config.jobs import CaptureConfig
from raydistill.io import storage
from raydistill.io.corpus import check_output_outside
from raydistill.models.loading import check_model
from raydistill.runtime.pool import check_pool_ahead

__all__ = ["check_capture_inputs"]


def check_capture_inputs(cfg: CaptureConfig, address: str | None = None) -> None:
    """Refuse, before any work, a capture that cannot succeed: the output (a file, under a file, not
    writable, inside the corpus folder), the teacher (not a model directory, no weights, unreadable
    config, windows longer than its positions) and actors the cluster can never place."""
    storage.check_output(cfg.output, "output")
    check_output_outside(cfg.output, cfg.corpus)
    check_model(cfg.teacher, what="teacher", gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code,
                max_length=cfg.max_length)
    check_pool_ahead(cfg, address)

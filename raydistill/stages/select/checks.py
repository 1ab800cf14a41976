"""What ``raydistill select`` checks on the driver before it writes anything or starts an actor.

The same early checks as the capture's: the output (a file, under a file, not writable, inside the
corpus folder), both models (teacher and reference: a model directory with weights, a readable
config, windows no longer than their positions) and actors the cluster can never place. Found
later, each cost a written plan and a worker traceback, or a hang.
"""

from __future__ import annotations

from raydistill.config.jobs import SelectConfig
from raydistill.io import storage
from raydistill.io.corpus import check_output_outside
from raydistill.models.loading import check_model
from raydistill.runtime.pool import check_pool_ahead

__all__ = ["check_select_inputs"]


def check_select_inputs(cfg: SelectConfig, address: str | None = None) -> None:
    """Refuse, before any work, a selection that cannot succeed (see the module's docstring)."""
    storage.check_output(cfg.output, "output")
    check_output_outside(cfg.output, cfg.corpus)
    if cfg.refined is not None:
        check_output_outside(cfg.refined, cfg.corpus, "refined")
    for path, gguf, what in ((cfg.teacher, cfg.gguf_file, "teacher"),
                             (cfg.reference, cfg.reference_gguf_file, "reference")):
        check_model(path, what=what, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code,
                    max_length=cfg.max_length)
    check_pool_ahead(cfg, address)

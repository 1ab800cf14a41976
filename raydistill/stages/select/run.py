"""``raydistill select``: MiniPLM difference sampling, a refined corpus from teacher-vs-reference scores.

Offline teacher inference can improve the *data* as well as the targets (MiniPLM, Gu et al. 2024):
score every document by how much better a large teacher predicts it than a small reference model
of the same tokenizer, per token, ``(reference loss − teacher loss) / tokens``, and keep the top
fraction. Documents both models find easy (boilerplate) or both find hard (noise) score low; the
kept ones are where the teacher's extra capacity shows, which is what a student should learn from.
Because only the corpus changes, students of *any* tokenizer can train on the result with plain
CE (``raydistill train`` with ``corpus:``), across model families where logit KD cannot go.

The scoring pass is a capture without targets: the same deterministic units and plan hash, the
same restartable Ray actor pool, one Parquet file of per-document sums per unit, written
atomically and last, so a rerun scores only the units that have no file. The ranking, the refined
corpus and the report are pure functions of those files and ``fraction``: changing ``fraction``
re-ranks without running a model.
"""

from __future__ import annotations

import json
import time

from raydistill.config.jobs import SelectConfig
from raydistill.contracts.selection import REPORT_NAME, SCORES_DIR, SCORES_VERSION, read_unit_scores
from raydistill.contracts.units import trusted_completions
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.io.corpus import describe
from raydistill.models.loading import model_identity
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256
from raydistill.runtime.cluster import init_ray
from raydistill.runtime.guard import guarded_stage
from raydistill.runtime.units import plan_units, read_totals, run_units
from raydistill.stages.select.checks import check_select_inputs
from raydistill.stages.select.ranking import ranked_scores, report_markdown, write_selection
from raydistill.stages.select.refine import write_refined
from raydistill.stages.select.worker import ScoreSettings, ScoreWorker

__all__ = ["run_select", "select_settings", "teacher_tokenizer"]

def teacher_tokenizer(cfg: SelectConfig):
    """The teacher's tokenizer, after checking that the reference tokenizes the same way: per-token losses
    compare only over the same tokens."""
    tokenizers = [load_tokenizer(path, trust_remote_code=cfg.trust_remote_code, gguf_file=gguf)
                  for path, gguf in ((cfg.teacher, cfg.gguf_file), (cfg.reference, cfg.reference_gguf_file))]
    shas = [tokenizer_sha256(t) for t in tokenizers]
    if shas[0] != shas[1]:
        raise ConfigError(
            f"teacher {cfg.teacher} (tokenizer sha256 {shas[0][:12]}…) and reference {cfg.reference} (tokenizer "
            f"sha256 {shas[1][:12]}…) tokenize differently; the score compares their per-token losses, so the "
            "reference must use the teacher's tokenizer (a small model of the same family, or one trained with "
            "the teacher's tokenizer as the demo's is)")
    return tokenizers[0]


def select_settings(cfg: SelectConfig, tok_sha: str) -> dict:
    """Everything that changes a unit's scores, for the plan hash."""
    return {"kind": "select", "teacher": model_identity(cfg.teacher, cfg.gguf_file),
            "reference": model_identity(cfg.reference, cfg.reference_gguf_file), "tokenizer_sha256": tok_sha,
            "max_length": cfg.max_length, "scores_version": SCORES_VERSION}


@guarded_stage("select", worker_paths=("output",), checks=check_select_inputs)  # bad input: one line, nothing written
def run_select(cfg: SelectConfig, *, address: str | None = None, progress: bool = True) -> dict:
    """Score ``cfg.corpus`` with the teacher and the reference (resumable), then rank, write the
    refined corpus and the report. Returns the report."""
    t_start = time.perf_counter()
    tokenizer = teacher_tokenizer(cfg)
    planned = plan_units(cfg, output=cfg.output, address=address, settings=select_settings(cfg, tokenizer_sha256(tokenizer)),
                         what="score", subdirs=(SCORES_DIR,))
    drive = run_units(ScoreWorker, cfg.section(ScoreSettings), planned, cfg, output=cfg.output, subdirs=(SCORES_DIR,),
                      address=address, progress=progress, what="select")
    done, _ = trusted_completions(cfg.output, planned.plan.sha256, planned.plan.unit_hashes())
    table = ranked_scores(read_unit_scores(cfg.output, planned.plan, done), cfg.fraction, cfg.max_repeated_lines)
    init_ray(address)  # the refined corpus is written by tasks reading their own units (also when all were scored)
    report = write_selection(cfg, table, write_refined(cfg, planned.plan, table))
    report.update({"teacher": cfg.teacher, "reference": cfg.reference, "corpus": describe(cfg.corpus),
                   "units": len(planned.plan.units), "units_this_run": len(planned.todo),
                   "score_seconds_this_run": round(drive.seconds, 2),
                   "seconds_this_run": round(time.perf_counter() - t_start, 2),
                   "skipped_documents": read_totals(list(done.values()), "score", describe(cfg.corpus))[1]})
    stored = storage.redact_values(report)  # no URL credentials in stored files
    storage.atomic_write_text(storage.join(cfg.output, REPORT_NAME), json.dumps(stored, indent=1))
    storage.atomic_write_text(storage.join(cfg.output, "report.md"), report_markdown(stored))
    return report


"""Ranking scores and writing what the selection leaves: ``scores.parquet``, the refined corpus, the report.

All of it is a pure function of the per-unit scores files, ``fraction`` and ``max_repeated_lines``,
so a new setting of either re-ranks without running a model.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.config.jobs import SelectConfig
from raydistill.contracts.selection import HISTOGRAM_NAME, SCORES_NAME
from raydistill.errors import ConfigError
from raydistill.io import storage

__all__ = ["corpus_bytes", "histogram_png", "ranked_scores", "report_markdown", "write_selection"]


def ranked_scores(table: pa.Table, fraction: float, max_repeated_lines: float | None = None) -> pa.Table:
    """Adds ``score`` (per-token reference − teacher loss; NaN without a predicted token), ``repetitive``
    (repeated lines hold more than ``max_repeated_lines`` of the characters; never with None), ``rank``
    (0 = highest score; ties by document id; repetitive, then unscored documents last) and ``kept`` (the
    top ``round(fraction · documents)``, at least one, none of them repetitive)."""
    tokens = table.column("tokens").to_numpy()
    diff = table.column("reference_loss").to_numpy() - table.column("teacher_loss").to_numpy()
    score = np.where(tokens > 0, diff / np.maximum(tokens, 1), np.nan)
    repeated = table.column("repeated_line_chars").to_numpy()
    repetitive = repeated > max_repeated_lines if max_repeated_lines is not None else np.zeros(len(score), bool)
    if len(score) and repetitive.all():
        raise ConfigError(f"max_repeated_lines={max_repeated_lines} leaves no document to keep (the least repetitive "
                          f"holds {repeated.min():.2f} of its characters in repeated lines); raise it, or unset it")
    ids = np.asarray(table.column("doc_id").to_pylist())
    order = np.lexsort((ids, -np.nan_to_num(score, nan=-np.inf), repetitive, np.isnan(score)))  # last key first
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    keep = max(1, min(len(order), round(fraction * len(order))))
    return (table.append_column("score", pa.array(score)).append_column("repetitive", pa.array(repetitive))
            .append_column("rank", pa.array(rank)).append_column("kept", pa.array((rank < keep) & ~repetitive)))


def write_selection(cfg: SelectConfig, table: pa.Table, refined_url: str) -> dict:
    """scores.parquet and the histogram; the report's figures (the refined corpus is in ``refined_url``)."""
    out = io.BytesIO()
    pq.write_table(table.drop_columns(["unit"]) if "unit" in table.column_names else table, out, compression="zstd")
    storage.atomic_write_bytes(storage.join(cfg.output, SCORES_NAME), out.getvalue())
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    score = table.column("score").to_numpy()
    tokens = table.column("tokens").to_numpy()
    ranked = table.sort_by("rank")
    scored = ranked.filter(pc.invert(pc.is_nan(ranked.column("score"))))

    def listing(t: pa.Table) -> list[dict]:
        return [{"id": i, "score": round(s, 5)} for i, s in zip(t.column("doc_id").to_pylist(),
                                                                t.column("score").to_pylist(), strict=True)]

    finite = score[~np.isnan(score)]
    kept_scores = score[kept & ~np.isnan(score)]
    report = {
        "documents": len(table), "scored_documents": len(finite),
        "kept_documents": int(kept.sum()), "fraction": cfg.fraction,
        "max_repeated_lines": cfg.max_repeated_lines,
        "repetitive_documents": int(table.column("repetitive").to_numpy(zero_copy_only=False).sum()),
        "kept_fraction": round(float(kept.mean()), 6),
        "tokens": int(tokens.sum()), "kept_tokens": int(tokens[kept].sum()),
        "kept_token_fraction": round(float(tokens[kept].sum() / max(tokens.sum(), 1)), 6),
        "score_mean": round(float(finite.mean()), 5) if len(finite) else None,
        "score_median": round(float(np.median(finite)), 5) if len(finite) else None,
        "kept_score_min": round(float(kept_scores.min()), 5) if len(kept_scores) else None,
        "highest": listing(scored.slice(0, 10)), "lowest": listing(scored.slice(max(0, len(scored) - 10)))[::-1],
        "refined": refined_url, "scores": storage.join(cfg.output, SCORES_NAME),
        "histogram": storage.join(cfg.output, HISTOGRAM_NAME),
    }
    storage.atomic_write_bytes(report["histogram"], histogram_png(finite, report["kept_score_min"], cfg.fraction))
    return report


def corpus_bytes(rows: list[dict], fmt: str) -> bytes:
    """The refined corpus as jsonl or Parquet, with ``id``, ``text`` and ``score`` per document."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    out = io.BytesIO()
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("score", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out, compression="zstd")
    return out.getvalue()


def histogram_png(scores: np.ndarray, cut: float | None, fraction: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=min(60, max(10, len(scores) // 10)), color="#4C72B0")
    if cut is not None:
        ax.axvline(cut, color="#C44E52", linestyle="--", label=f"kept: top {fraction:.0%} (score ≥ {cut:.3f})")
        ax.legend()
    ax.set_xlabel("score: reference − teacher loss per token (nats)")
    ax.set_ylabel("documents")
    ax.set_title("MiniPLM difference scores")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def report_markdown(report: dict) -> str:
    r = report
    lines = [
        "# raydistill select report", "",
        f"- teacher `{r['teacher']}`, reference `{r['reference']}`, corpus `{r['corpus']}`",
        f"- kept {r['kept_documents']:,} of {r['documents']:,} documents ({r['kept_fraction']:.1%}; asked "
        f"{r['fraction']:.1%}), {r['kept_tokens']:,} of {r['tokens']:,} tokens ({r['kept_token_fraction']:.1%})",
        *([f"- dropped before ranking: {r['repetitive_documents']:,} documents whose repeated lines hold more "
           f"than {r['max_repeated_lines']:g} of their characters"] if r.get("max_repeated_lines") is not None else []),
        f"- score (reference − teacher loss per token): mean {r['score_mean']}, median {r['score_median']}, "
        f"lowest kept {r['kept_score_min']}",
        f"- refined corpus: `{r['refined']}`; all scores: `{r['scores']}`; histogram: `{r['histogram']}`", "",
        "| highest scored | score | lowest scored | score |", "|---|---|---|---|",
    ]
    for hi, lo in zip(r["highest"], r["lowest"], strict=False):
        lines.append(f"| {hi['id']} | {hi['score']} | {lo['id']} | {lo['score']} |")
    return "\n".join(lines) + "\n"

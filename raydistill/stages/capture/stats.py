"""The capture's run statistics: flat keys in the manifest's ``stats``, and a few lines for a person."""

from __future__ import annotations

from raydistill.contracts.shards.manifest import ShardInfo
from raydistill.runtime.pool import DriveResult

__all__ = ["SKIP_REASONS", "format_summary", "run_stats"]

SKIP_REASONS = ("empty", "undecodable", "duplicate", "oversize")


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


def run_stats(*, shards: list[ShardInfo], documents: int, units_this_run: int, drive: DriveResult,
              skipped: dict[str, int], seconds: float, stale_temporaries: int = 0,
              earlier_capture_seconds: float = 0.0) -> dict[str, int | float]:
    """The manifest's ``stats``: flat (``actor.N.*``, ``skipped_documents.*``) so any JSON tool reads them."""
    tokens_this_run = sum(a.tokens for a in drive.actors)
    by_reason = {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}
    stats: dict[str, int | float] = {
        "tokens": sum(s.tokens for s in shards),
        "windows": sum(s.rows for s in shards),
        "documents": documents,
        "units": len(shards),
        "units_this_run": units_this_run,
        "units_already_done": len(shards) - units_this_run,
        "tokens_this_run": tokens_this_run,
        "seconds_this_run": round(seconds, 2),
        "capture_seconds_this_run": round(drive.seconds, 2),
        "capture_seconds_total": round(earlier_capture_seconds + drive.seconds, 2),  # over runs that finished
        "tokens_per_s_this_run": _rate(tokens_this_run, drive.seconds),
        "actor_seconds_this_run": round(sum(a.busy_seconds for a in drive.actors), 2),
        "num_actors": len(drive.actors),
        "skipped_documents": sum(by_reason.values()),
        **{f"skipped_documents.{reason}": n for reason, n in by_reason.items()},
        "stale_temporaries_removed": stale_temporaries,
    }
    for i, actor in enumerate(drive.actors):
        stats.update({f"actor.{i}.units": actor.units, f"actor.{i}.tokens": actor.tokens,
                      f"actor.{i}.busy_seconds": round(actor.busy_seconds, 2),
                      f"actor.{i}.tokens_per_s": _rate(actor.tokens, actor.busy_seconds)})
    return stats


def format_summary(stats: dict[str, int | float]) -> str:
    """A few lines for a person, printed after the progress bar; the numbers are the manifest's."""
    s = stats
    lines = [
        f"capture: {s['units']} units ({s['units_this_run']} this run, {s['units_already_done']} already done), "
        f"{s['documents']:,} documents, {s['windows']:,} windows, {s['tokens']:,} tokens",
        f"this run: {s['tokens_this_run']:,} tokens in {s['capture_seconds_this_run']:,.1f} s of capture "
        f"({s['seconds_this_run']:,.1f} s in all), {s['tokens_per_s_this_run']:,.0f} tokens/s",
    ]
    for i in range(int(s["num_actors"])):
        a = {key: s[f"actor.{i}.{key}"] for key in ("units", "tokens", "busy_seconds", "tokens_per_s")}
        lines.append(f"  actor {i}: {a['units']} units, {a['tokens']:,} tokens, {a['busy_seconds']:,.1f} s busy, "
                     f"{a['tokens_per_s']:,.0f} tokens/s")
    reasons = ", ".join(f"{s[f'skipped_documents.{r}']} {r}" for r in SKIP_REASONS)
    lines.append(f"skipped documents: {s['skipped_documents']} ({reasons})")
    return "\n".join(lines)

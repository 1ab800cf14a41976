"""What a capture reports: per-actor throughput and skipped records in the manifest's stats and the summary."""

from __future__ import annotations

from raydistill.contracts.shards.manifest import ShardInfo
from raydistill.runtime.pool import ActorTally, DriveResult
from raydistill.stages.capture.stats import format_summary, run_stats


def test_stats_and_summary_report_per_actor_throughput_and_skips():
    shards = [ShardInfo(unit=u, path=f"shards/unit-{u:06d}.parquet", rows=3, tokens=100, bytes=10, sha256="0" * 64)
              for u in range(5)]
    fast, slow = ActorTally(), ActorTally()
    fast.add(tokens=200, seconds=1.0, returned_at=1.0)
    fast.add(tokens=100, seconds=1.0, returned_at=2.0)
    slow.add(tokens=100, seconds=4.0, returned_at=4.0)
    stats = run_stats(shards=shards, documents=9, units_this_run=3, drive=DriveResult([fast, slow], 4.0),
                      skipped={"empty": 1, "undecodable": 2, "duplicate": 3, "oversize": 4}, seconds=6.0)
    assert stats["tokens"] == 500 and stats["windows"] == 15 and stats["documents"] == 9
    assert (stats["units"], stats["units_this_run"], stats["units_already_done"]) == (5, 3, 2)
    assert stats["tokens_this_run"] == 400 and stats["tokens_per_s_this_run"] == 100.0
    assert stats["actor.0.tokens_per_s"] == 150.0 and stats["actor.1.tokens_per_s"] == 25.0
    assert stats["actor_seconds_this_run"] == 6.0
    assert stats["skipped_documents"] == 10 and stats["skipped_documents.oversize"] == 4
    assert all(isinstance(v, int | float) for v in stats.values())  # what Manifest.stats accepts
    text = format_summary(stats)
    assert "5 units (3 this run, 2 already done)" in text and "100 tokens/s" in text
    assert "actor 0: 2 units, 300 tokens, 2.0 s busy, 150 tokens/s" in text
    assert "skipped documents: 10 (1 empty, 2 undecodable, 3 duplicate, 4 oversize)" in text
    nothing = run_stats(shards=shards, documents=9, units_this_run=0, drive=DriveResult([], 0.0),
                        skipped={}, seconds=0.5)
    assert nothing["tokens_per_s_this_run"] == 0.0 and "0 this run" in format_summary(nothing)

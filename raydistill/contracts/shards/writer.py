"""Write one shard: encode, serialize in memory, checksum, then one atomic write.

Serializing to bytes first means the checksum recorded in the manifest is of exactly the
bytes on storage, and the shard appears whole or not at all on every fsspec backend.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.contracts.shards.format import Codec, TargetWindow, encode_windows
from raydistill.contracts.shards.manifest import ShardInfo
from raydistill.io import storage

ZSTD_LEVEL = 3
_SMALL_COLUMNS = ["doc_id", "window", "num_tokens"]  # statistics/dictionaries only help these


def serialize_table(table: pa.Table, level: int = ZSTD_LEVEL) -> bytes:
    """Parquet bytes of a shard table (zstd level 3; no statistics on the large binary cells)."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=level,
        use_dictionary=["doc_id"],
        write_statistics=_SMALL_COLUMNS,
    )
    return sink.getvalue().to_pybytes()


def write_shard(url: str, windows: list[TargetWindow], *, codec: Codec, unit: int, relpath: str) -> ShardInfo:
    """Encode ``windows`` into the shard at ``url`` and describe it for the manifest.

    ``relpath`` is the shard's path relative to the shard-set root (see ``shard_relpath``).
    The caller writes the completion record after this returns.
    """
    table = encode_windows(windows, codec)
    data = serialize_table(table)
    storage.atomic_write_bytes(url, data)
    return ShardInfo(
        unit=unit,
        path=relpath,
        rows=table.num_rows,
        tokens=sum(w.num_tokens for w in windows),
        bytes=len(data),
        sha256=storage.sha256_bytes(data),
    )

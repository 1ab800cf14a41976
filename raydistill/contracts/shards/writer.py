"""Write one shard: encode, serialize in memory, checksum, then one atomic write.

Serializing to bytes first means the checksum recorded in the manifest is of exactly the
bytes on storage, and the shard appears whole or not at all on every fsspec backend.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.contracts.shards.codec import Codec
from raydistill.contracts.shards.format import UNIT_METADATA_KEY, TargetWindow, encode_windows
from raydistill.contracts.shards.manifest import ShardInfo, shard_relpath
from raydistill.contracts.units import UnitKey, write_unit_output

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


def write_shard(root: str, windows: list[TargetWindow], *, codec: Codec, unit: UnitKey) -> ShardInfo:
    """Encode ``windows`` into unit ``unit``'s shard under ``root`` (atomically) and describe it for the
    manifest; the caller marks the unit done (``contracts.units.mark_done``) after this returns.

    The shard carries its unit's identity in its metadata, so a shard copied in from another capture
    (or moved to another unit's name) is told apart by ``verify`` and by training, not only by its record.
    """
    table = encode_windows(windows, codec)
    table = table.replace_schema_metadata({**table.schema.metadata, UNIT_METADATA_KEY: unit.model_dump_json()})
    return write_unit_output(root, shard_relpath(unit.unit), serialize_table(table), unit=unit, rows=len(windows),
                             tokens=sum(w.num_tokens for w in windows))

"""Shard sets: the on-storage contract between capture and training (spec: docs/format.md)."""

from raydistill.contracts.shards.format import (
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    Codec,
    DecodedShard,
    TargetWindow,
    decode_table,
    encode_windows,
    token_dtype_for,
)
from raydistill.contracts.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    PlanInfo,
    ShardInfo,
    SparsifyInfo,
    TeacherInfo,
    TokenizerInfo,
    VocabTableInfo,
    completion_url,
    read_completions,
    read_manifest,
    shard_relpath,
    utc_timestamp,
    write_completion,
    write_manifest,
)
from raydistill.contracts.shards.reader import ShardSet
from raydistill.contracts.shards.verify import Problem, inspect_shard_set, verify_shard_set
from raydistill.contracts.shards.vocab import (
    VOCAB_TABLE_NAME,
    VocabTable,
    read_vocab_table,
    write_vocab_table,
)
from raydistill.contracts.shards.writer import write_shard

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SUPPORTED_VERSIONS",
    "VOCAB_TABLE_NAME",
    "Codec",
    "DecodedShard",
    "Manifest",
    "PlanInfo",
    "Problem",
    "ShardInfo",
    "ShardSet",
    "SparsifyInfo",
    "TargetWindow",
    "TeacherInfo",
    "TokenizerInfo",
    "VocabTable",
    "VocabTableInfo",
    "completion_url",
    "decode_table",
    "encode_windows",
    "inspect_shard_set",
    "read_completions",
    "read_manifest",
    "read_vocab_table",
    "shard_relpath",
    "token_dtype_for",
    "utc_timestamp",
    "verify_shard_set",
    "write_completion",
    "write_manifest",
    "write_shard",
    "write_vocab_table",
]

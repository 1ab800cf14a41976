"""Shard sets: the on-storage contract between capture and training (spec: docs/format.md)."""

from raydistill.contracts.shards.codec import Codec, token_dtype_for
from raydistill.contracts.shards.format import (
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    DecodedShard,
    TargetWindow,
    decode_table,
    encode_windows,
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
    read_manifest,
    shard_relpath,
    shard_set_identity,
    sparsify_info_for,
    utc_timestamp,
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
        "decode_table",
    "encode_windows",
    "inspect_shard_set",
        "read_manifest",
    "read_vocab_table",
    "shard_relpath",
    "shard_set_identity",
    "sparsify_info_for",
    "token_dtype_for",
    "utc_timestamp",
    "verify_shard_set",
        "write_manifest",
    "write_shard",
    "write_vocab_table",
]

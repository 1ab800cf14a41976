"""Read a finished shard set: check its contract, then decode shards with checksums verified."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.contracts.shards.codec import Codec
from raydistill.contracts.shards.format import DecodedShard, decode_table
from raydistill.contracts.shards.manifest import Manifest, ShardInfo, read_manifest
from raydistill.contracts.shards.vocab import VocabTable, read_vocab_table
from raydistill.errors import ContractError, ShardError
from raydistill.io import storage


def _short(sha: str) -> str:
    return f"{sha[:12]}…" if len(sha) > 12 else sha


def parse_shard_bytes(data: bytes, codec: Codec, where: str) -> DecodedShard:
    """Decode the Parquet bytes of one shard with the set's codec (see ``ShardSet.codec``)."""
    try:
        # ParquetFile, not read_table: read_table's dataset layer keeps a background thread that can free
        # this Python-owned buffer during interpreter shutdown and abort the process (seen 8 times in 94 runs)
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{where} is not a readable Parquet file ({err})") from None
    try:
        return decode_table(table, codec)
    except ShardError as err:
        raise ShardError(f"{where}: {err}") from None


def shard_mismatch(shard: DecodedShard, info: ShardInfo) -> str | None:
    """How a decoded shard differs from its manifest entry (rows, tokens, the unit and plan it was written
    for), or None. Entries of sets before format 1.2 carry no unit identity; only rows and tokens are checked."""
    if len(shard) != info.rows or shard.num_tokens != info.tokens:
        return f"holds {len(shard)} rows / {shard.num_tokens} tokens but the manifest says {info.rows} / {info.tokens}"
    if info.plan_sha256 is None:
        return None
    want = {"unit": info.unit, "unit_sha256": info.unit_sha256, "plan_sha256": info.plan_sha256}
    if shard.unit != want:
        got = shard.unit or {}
        return (f"was written for unit {got.get('unit')} of plan {str(got.get('plan_sha256'))[:12]}, not unit "
                f"{info.unit} of plan {info.plan_sha256[:12]} (copied in from another capture?)")
    return None


class ShardSet:
    """A shard set on any fsspec storage, opened through its manifest."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.manifest: Manifest = read_manifest(self.root)
        self._codec: Codec | None = None

    @property
    def vocab_table(self) -> VocabTable:
        return self.codec.table

    @property
    def codec(self) -> Codec:
        """The set's codec; loads (and checks) ``vocab.parquet`` on first use."""
        if self._codec is None:
            m = self.manifest
            table = read_vocab_table(self.root, m.vocab_table.path, m.vocab_table.sha256, m.vocab_size)
            self._codec = m.codec(table)
        return self._codec

    def __len__(self) -> int:
        return len(self.manifest.shards)

    @property
    def target_width(self) -> int:
        """Ids per token a reader pads the targets to: the manifest's k (hybrid: plus its draws)."""
        return self.manifest.sparsify.width

    def info(self, index: int) -> ShardInfo:
        return self.manifest.shards[index]

    def shard_url(self, index: int) -> str:
        return storage.join(self.root, self.manifest.shards[index].path)

    def tokenizer_url(self) -> str:
        return storage.join(self.root, self.manifest.tokenizer.path)

    def check_contract(
        self,
        *,
        tokenizer_sha256: str | None = None,
        vocab_size: int | None = None,
        format_version: str | None = None,
        student: str | None = None,
    ) -> None:
        """Refuse to serve a student whose tokenizer, vocabulary or expected format differs.

        ``student`` says where the student's tokenizer comes from (e.g. "student.model '/path'"); with it, a
        tokenizer mismatch names both tokenizers and points at the CE-on-text route that any tokenizer can take.
        """
        m, problems = self.manifest, []
        if format_version is not None and format_version != m.format_version:
            raise ContractError(
                f"shard set {self.root} has format_version {m.format_version} but {format_version} was asked "
                "for; use the raydistill version that wrote it, or re-run capture"
            )
        other_tokenizer = tokenizer_sha256 is not None and tokenizer_sha256 != m.tokenizer.sha256
        if other_tokenizer:
            problems.append(
                f"was made with tokenizer sha256 {_short(m.tokenizer.sha256)} (teacher '{m.teacher.name_or_path}') "
                f"but the student's tokenizer is {_short(tokenizer_sha256)}" + (f" ({student})" if student else "")
            )
        if vocab_size is not None and vocab_size != m.vocab_size:
            problems.append(
                f"has vocab_size {m.vocab_size} (padded {m.padded_vocab_size}) but the student's vocab_size is "
                f"{vocab_size}"
            )
        if not problems:
            return
        fix = (f"train the student with the teacher's tokenizer (copied at {self.tokenizer_url()}) or re-run "
               "capture with the student's tokenizer")
        if other_tokenizer and student:
            fix = (f"logit KD needs the teacher's tokenizer: {fix}; a student with a different tokenizer can train "
                   "with CE on a (refined) text corpus instead (set `corpus:` and `loss: ce` in place of `shards:`, "
                   "MiniPLM mode)")
        raise ContractError(f"shard set {self.root} " + " and ".join(problems) + "; " + fix)

    def read_bytes(self, index: int) -> bytes:
        """The shard's bytes, checked against the manifest's size and sha256."""
        info, url = self.manifest.shards[index], self.shard_url(index)
        if not storage.exists(url):
            raise ShardError(f"shard {url} is missing; re-run capture to rewrite unit {info.unit}")
        data = storage.read_bytes(url)
        if len(data) != info.bytes or storage.sha256_bytes(data) != info.sha256:
            raise ShardError(
                f"shard {url} does not match the manifest ({len(data)} bytes, sha256 "
                f"{_short(storage.sha256_bytes(data))}; expected {info.bytes} bytes, sha256 {_short(info.sha256)}); "
                f"delete it and its completion record and re-run capture"
            )
        return data

    def read_shard(self, index: int) -> DecodedShard:
        """Decode shard ``index`` (position in ``manifest.shards``) after verifying its checksum, and check
        that it holds what its manifest entry says: its rows, its tokens and its unit of this plan."""
        info, url = self.manifest.shards[index], self.shard_url(index)
        shard = parse_shard_bytes(self.read_bytes(index), self.codec, url)
        problem = shard_mismatch(shard, info)
        if problem:
            raise ShardError(f"shard {url} {problem}; delete it and its completion record and re-run capture")
        return shard

    def row_lengths(self, index: int) -> np.ndarray:
        """Tokens per row of shard ``index``, reading only the ``num_tokens`` column (for packing plans)."""
        url = self.shard_url(index)
        fs, path = storage.filesystem(url)
        try:
            with fs.open(path, "rb") as f:
                column = pq.ParquetFile(f).read(columns=["num_tokens"]).column("num_tokens")
        except FileNotFoundError:
            raise ShardError(f"shard {url} is missing") from None
        except (pa.ArrowException, OSError) as err:
            raise ShardError(f"shard {url} is not a readable Parquet file ({err})") from None
        lengths = column.to_numpy().astype(np.int64)
        if len(lengths) != self.manifest.shards[index].rows:
            raise ShardError(
                f"shard {url} has {len(lengths)} rows but the manifest says {self.manifest.shards[index].rows}"
            )
        return lengths

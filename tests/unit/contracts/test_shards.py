"""Shard format v1: encode/decode in three modes against slow references, the spec's byte layout,
manifest, completion records, reader contract, verification and inspection -- on local disk,
memory:// and s3:// (a moto server on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support import moto_s3, unit_key, write_synthetic_set

from raydistill.contracts.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Codec,
    ShardSet,
    TargetWindow,
    VocabTable,
    decode_table,
    encode_windows,
    inspect_shard_set,
    read_manifest,
    shard_relpath,
    token_dtype_for,
    verify_shard_set,
    write_manifest,
    write_shard,
)
from raydistill.contracts.shards import codec as C
from raydistill.contracts.shards.writer import serialize_table
from raydistill.contracts.units import completion_url, mark_done, read_completions
from raydistill.errors import ContractError, ShardError
from raydistill.io import storage
from raydistill.stages.capture.sparsify import budget_cut, hybrid_cut, sparsify_topk

TOK_SHA = "a" * 64
STUDENT_SHA = "b" * 64
MODES = ("topk", "adaptive", "sampled", "budget", "hybrid")


def table_for(vocab: int, seed: int = 0) -> VocabTable:
    """Zipf-like counts, as a corpus would give: the renumbering is far from the identity."""
    rng = np.random.default_rng(seed)
    return VocabTable(rng.zipf(1.5, vocab).astype(np.int64) * rng.integers(0, 3, vocab))


def codec_for(mode: str, vocab: int, k: int, draws: int = 16) -> Codec:
    return Codec(mode=mode, k=draws if mode == "sampled" else k, vocab_size=vocab, table=table_for(vocab),
                 draws=draws if mode in ("sampled", "hybrid") else 0)


def make_window(rng, n: int, codec: Codec, doc: str = "doc", window: int = 0) -> TargetWindow:
    """Valid targets of ``codec``'s mode from random distributions, ids in a shuffled order."""
    vocab, k = codec.vocab_size, codec.k
    logits = rng.standard_normal((n, vocab)) * 3
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if codec.mode == "sampled":
        draws = np.stack([rng.multinomial(codec.draws, row) for row in p]) if n else np.zeros((0, vocab), int)
        ids = np.full((n, k), -1, np.int64)
        probs = np.zeros((n, k), np.float32)
        for t in range(n):  # test-side construction only
            hit = np.flatnonzero(draws[t])
            ids[t, : hit.size] = rng.permutation(hit)
            probs[t, : hit.size] = draws[t, ids[t, : hit.size]] / codec.draws
        mass = np.array([p[t, ids[t][ids[t] >= 0]].sum() for t in range(n)])
        return TargetWindow(doc, window, rng.integers(0, vocab, n), ids, probs, (1 - mass).astype(np.float32))
    order = np.argsort(-p, axis=1)[:, :k]
    probs = np.take_along_axis(p, order, axis=1).astype(np.float32)
    ids = order.copy()
    if codec.mode in ("adaptive", "budget", "hybrid"):  # a most-probable prefix of 1 ... k ids
        keep = rng.integers(1, k + 1, n)
        pad = np.arange(k)[None, :] >= keep[:, None]
        ids[pad], probs[pad] = -1, 0.0
    tail = np.clip(1 - probs.sum(axis=1, dtype=np.float64), 0, 1).astype(np.float32)
    if codec.mode == "hybrid":
        return _with_tail_draws(rng, doc, window, p, ids, probs, tail, codec)
    shuffle = np.argsort(rng.random((n, k)) + (ids < 0), axis=1)  # real entries stay first
    return TargetWindow(doc, window, rng.integers(0, vocab, n), np.take_along_axis(ids, shuffle, 1),
                        np.take_along_axis(probs, shuffle, 1), tail)


def _with_tail_draws(rng, doc, window, p, ids, probs, tail, codec: Codec) -> TargetWindow:
    """Hybrid: the exact prefix, then ``draws`` draws from the rest of each row, in a shuffled order."""
    n, k = ids.shape
    d = codec.draws
    out_ids = np.full((n, k + d), -1, np.int64)
    out_probs = np.zeros((n, k + d), np.float32)
    counts = np.zeros((n, k + d), np.int64)
    for t in range(n):  # test-side construction only
        exact = ids[t][ids[t] >= 0]
        rest = p[t].copy()
        rest[exact] = 0.0
        hits = rng.multinomial(d, rest / rest.sum())
        drawn = np.flatnonzero(hits)
        entries = np.concatenate([exact, drawn])
        order = rng.permutation(entries.size)
        out_ids[t, : entries.size] = entries[order]
        out_probs[t, : entries.size] = np.concatenate([p[t, exact], np.zeros(drawn.size)])[order]
        counts[t, : entries.size] = np.concatenate([np.zeros(exact.size, np.int64), hits[drawn]])[order]
    return TargetWindow(doc, window, rng.integers(0, codec.vocab_size, n), out_ids, out_probs, tail, counts)


def random_windows(rng, codec: Codec, count: int = 6) -> list[TargetWindow]:
    lengths = [0, 1, *rng.integers(2, 40, count - 2)]
    return [make_window(rng, int(n), codec, doc=f"doc{i // 2}", window=i % 2) for i, n in enumerate(lengths)]


def roundtrip(windows, codec):
    data = serialize_table(encode_windows(windows, codec))
    return decode_table(pq.ParquetFile(pa.BufferReader(data)).read(), codec)


def reference_target(w: TargetWindow, t: int, codec: Codec) -> tuple[dict[int, float], float]:
    """Slow, obvious reading of one token: {id: the probability the loss sees}, ghost mass."""
    counts = np.zeros_like(w.ids) if w.counts is None else w.counts
    stored = {int(i): float(p) for i, p, c in zip(w.ids[t], w.probs[t], counts[t], strict=True) if i >= 0 and c == 0}
    drawn = {int(i): int(c) for i, c in zip(w.ids[t], counts[t], strict=True) if i >= 0 and c > 0}
    if codec.mode == "sampled":
        return stored, 0.0
    tail_code = C.quantize_tail(np.array([w.tail[t]]))[0]
    tail = 0.0 if tail_code == C.TAIL_ZERO_CODE else 2.0 ** (-int(tail_code) / 1024)
    codes = {i: max(1, round(codec.value_scale * np.sqrt(p))) if p > 0 else 0 for i, p in stored.items()}
    quantized = {i: (q / codec.value_scale) ** 2 for i, q in codes.items()}
    total = sum(quantized.values())
    if total == 0:
        return {i: 0.0 for i in quantized}, 1.0
    exact = {i: q * (1 - tail) / total for i, q in quantized.items()}
    if drawn:  # hybrid: the tail is spoken for by the draws, tail · count / draws each
        return {**exact, **{i: tail * c / codec.draws for i, c in drawn.items()}}, 0.0
    return exact, tail


def assert_matches_reference(decoded, windows, codec):
    assert len(decoded) == len(windows)
    for r, w in enumerate(windows):
        row = decoded.row(r)
        assert (row.doc_id, row.window) == (w.doc_id, w.window)
        np.testing.assert_array_equal(row.tokens, w.tokens)
        a = int(decoded.offsets[r])
        for t in range(w.num_tokens):
            want, ghost = reference_target(w, t, codec)
            got_ids = decoded.ids[a + t]
            got = {int(i): float(p) for i, p in zip(got_ids, decoded.probs[a + t], strict=True) if i >= 0}
            assert set(got) == set(want)
            assert decoded.num_ids[a + t] == len(want) - (decoded.counts[a + t] > 0).sum() if codec.mode == "hybrid" \
                else decoded.num_ids[a + t] == len(want)
            assert (got_ids[len(want):] == -1).all() and (decoded.probs[a + t, len(want):] == 0).all()
            for i in want:
                assert got[i] == pytest.approx(want[i], rel=1e-5, abs=1e-7)
            assert decoded.tail[a + t] == pytest.approx(ghost, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- codecs


def test_token_dtype_boundaries():
    assert token_dtype_for(300) == "uint16"
    assert token_dtype_for(65536) == "uint16"
    assert token_dtype_for(65537) == "uint32"
    with pytest.raises(ValueError):
        token_dtype_for(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("vocab", "k"), [(300, 1), (300, 8), (300, 64), (1000, 300), (70000, 4), (70000, 32)])
def test_roundtrip_matches_slow_reference(mode, vocab, k):
    codec = codec_for(mode, vocab, k)
    windows = random_windows(np.random.default_rng(vocab + k), codec)
    decoded = roundtrip(windows, codec)
    assert_matches_reference(decoded, windows, codec)
    assert decoded.tokens.dtype == np.int64 and decoded.ids.dtype == np.int64
    assert decoded.probs.dtype == np.float32 and decoded.tail.dtype == np.float32
    assert decoded.ids.shape == (decoded.num_tokens, codec.width)
    np.testing.assert_array_equal(decoded.offsets, np.cumsum([0] + [w.num_tokens for w in windows]))
    if mode != "sampled":  # the loss's target is a distribution: stored + ghost = 1
        np.testing.assert_allclose(decoded.probs.sum(1) + decoded.tail, 1, atol=1e-5)


def test_sampled_counts_are_exact_and_keep_the_true_tail():
    codec = codec_for("sampled", 300, 0, draws=64)
    windows = random_windows(np.random.default_rng(4), codec)
    decoded = roundtrip(windows, codec)
    assert_matches_reference(decoded, windows, codec)  # counts / draws, exactly
    np.testing.assert_allclose(decoded.probs.sum(1), 1, atol=1e-6)
    want_tail = np.concatenate([w.tail for w in windows])
    np.testing.assert_allclose(decoded.stored_tail, want_tail, rtol=2 ** (1 / 2048) - 1, atol=1e-12)


def read_cell(cell: bytes, n: int, width: int) -> list[int]:
    """docs/format.md, by the letter: n little-endian elements of ``width`` bytes stored as byte
    planes (all first bytes, then all second bytes, ...)."""
    return [sum(cell[b * n + j] << (8 * b) for b in range(width)) for j in range(n)]


@pytest.mark.parametrize(("vocab", "width"), [(300, 2), (70000, 4)])
def test_cells_follow_the_spec_byte_for_byte(vocab, width):
    """An independent decoder written from the spec reads what the encoder wrote."""
    codec = codec_for("adaptive", vocab, 6)
    w = make_window(np.random.default_rng(3), 5, codec)
    table = encode_windows([w], codec)
    assert not any(pa.types.is_list(f.type) or pa.types.is_large_list(f.type) for f in table.schema)
    cell = {name: table.column(name)[0].as_py() for name in ("tokens", "num_ids", "ids", "values", "tail")}
    tok_width = 2 if vocab <= 65536 else 4
    assert read_cell(cell["tokens"], 5, tok_width) == w.tokens.tolist()
    counts = list(cell["num_ids"])  # k <= 255: one byte each
    assert counts == (w.ids >= 0).sum(1).tolist()
    deltas = read_cell(cell["ids"], sum(counts), width)
    values = list(cell["values"])
    rank_of_id = codec.table.rank_of_id
    at = 0
    for t, c in enumerate(counts):
        ranks = np.cumsum(deltas[at : at + c]).tolist()
        want = sorted((int(rank_of_id[i]), float(p)) for i, p in zip(w.ids[t], w.probs[t], strict=True) if i >= 0)
        assert ranks == [r for r, _ in want]  # renumbered, ascending, delta-coded
        assert values[at : at + c] == [max(1, round(128 * np.sqrt(p))) for _, p in want]
        at += c
    tails = read_cell(cell["tail"], 5, 2)
    assert tails == [65535 if x == 0 else round(-1024 * np.log2(x)) for x in w.tail.astype(np.float64)]


def test_empty_shard_and_empty_windows():
    codec = codec_for("topk", 300, 8)
    decoded = roundtrip([], codec)
    assert len(decoded) == 0 and decoded.num_tokens == 0 and decoded.ids.shape == (0, 8)
    np.testing.assert_array_equal(decoded.offsets, [0])
    full = make_window(np.random.default_rng(2), 5, codec)
    empty = TargetWindow("e", 0, np.zeros(0), np.zeros((0, 8)), np.zeros((0, 8)), np.zeros(0))
    assert_matches_reference(roundtrip([empty, full, empty], codec), [empty, full, empty], codec)


@pytest.mark.parametrize("mode", MODES)
def test_decode_chunked_and_sliced_tables(mode):
    codec = codec_for(mode, 300, 8)
    windows = random_windows(np.random.default_rng(5), codec, count=8)
    table = encode_windows(windows, codec)
    two_chunks = pa.concat_tables([table.slice(0, 3), table.slice(3)])
    assert two_chunks.column("ids").num_chunks == 2
    assert_matches_reference(decode_table(two_chunks, codec), windows, codec)
    assert_matches_reference(decode_table(table.slice(4), codec), windows[4:], codec)
    assert_matches_reference(decode_table(table.slice(1, 3).combine_chunks(), codec), windows[1:4], codec)


def replace_cell(table: pa.Table, name: str, cell: bytes) -> pa.Table:
    """``table`` (one row) with column ``name``'s cell replaced by ``cell``."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array([cell], pa.binary()))


def test_decode_refusals_name_the_column():
    codec = codec_for("topk", 300, 8)
    table = encode_windows([make_window(np.random.default_rng(0), 4, codec)], codec)

    def with_cell(name: str, cell: bytes) -> pa.Table:
        return replace_cell(table, name, cell)

    with pytest.raises(ShardError, match="'values' row 0 holds 10 bytes"):
        decode_table(with_cell("values", b"\x00" * 10), codec)
    with pytest.raises(ShardError, match="'num_ids'"):
        decode_table(table, codec_for("topk", 300, 4))  # wrong k
    with pytest.raises(ShardError, match="value_scale"):
        decode_table(with_cell("values", b"\xff" * 32), codec)
    with pytest.raises(ShardError, match="outside"):
        decode_table(with_cell("ids", b"\xff" * 64), codec)
    with pytest.raises(ShardError, match="lacks column"):
        decode_table(table.drop_columns(["tail"]), codec)
    sampled = codec_for("sampled", 300, 0, draws=16)
    t2 = encode_windows([make_window(np.random.default_rng(1), 3, sampled)], sampled)
    i = t2.schema.get_field_index("values")
    bad = t2.set_column(i, t2.schema.field(i), pa.array([b"\x01" * len(t2.column("values")[0].as_py())]))
    with pytest.raises(ShardError, match="do not sum to draws=16"):
        decode_table(bad, sampled)


def test_decode_rejects_damaged_hybrid_cells():
    codec = codec_for("hybrid", 300, 8)
    table = encode_windows([make_window(np.random.default_rng(2), 3, codec)], codec)

    def with_cell(name: str, cell: bytes) -> pa.Table:
        return replace_cell(table, name, cell)

    values = table.column("values")[0].as_py()
    with pytest.raises(ShardError, match="do not sum to draws=16"):
        decode_table(with_cell("values", values[:-1] + bytes([values[-1] + 1])), codec)
    with pytest.raises(ShardError, match="more than draws=16"):
        decode_table(with_cell("num_drawn", b"\x11" * 3), codec)
    with pytest.raises(ShardError, match="lacks column"):
        decode_table(table.drop_columns(["num_drawn"]), codec)
    with pytest.raises(ValueError, match="hybrid mode needs draws"):
        Codec(mode="hybrid", k=8, vocab_size=300, table=codec.table, draws=256)


def _drawn_copies_exact(w: TargetWindow) -> np.ndarray:
    """Hybrid ids where each token's first drawn id is replaced by one of its exact ids."""
    ids = w.ids.copy()
    for t in range(len(ids)):
        exact, drawn = np.flatnonzero((ids[t] >= 0) & (w.counts[t] == 0)), np.flatnonzero(w.counts[t] > 0)
        ids[t, drawn[0]] = ids[t, exact[0]]
    return ids


def _with(w: TargetWindow, **changes) -> TargetWindow:
    return TargetWindow(**{**w.__dict__, **changes})


@pytest.mark.parametrize(
    ("mode", "change", "match"),
    [
        ("topk", lambda w: {"ids": w.ids + 300}, "stored id out of"),
        ("topk", lambda w: {"tokens": -w.tokens - 1}, "token id out of"),
        ("topk", lambda w: {"ids": np.concatenate([w.ids[:, :1], w.ids[:, :-1]], 1)}, "same id twice"),
        ("topk", lambda w: {"probs": w.probs * np.nan}, "not finite"),
        ("topk", lambda w: {"tail": w.tail + 2}, "tail"),
        ("topk", lambda w: {"tail": np.zeros_like(w.tail)}, "differ from 1"),
        ("topk", lambda w: {"ids": np.where(np.arange(8) == 7, -1, w.ids)}, "exactly k=8"),
        ("adaptive", lambda w: {"ids": np.where(np.arange(8) == 0, -1, w.ids)}, "first, then -1 padding"),
        ("sampled", lambda w: {"probs": w.probs * 0.5}, "counts / 16"),
        ("topk", lambda w: {"probs": w.probs[:, :4]}, "do not match"),
        ("hybrid", lambda w: {"counts": w.counts * 2}, "sum to draws=16"),
        ("hybrid", lambda w: {"counts": w.counts + (w.ids < 0)}, "padding entry"),
        ("hybrid", lambda w: {"ids": _drawn_copies_exact(w)}, "same id twice"),
        ("hybrid", lambda w: {"counts": None}, "more than k=8"),
        ("hybrid", lambda w: {"counts": w.counts[:, :3]}, "do not match"),
    ],
)
def test_encode_rejects_bad_windows(mode, change, match):
    codec = codec_for(mode, 300, 8)
    rng = np.random.default_rng(0)
    windows = [make_window(rng, 6, codec, doc=f"d{i}") for i in range(3)]
    windows[2] = _with(windows[2], **change(windows[2]))
    with pytest.raises(ValueError, match=match) as err:
        encode_windows(windows, codec)
    assert "window 2" in str(err.value) and "d2" in str(err.value)


def test_vocab_table_renumbers_by_count_and_spreads_the_tail():
    table = VocabTable(np.array([5, 0, 9, 5, 1]))
    assert table.id_of_rank.tolist() == [2, 0, 3, 4, 1]  # count desc, ties by id
    assert table.rank_of_id[table.id_of_rank].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(table.prior(1.0), (np.array([5, 0, 9, 5, 1]) + 0.5) / 22.5)
    np.testing.assert_allclose(table.prior(0.0), 0.2)
    assert VocabTable.from_bytes(table.to_bytes(), "x").counts.tolist() == [5, 0, 9, 5, 1]
    with pytest.raises(ShardError, match="not a readable Parquet"):
        VocabTable.from_bytes(b"nope", "x")


# ---------------------------------------------------------------- shard sets


def build_set(root: str, units: int = 3, mode: str = "topk") -> list[list[TargetWindow]]:
    """A complete shard set as capture would leave it; unit 1 is an empty shard."""
    codec = codec_for(mode, 300, 8)
    rng = np.random.default_rng(11)
    per_unit = [[] if unit == 1 else budget_unit(rng, codec, codec.k / 2) if mode == "budget"
                else hybrid_unit(rng, codec, codec.k / 2) if mode == "hybrid"
                else random_windows(rng, codec, count=4) for unit in range(units)]
    per_unit = [[dataclasses.replace(w, doc_id=f"u{u}-{w.doc_id}") for w in windows]  # a document is in one unit
                for u, windows in enumerate(per_unit)]
    write_synthetic_set(root, per_unit, codec, tokenizer_sha256=TOK_SHA)
    return per_unit


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3():
        storage.makedirs("s3://raydistill-shards")
        yield


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.slow)])  # s3: a moto server
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "set")
        return
    if request.param == "s3":
        request.getfixturevalue("s3_server")  # its AWS variables stay set while the module runs
        yield f"s3://raydistill-shards/{uuid.uuid4().hex}"
        return
    url = f"memory://raydistill-test-{uuid.uuid4().hex}"
    yield url
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_layout_names():
    assert shard_relpath(7) == "shards/unit-000007.parquet"
    assert completion_url("s3://b/set/", 7) == "s3://b/set/done/unit-000007.json"


def test_write_shard_info(root):
    codec = codec_for("topk", 300, 8)
    windows = random_windows(np.random.default_rng(0), codec)
    url = storage.join(root, shard_relpath(4))
    info = write_shard(root, windows, codec=codec, unit=unit_key(4))
    data = storage.read_bytes(url)
    assert info.unit == 4 and info.path == "shards/unit-000004.parquet"
    assert info.rows == len(windows) and info.tokens == sum(w.num_tokens for w in windows)
    assert info.bytes == len(data) and info.sha256 == storage.sha256_bytes(data)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    assert meta.row_group(0).column(5).compression == "ZSTD"
    assert meta.metadata[b"raydistill.format_version"] == FORMAT_VERSION.encode()
    assert json.loads(meta.metadata[b"raydistill.unit"]) == unit_key(4).model_dump()  # the unit it was written for
    assert (info.plan_sha256, info.unit_sha256) == (unit_key(4).plan_sha256, unit_key(4).unit_sha256)
    assert storage.list_files(storage.join(root, "shards")) == ["unit-000004.parquet"]  # no temp files left


@pytest.mark.parametrize("mode", MODES)
def test_shard_set_reads_what_was_written(root, mode):
    per_unit = build_set(root, mode=mode)
    ss = ShardSet(root + "/")
    assert len(ss) == 3 and ss.root == root
    assert ss.tokenizer_url() == f"{root}/tokenizer"
    m = read_manifest(root)
    assert m.total_rows == sum(len(w) for w in per_unit)
    assert m.total_tokens == sum(w.num_tokens for ws in per_unit for w in ws)
    assert json.loads(storage.read_text(storage.join(root, MANIFEST_NAME)))["format_version"] == FORMAT_VERSION
    for i, windows in enumerate(per_unit):
        assert_matches_reference(ss.read_shard(i), windows, ss.codec)
        np.testing.assert_array_equal(ss.row_lengths(i), [w.num_tokens for w in windows])
    assert verify_shard_set(root) == []


def test_completion_records(root):
    assert read_completions(root) == {}
    build_set(root, units=3)
    done = read_completions(root)
    assert sorted(done) == [0, 1, 2]
    assert done == {s.unit: s for s in read_manifest(root).shards}
    storage.atomic_write_text(completion_url(root, 5), "{not json")
    with pytest.raises(ShardError, match=r"unit-000005\.json"):
        read_completions(root)


def test_read_manifest_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ShardError, match=r"manifest\.json not found"):
        read_manifest(root)
    url = storage.join(root, MANIFEST_NAME)
    storage.atomic_write_text(url, "{")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(root)
    build_set(str(tmp_path / "set"), units=1)
    good = json.loads(storage.read_text(storage.join(str(tmp_path / "set"), MANIFEST_NAME)))
    for version in ("9.9", "0.1"):
        storage.atomic_write_text(url, json.dumps({**good, "format_version": version}))
        with pytest.raises(ContractError, match=rf"'{version}'.*reads only 1\.0, 1\.1"):
            read_manifest(root)
    for change, field in [({"colour": "blue"}, "colour"), ({"token_dtype": "uint32"}, "token_dtype"),
                          ({"sparsify": {**good["sparsify"], "value_codec": "float16"}}, "value_codec"),
                          ({"sparsify": {**good["sparsify"], "mode": "adaptive"}}, "threshold"),
                          ({"sparsify": {**good["sparsify"], "mode": "budget"}}, "mean_ids")]:
        storage.atomic_write_text(url, json.dumps({**good, **change}))
        with pytest.raises(ShardError, match=field):
            read_manifest(root)


def test_check_contract_names_both_values(root):
    build_set(root)
    ss = ShardSet(root)
    ss.check_contract(tokenizer_sha256=TOK_SHA, vocab_size=300, format_version=FORMAT_VERSION)
    ss.check_contract()
    with pytest.raises(ContractError) as err:
        ss.check_contract(tokenizer_sha256=STUDENT_SHA)
    assert TOK_SHA[:12] in str(err.value) and STUDENT_SHA[:12] in str(err.value) and root in str(err.value)
    with pytest.raises(ContractError, match=r"vocab_size 300 .*student's vocab_size is 512"):
        ss.check_contract(vocab_size=512)
    with pytest.raises(ContractError, match=r"format_version 1\.4 but 2\.0 was asked for"):
        ss.check_contract(format_version="2.0")


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_older_sets_are_still_read(tmp_path, version):
    """1.1 only added the budget mode (laid out as adaptive rows), 1.2 the unit identity and the tokenizer's
    checksums: a 1.0 or 1.1 set (entries without them) reads and verifies unchanged."""
    root = str(tmp_path / "set")
    per_unit = build_set(root, units=1)
    url = storage.join(root, MANIFEST_NAME)
    data = json.loads(storage.read_text(url))
    data["format_version"] = version
    del data["tokenizer"]["files"]
    for entry in data["shards"]:
        del entry["plan_sha256"], entry["unit_sha256"]
    storage.atomic_write_text(url, json.dumps(data))
    ss = ShardSet(root)
    assert ss.manifest.format_version == version
    assert ss.read_shard(0).num_tokens == sum(w.num_tokens for w in per_unit[0])


def test_read_shard_refuses_corrupt_bytes(root):
    build_set(root)
    url = storage.join(root, shard_relpath(2))
    data = bytearray(storage.read_bytes(url))
    data[len(data) // 2] ^= 0xFF
    storage.atomic_write_bytes(url, bytes(data))
    with pytest.raises(ShardError, match=r"unit-000002\.parquet"):
        ShardSet(root).read_shard(2)


# ---------------------------------------------------------------- verify / inspect


def problem_paths(root: str) -> dict[str, str]:
    return {p.path: p.message for p in verify_shard_set(root)}


def test_verify_flipped_byte(root):
    build_set(root)
    url = storage.join(root, shard_relpath(0))
    data = bytearray(storage.read_bytes(url))
    data[100] ^= 0x01
    storage.atomic_write_bytes(url, bytes(data))
    assert problem_paths(root) == {url: "sha256 does not match the manifest (corrupted)"}


def test_verify_truncated(root):
    build_set(root)
    url = storage.join(root, shard_relpath(2))
    storage.atomic_write_bytes(url, storage.read_bytes(url)[:-50])
    problems = problem_paths(root)
    assert list(problems) == [url] and "truncated" in problems[url]


def test_verify_missing_and_extra(root):
    build_set(root)
    missing = storage.join(root, shard_relpath(1))
    fs, path = storage.filesystem(missing)
    fs.rm(path)
    extra = storage.join(root, shard_relpath(9))
    storage.atomic_write_bytes(extra, storage.read_bytes(storage.join(root, shard_relpath(0))))
    leftover = storage.join(root, "shards", "unit-000000.parquet.tmp-0123456789ab")
    storage.atomic_write_bytes(leftover, b"partial")
    problems = problem_paths(root)
    assert set(problems) == {missing, extra, leftover}
    assert "missing" in problems[missing] and "not listed" in problems[extra]
    assert "interrupted write" in problems[leftover]
    with pytest.raises(ShardError, match=r"unit-000001\.parquet is missing"):
        ShardSet(root).read_shard(1)
    with pytest.raises(ShardError, match=r"unit-000001\.parquet is missing"):
        ShardSet(root).row_lengths(1)


def test_verify_vocab_table_missing_or_corrupt(tmp_path):
    root = str(tmp_path / "set")
    build_set(root)
    url = storage.join(root, "vocab.parquet")
    good = storage.read_bytes(url)
    storage.atomic_write_bytes(url, good[:-1] + bytes([good[-1] ^ 1]))
    assert "sha256" in problem_paths(root)[url]
    storage.filesystem(url)[0].rm(storage.filesystem(url)[1])
    assert "missing" in problem_paths(root)[url]
    with pytest.raises(ShardError, match=r"vocab\.parquet is missing"):
        ShardSet(root).read_shard(0)


def test_verify_completion_disagrees(root):
    build_set(root)
    info = read_manifest(root).shards[0]
    mark_done(root, info.model_copy(update={"rows": info.rows + 1}))
    assert problem_paths(root) == {completion_url(root, 0): "disagrees with the manifest entry"}


def test_verify_bad_values_behind_a_valid_checksum(root):
    """A writer bug (a probability code above value_scale) is caught though the bytes match the manifest."""
    build_set(root)
    url = storage.join(root, shard_relpath(0))
    table = pq.ParquetFile(pa.BufferReader(storage.read_bytes(url))).read()
    i = table.schema.get_field_index("values")
    col = pa.array([b"\xff" * len(c.as_py()) for c in table.column("values")], pa.binary())
    data = serialize_table(table.set_column(i, table.schema.field(i), col))
    storage.atomic_write_bytes(url, data)
    m = read_manifest(root)
    m.shards[0] = m.shards[0].model_copy(update={"bytes": len(data), "sha256": storage.sha256_bytes(data)})
    write_manifest(root, m)
    mark_done(root, m.shards[0])
    problems = problem_paths(root)
    assert list(problems) == [url] and "value_scale" in problems[url]


def budget_unit(rng, codec: Codec, mean_ids: float, drop_one: bool = False) -> list[TargetWindow]:
    """Windows of one unit cut as budget mode cuts it (``drop_one``: one id short of the budget)."""
    unit = uuid.uuid4().hex[:8]  # documents of two units never share an id
    top = [make_window(rng, n, dataclasses.replace(codec, mode="topk"), doc=f"{unit}-d{i}")
           for i, n in enumerate((9, 0, 23))]
    order = [np.argsort(-w.probs, axis=1, kind="stable") for w in top]  # budget_cut takes descending rows
    ids, probs = (np.concatenate([np.take_along_axis(getattr(w, a), o, 1) for w, o in zip(top, order, strict=True)])
                  for a in ("ids", "probs"))
    ids, probs, tail = budget_cut(ids, probs, np.concatenate([w.tail for w in top]), mean_ids)
    if drop_one:
        t = int(np.argmax((ids >= 0).sum(1)))
        last = (ids[t] >= 0).sum() - 1
        tail[t] += probs[t, last]
        ids[t, last], probs[t, last] = -1, 0.0
    at, out = 0, []
    for w in top:
        n = w.num_tokens
        out.append(dataclasses.replace(w, ids=ids[at:at + n], probs=probs[at:at + n], tail=tail[at:at + n]))
        at += n
    return out


def hybrid_unit(rng, codec: Codec, mean_ids: float) -> list[TargetWindow]:
    """Windows of one unit as hybrid capture makes them: top-k and deep draws, then the unit's cut."""
    unit = uuid.uuid4().hex[:8]
    lengths = (9, 0, 23)
    logits = torch.from_numpy(rng.standard_normal((sum(lengths), codec.vocab_size)).astype(np.float32) * 3)
    deep = torch.from_numpy(rng.random((len(logits), codec.draws), dtype=np.float32))
    t = sparsify_topk(logits, k=codec.k, mode="hybrid", uniforms=deep)
    cut = hybrid_cut(t.ids.numpy(), t.probs.numpy(), t.tail.numpy(), t.drawn.numpy(),
                     rng.random((len(logits), codec.draws), dtype=np.float32), mean_ids)
    at, out = 0, []
    for i, n in enumerate(lengths):
        part = slice(at, at + n)
        out.append(TargetWindow(f"{unit}-d{i}", 0, rng.integers(0, codec.vocab_size, n), cut.ids[part],
                                cut.probs[part], cut.tail[part], cut.counts[part]))
        at += n
    return out


def test_verify_checks_the_budget_of_each_unit(tmp_path):
    codec = codec_for("budget", 300, 8)  # the synthetic manifest records mean_ids = k / 2
    rng = np.random.default_rng(4)
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_synthetic_set(good, [budget_unit(rng, codec, 4.0), budget_unit(rng, codec, 4.0)], codec,
                        tokenizer_sha256=TOK_SHA)
    assert verify_shard_set(good) == []
    assert ShardSet(good).read_shard(0).num_ids.sum() == 4 * 32
    write_synthetic_set(bad, [budget_unit(rng, codec, 4.0), budget_unit(rng, codec, 4.0, drop_one=True)], codec,
                        tokenizer_sha256=TOK_SHA)
    problems = problem_paths(bad)
    assert list(problems) == [storage.join(bad, shard_relpath(1))]
    assert "budget mode stores 127 ids for 32 tokens" in problems[storage.join(bad, shard_relpath(1))]


def test_verify_unreadable_manifest(root):
    build_set(root)
    storage.atomic_write_text(storage.join(root, MANIFEST_NAME), json.dumps({"format_version": "0.2"}))
    problems = verify_shard_set(root)
    assert len(problems) == 1 and problems[0].path.endswith("manifest.json") and "0.2" in problems[0].message


@pytest.mark.parametrize("mode", MODES)
def test_inspect(tmp_path, mode):
    root = str(tmp_path / "set")
    per_unit = build_set(root, mode=mode)
    info = inspect_shard_set(root)
    windows = [w for ws in per_unit for w in ws]
    tokens = sum(w.num_tokens for w in windows)
    assert info["units"] == 3 and info["tokens"] == tokens and info["mode"] == mode and info["vocab_size"] == 300
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / tokens)
    split = info["bytes_per_token_split"]
    assert set(split) == {"ids", "values", "tokens", "other"} and min(split.values()) > 0
    assert sum(split.values()) == pytest.approx(sum(info["bytes_per_token_by_column"].values()))
    assert sum(split.values()) < info["bytes_per_token"]  # Parquet's footer and page headers are extra
    true_mass = np.concatenate([1 - w.tail for w in windows])
    assert info["mean_stored_mass"] == pytest.approx(true_mass.mean(), rel=1e-3)
    ids = np.concatenate([(w.ids >= 0).sum(1) for w in windows])
    assert info["mean_ids_per_token"] == pytest.approx(ids.mean())
    hist = info["entropy_histogram"]
    assert sum(hist["tokens"]) == tokens and len(hist["bins_nats"]) == len(hist["tokens"])
    json.dumps(info)  # the CLI prints it as JSON


@pytest.mark.parametrize(("field", "escape"), [
    (("tokenizer", "path"), "../../somedir"),
    (("shards", 0, "path"), "../../../../etc/hostname"),
    (("vocab_table", "path"), "/etc/hostname"),
    (("shards", 0, "path"), "s3://another-bucket/unit-000000.parquet"),
])
def test_no_path_in_a_manifest_leaves_the_shard_set(tmp_path, field, escape):
    """A hand-edited manifest cannot make verify, inspect or train read (or copy) a file outside the set."""
    root = str(tmp_path / "set")
    build_set(root)
    manifest = json.loads(storage.read_text(storage.join(root, MANIFEST_NAME)))
    node = manifest
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = escape
    storage.atomic_write_text(storage.join(root, MANIFEST_NAME), json.dumps(manifest))
    where = ".".join(map(str, field))
    with pytest.raises(ShardError, match=rf"{re.escape(where)}: .*inside the set"):
        ShardSet(root)
    problems = verify_shard_set(root)
    assert len(problems) == 1 and problems[0].path.endswith(MANIFEST_NAME) and where in problems[0].message
    with pytest.raises(ShardError, match="inside the set"):
        inspect_shard_set(root)


def test_no_path_in_a_completion_record_leaves_the_output(tmp_path):
    root = str(tmp_path / "set")
    build_set(root)
    url = completion_url(root, 0)
    record = json.loads(storage.read_text(url))
    storage.atomic_write_text(url, json.dumps({**record, "path": "../outside.parquet"}))
    with pytest.raises(ShardError, match=r"completion record .*unit-000000.json is invalid \(path: .*inside the set"):
        read_completions(root)

"""Shard format v0.1: codecs, manifest, completion records, reader contract, verification."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import storage
from raydistill.errors import ContractError, ShardError
from raydistill.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    PlanInfo,
    ShardInfo,
    ShardSet,
    SparsifyInfo,
    TargetWindow,
    TeacherInfo,
    TokenizerInfo,
    completion_url,
    decode_table,
    encode_windows,
    inspect_shard_set,
    read_completions,
    read_manifest,
    shard_relpath,
    token_dtype_for,
    utc_timestamp,
    verify_shard_set,
    write_completion,
    write_manifest,
    write_shard,
)
from raydistill.shards.format import _to_float16
from raydistill.shards.writer import serialize_table

TOK_SHA = "a" * 64
STUDENT_SHA = "b" * 64


def make_window(rng: np.random.Generator, n: int, vocab: int, k: int, doc: str = "doc", window: int = 0):
    """Random but valid targets: distinct ids per position, descending probs, exact tail."""
    logits = rng.standard_normal((n, vocab)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    ids = np.argsort(-probs, axis=1)[:, :k]
    top = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
    tail = np.clip(1 - top.sum(axis=1, dtype=np.float64), 0, 1).astype(np.float32)
    return TargetWindow(doc, window, rng.integers(0, vocab, n), ids, top, tail)


def random_windows(rng, vocab: int, k: int, count: int = 6) -> list[TargetWindow]:
    lengths = [0, 1, *rng.integers(2, 40, count - 2)]
    return [
        make_window(rng, int(n), vocab, k, doc=f"doc{i // 2}", window=i % 2) for i, n in enumerate(lengths)
    ]


def roundtrip(windows, vocab, k):
    data = serialize_table(encode_windows(windows, vocab_size=vocab, k=k))
    return decode_table(pq.read_table(pa.BufferReader(data)), vocab_size=vocab, k=k)


def assert_same(decoded, windows, k):
    assert len(decoded) == len(windows)
    for i, w in enumerate(windows):
        r = decoded.row(i)
        assert (r.doc_id, r.window) == (w.doc_id, w.window)
        np.testing.assert_array_equal(r.tokens, w.tokens)
        np.testing.assert_array_equal(r.topk_ids, np.asarray(w.topk_ids).reshape(-1, k))
        # float16 keeps 11 significant bits: relative error <= 2^-11, plus subnormal spacing near 0
        np.testing.assert_allclose(r.topk_probs, w.topk_probs, rtol=2**-11, atol=2**-25)
        np.testing.assert_array_equal(r.tail_mass, w.tail_mass)  # float32: exact


# ---------------------------------------------------------------- codecs


def test_token_dtype_boundaries():
    assert token_dtype_for(300) == "uint16"
    assert token_dtype_for(65536) == "uint16"
    assert token_dtype_for(65537) == "uint32"
    with pytest.raises(ValueError):
        token_dtype_for(0)


@pytest.mark.parametrize(("vocab", "k"), [(300, 1), (300, 8), (300, 64), (70000, 4), (70000, 32)])
@pytest.mark.parametrize("seed", [0, 1])
def test_roundtrip(vocab, k, seed):
    rng = np.random.default_rng(seed)
    windows = random_windows(rng, vocab, k)
    decoded = roundtrip(windows, vocab, k)
    assert_same(decoded, windows, k)
    assert decoded.tokens.dtype == np.int64 and decoded.topk_ids.dtype == np.int64
    assert decoded.topk_probs.dtype == np.float32 and decoded.tail_mass.dtype == np.float32
    assert decoded.topk_ids.shape == (decoded.num_tokens, k)
    np.testing.assert_array_equal(decoded.offsets, np.cumsum([0] + [w.num_tokens for w in windows]))


@pytest.mark.parametrize(("vocab", "width"), [(300, 2), (70000, 4)])
def test_cells_are_fixed_width_little_endian(vocab, width):
    rng = np.random.default_rng(3)
    w = make_window(rng, 5, vocab, 4)
    table = encode_windows([w], vocab_size=vocab, k=4)
    assert not any(pa.types.is_list(f.type) or pa.types.is_large_list(f.type) for f in table.schema)
    tokens = table.column("tokens")[0].as_py()
    assert len(tokens) == 5 * width
    np.testing.assert_array_equal(np.frombuffer(tokens, dtype=f"<u{width}"), w.tokens)
    assert len(table.column("topk_ids")[0].as_py()) == 5 * 4 * width
    np.testing.assert_array_equal(
        np.frombuffer(table.column("topk_probs")[0].as_py(), "<f2"), w.topk_probs.astype(np.float16).ravel()
    )
    np.testing.assert_array_equal(np.frombuffer(table.column("tail_mass")[0].as_py(), "<f4"), w.tail_mass)


def test_float16_cast_matches_ieee_rounding():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random(10000), 10.0 ** rng.uniform(-12, 0, 10000), [0, 1, 2**-24, 2**-25, 6e-5]])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(_to_float16(x).view(np.uint16), x.astype(np.float16).view(np.uint16))


def test_empty_shard():
    table = encode_windows([], vocab_size=300, k=8)
    assert table.num_rows == 0
    decoded = roundtrip([], 300, 8)
    assert len(decoded) == 0 and decoded.num_tokens == 0
    assert decoded.topk_ids.shape == (0, 8) and decoded.topk_probs.shape == (0, 8)
    np.testing.assert_array_equal(decoded.offsets, [0])


def test_empty_windows_of_any_dtype_mix_with_full_ones():
    rng = np.random.default_rng(2)
    full = make_window(rng, 5, 300, 8)
    empty = TargetWindow("e", 0, np.zeros(0), np.zeros((0, 8)), np.zeros((0, 8)), np.zeros(0))
    assert_same(roundtrip([empty, full, empty], 300, 8), [empty, full, empty], 8)


def test_decode_chunked_and_sliced_tables():
    rng = np.random.default_rng(5)
    windows = random_windows(rng, 300, 8, count=8)
    table = encode_windows(windows, vocab_size=300, k=8)
    two_chunks = pa.concat_tables([table.slice(0, 3), table.slice(3)])
    assert two_chunks.column("topk_ids").num_chunks == 2
    assert_same(decode_table(two_chunks, vocab_size=300, k=8), windows, 8)
    assert_same(decode_table(table.slice(4), vocab_size=300, k=8), windows[4:], 8)
    assert_same(decode_table(table.slice(1, 3).combine_chunks(), vocab_size=300, k=8), windows[1:4], 8)


def test_decode_size_mismatch_names_column():
    rng = np.random.default_rng(0)
    table = encode_windows([make_window(rng, 4, 300, 8)], vocab_size=300, k=8)
    i = table.schema.get_field_index("topk_probs")
    bad = table.set_column(i, table.schema.field(i), pa.array([b"\x00" * 10], pa.binary()))
    with pytest.raises(ShardError, match="topk_probs"):
        decode_table(bad, vocab_size=300, k=8)
    with pytest.raises(ShardError, match="topk_ids"):
        decode_table(table, vocab_size=300, k=4)  # wrong k: id cells are the wrong size
    with pytest.raises(ContractError, match="prob_encoding 'int8'"):
        decode_table(table, vocab_size=300, k=8, prob_encoding="int8")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("topk_ids", lambda w: w.topk_ids + 300, "top-k id out of"),
        ("tokens", lambda w: -w.tokens - 1, "token id out of"),
        ("topk_probs", lambda w: w.topk_probs[:, ::-1].copy(), "descending"),
        ("topk_probs", lambda w: w.topk_probs * np.nan, "not finite"),
        ("tail_mass", lambda w: w.tail_mass + 2, "tail_mass"),
        ("tail_mass", lambda w: np.zeros_like(w.tail_mass), "differ from 1"),
        ("topk_ids", lambda w: w.topk_ids[:, :4], "shape"),
    ],
)
def test_encode_rejects_bad_windows(field, value, match):
    rng = np.random.default_rng(0)
    windows = [make_window(rng, 6, 300, 8, doc=f"d{i}") for i in range(3)]
    setattr(windows[2], field, value(windows[2]))
    with pytest.raises(ValueError, match=match) as err:
        encode_windows(windows, vocab_size=300, k=8)
    assert "window 2" in str(err.value) and "d2" in str(err.value)


# ---------------------------------------------------------------- shard sets


def make_manifest(
    shards: list[ShardInfo], vocab: int = 300, k: int = 8, version: str = FORMAT_VERSION
) -> Manifest:
    return Manifest(
        format_version=version,
        created_at=utc_timestamp(),
        teacher=TeacherInfo(name_or_path="teacher", config_sha256="c" * 64, weights_sha256="d" * 64),
        tokenizer=TokenizerInfo(sha256=TOK_SHA),
        vocab_size=vocab,
        padded_vocab_size=320,
        token_dtype=token_dtype_for(vocab),
        sparsify=SparsifyInfo(k=k, temperature=1.0),
        plan=PlanInfo(sha256="e" * 64, num_units=len(shards), corpus="default", max_length=64),
        shards=shards,
        stats={"capture_seconds": 1.5},
    )


def build_set(root: str, units: int = 3, vocab: int = 300, k: int = 8) -> list[list[TargetWindow]]:
    """A complete shard set as capture would leave it: shards, completion records, manifest."""
    rng = np.random.default_rng(11)
    per_unit, infos = [], []
    for unit in range(units):
        windows = [] if unit == 1 else random_windows(rng, vocab, k, count=4)  # unit 1: empty shard
        info = write_shard(
            storage.join(root, shard_relpath(unit)),
            windows,
            vocab_size=vocab,
            k=k,
            unit=unit,
            relpath=shard_relpath(unit),
        )
        write_completion(root, info)
        per_unit.append(windows)
        infos.append(info)
    write_manifest(root, make_manifest(infos, vocab, k))
    return per_unit


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "set")
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
    rng = np.random.default_rng(0)
    windows = random_windows(rng, 300, 8)
    url = storage.join(root, shard_relpath(4))
    info = write_shard(url, windows, vocab_size=300, k=8, unit=4, relpath=shard_relpath(4))
    data = storage.read_bytes(url)
    assert info.unit == 4 and info.path == "shards/unit-000004.parquet"
    assert info.rows == len(windows) and info.tokens == sum(w.num_tokens for w in windows)
    assert info.bytes == len(data) and info.sha256 == storage.sha256_bytes(data)
    assert pq.read_metadata(pa.BufferReader(data)).row_group(0).column(4).compression == "ZSTD"
    assert storage.list_files(storage.join(root, "shards")) == ["unit-000004.parquet"]  # no temp files left


def test_manifest_roundtrip(root):
    per_unit = build_set(root)
    m = read_manifest(root)
    assert m == make_manifest(m.shards).model_copy(update={"created_at": m.created_at})
    assert m.total_rows == sum(len(w) for w in per_unit)
    assert m.total_tokens == sum(w.num_tokens for ws in per_unit for w in ws)
    assert m.total_bytes == sum(s.bytes for s in m.shards)
    assert json.loads(storage.read_text(storage.join(root, MANIFEST_NAME)))["format_version"] == "0.1"


def test_completion_records(root):
    assert read_completions(root) == {}
    build_set(root, units=3)
    done = read_completions(root)
    assert sorted(done) == [0, 1, 2]
    assert done == {s.unit: s for s in read_manifest(root).shards}
    storage.atomic_write_text(completion_url(root, 5), "{not json")
    with pytest.raises(ShardError, match=r"unit-000005\.json"):
        read_completions(root)


def test_read_manifest_errors(root):
    with pytest.raises(ShardError, match=r"manifest\.json not found"):
        read_manifest(root)
    url = storage.join(root, MANIFEST_NAME)
    storage.atomic_write_text(url, "{")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(root)
    good = json.loads(make_manifest([]).model_dump_json())
    storage.atomic_write_text(url, json.dumps({**good, "format_version": "9.9"}))
    with pytest.raises(ContractError, match=r"'9\.9'.*reads only 0\.1"):
        read_manifest(root)
    storage.atomic_write_text(url, json.dumps({**good, "colour": "blue"}))
    with pytest.raises(ShardError, match="colour"):
        read_manifest(root)
    storage.atomic_write_text(url, json.dumps({**good, "token_dtype": "uint32"}))
    with pytest.raises(ShardError, match="token_dtype"):
        read_manifest(root)


def test_shard_set_reads_what_was_written(root):
    per_unit = build_set(root)
    ss = ShardSet(root + "/")
    assert len(ss) == 3 and ss.root == root
    assert ss.tokenizer_url() == f"{root}/tokenizer"
    for i, windows in enumerate(per_unit):
        assert_same(ss.read_shard(i), windows, 8)
        np.testing.assert_array_equal(ss.row_lengths(i), [w.num_tokens for w in windows])


def test_check_contract_names_both_values(root):
    build_set(root)
    ss = ShardSet(root)
    ss.check_contract(tokenizer_sha256=TOK_SHA, vocab_size=300)
    ss.check_contract()
    with pytest.raises(ContractError) as err:
        ss.check_contract(tokenizer_sha256=STUDENT_SHA)
    assert TOK_SHA[:12] in str(err.value) and STUDENT_SHA[:12] in str(err.value) and root in str(err.value)
    with pytest.raises(ContractError, match=r"vocab_size 300 .*student's vocab_size is 512"):
        ss.check_contract(vocab_size=512)


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


def test_verify_good_set(root):
    build_set(root)
    assert verify_shard_set(root) == []


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


def test_verify_completion_disagrees(root):
    build_set(root)
    info = read_manifest(root).shards[0]
    write_completion(root, info.model_copy(update={"rows": info.rows + 1}))
    assert problem_paths(root) == {completion_url(root, 0): "disagrees with the manifest entry"}


def test_verify_bad_values_behind_a_valid_checksum(root):
    """A writer bug (probabilities above 1) is caught even though the bytes match the manifest."""
    build_set(root)
    url = storage.join(root, shard_relpath(0))
    table = pq.read_table(pa.BufferReader(storage.read_bytes(url)))
    cells = [np.frombuffer(c.as_py(), "<f2") * 0 + 2 for c in table.column("topk_probs")]
    col = pa.array([c.astype("<f2").tobytes() for c in cells], pa.binary())
    data = serialize_table(table.set_column(5, table.schema.field(5), col))
    storage.atomic_write_bytes(url, data)
    m = read_manifest(root)
    m.shards[0] = m.shards[0].model_copy(update={"bytes": len(data), "sha256": storage.sha256_bytes(data)})
    write_manifest(root, m)
    write_completion(root, m.shards[0])
    messages = [p.message for p in verify_shard_set(root) if p.path == url]
    assert "top-k probabilities outside [0, 1]" in messages
    assert any("differ from 1" in msg for msg in messages)


def test_verify_unreadable_manifest(root):
    build_set(root)
    storage.atomic_write_text(storage.join(root, MANIFEST_NAME), json.dumps({"format_version": "0.2"}))
    problems = verify_shard_set(root)
    assert len(problems) == 1 and problems[0].path.endswith("manifest.json") and "0.2" in problems[0].message


def test_inspect(root):
    per_unit = build_set(root)
    info = inspect_shard_set(root)
    tokens = sum(w.num_tokens for ws in per_unit for w in ws)
    assert info["units"] == 3 and info["tokens"] == tokens and info["k"] == 8 and info["vocab_size"] == 300
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / tokens)
    assert {"tokens", "topk_ids", "topk_probs", "tail_mass"} <= set(info["bytes_per_token_by_column"])
    stored = np.mean([w.topk_probs.sum(axis=1).mean() for ws in per_unit for w in ws if w.num_tokens])
    assert 0 < info["mean_stored_mass"] < 1
    assert info["mean_stored_mass"] + info["mean_tail_mass"] == pytest.approx(1, abs=1e-3)
    assert info["mean_stored_mass"] == pytest.approx(stored, abs=0.1)
    json.dumps(info)  # the CLI prints it as JSON

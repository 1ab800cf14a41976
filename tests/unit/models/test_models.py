"""Tokenizer training/identity, the student ladder, model loading/identity, and a short pretrain."""

from __future__ import annotations

import itertools
import json
import os
import re

import pytest
import torch

from raydistill.errors import ConfigError, ModelLoadError
from raydistill.io.corpus import default_documents
from raydistill.models.loading import align_special_tokens, count_parameters, load_causal_lm, model_identity
from raydistill.models.sizes import STUDENT_SIZES, TEACHER_SIZE, build_llama
from raydistill.models.students import build_student
from raydistill.models.tokenizers import (
    EOS_TOKEN,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
    vocab_size_of,
)
from raydistill.recipes import pretrain
from raydistill.recipes.pretrain import (
    ensure_demo_teacher,
    lr_at,
    token_stream,
    train_causal_lm,
)

TEXTS = [d.text for d in default_documents()[:60]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=600)


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_is_byte_level_deterministic_and_lossless(tok):
    assert vocab_size_of(tok) == len(tok) == 600
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer_sha256(train_tokenizer(TEXTS, vocab_size=600)) == tokenizer_sha256(tok)
    assert tokenizer_sha256(train_tokenizer(TEXTS, vocab_size=500)) != tokenizer_sha256(tok)
    text = "  Ünïcode → 漢字 \t tabs\nand  spaces  "  # unseen characters still encode (byte fallback)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok(" x")["input_ids"] != tok("x")["input_ids"]  # no prefix space added


def test_tokenizer_hash_survives_save_load_and_padding_calls(tok, tmp_path):
    before = tokenizer_sha256(tok)
    tok(["a", "abc def"], padding=True, truncation=True, max_length=3)
    assert tokenizer_sha256(tok) == before
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert tokenizer_sha256(loaded) == before
    assert loaded.eos_token_id == tok.eos_token_id and len(loaded) == len(tok)
    assert loaded(TEXTS[3])["input_ids"] == tok(TEXTS[3])["input_ids"]


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=re.escape(f"'{missing}' does not exist")):
        load_tokenizer(missing)
    with pytest.raises(ModelLoadError, match=re.escape(f"'{tmp_path}' is not a tokenizer directory")):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load a tokenizer from '{tmp_path}'")):
        load_tokenizer(str(tmp_path))


# --- model ladder -----------------------------------------------------------------------------


def test_student_sizes_strictly_increase_and_are_well_formed():
    counts = []
    for name, flavor in STUDENT_SIZES.items():
        model = build_student(name, vocab_size=4096)
        assert flavor["hidden"] % flavor["heads"] == 0
        assert (
            flavor["intermediate"] % 16 == 0 and abs(flavor["intermediate"] - 8 / 3 * flavor["hidden"]) <= 8
        )
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
        assert model.config._attn_implementation == "sdpa"
        counts.append(count_parameters(model))
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] / counts[1] > 10  # the ladder spans more than 10× from "tiny"
    teacher = build_llama(vocab_size=4096, **TEACHER_SIZE)
    assert 3.5e6 < count_parameters(teacher) < 6e6


def test_unknown_size_lists_known_sizes():
    with pytest.raises(ConfigError, match="unknown student size 'huge'; known sizes: micro, tiny, small"):
        build_student("huge", vocab_size=100)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_student("micro", vocab_size=100, seed=1)
    assert torch.equal(torch.rand(3), expected)
    b = build_student("micro", vocab_size=100, seed=1)
    c = build_student("micro", vocab_size=100, seed=2)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_count_parameters_excludes_tied_embedding_once():
    model = build_student("micro", vocab_size=100)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    assert count_parameters(model, exclude_embeddings=True) == total - 100 * STUDENT_SIZES["micro"]["hidden"]
    untied = build_llama(vocab_size=100, hidden=32, layers=1, heads=2, tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(untied, exclude_embeddings=True) == 2 * 100 * 32


# --- loading and identity ---------------------------------------------------------------------


def test_round_trip_gives_equal_logits_and_stable_identity(tmp_path):
    model = build_student("micro", vocab_size=120).eval()
    model.save_pretrained(tmp_path / "a")
    loaded = load_causal_lm(str(tmp_path / "a"))
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    loaded.save_pretrained(tmp_path / "b")
    ident_a, ident_b = model_identity(str(tmp_path / "a")), model_identity(str(tmp_path / "b"))
    assert ident_a["config_sha256"] == ident_b["config_sha256"]
    assert ident_a["weights_sha256"] == ident_b["weights_sha256"]
    assert ident_a["name_or_path"] == str(tmp_path / "a")
    with torch.no_grad():
        loaded.model.norm.weight[0] += 1e-3
    loaded.save_pretrained(tmp_path / "c")
    ident_c = model_identity(str(tmp_path / "c"))
    assert ident_c["weights_sha256"] != ident_a["weights_sha256"]
    assert ident_c["config_sha256"] == ident_a["config_sha256"]
    assert load_causal_lm(str(tmp_path / "a"), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_identity_of_a_non_local_id_says_unavailable():
    ident = model_identity("raydistill-test-org/never-downloaded")
    assert ident["weights_sha256"] == "unavailable"


def test_load_causal_lm_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=re.escape(f"model path '{missing}' does not exist")):
        load_causal_lm(missing)
    with pytest.raises(
        ModelLoadError, match=re.escape(f"'{tmp_path}' is not a model directory (no config.json)")
    ):
        load_causal_lm(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load a causal LM from '{tmp_path}'")) as err:
        load_causal_lm(str(tmp_path))
    assert "\n" not in str(err.value)


# --- pretrain ---------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_floor():
    def lr(step: int) -> float:
        return lr_at(step, peak=1.0, warmup=10, progress=(step - 10) / 90)

    lrs = [lr(s) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[100] == pytest.approx(0.1)


def test_pretraining_is_a_function_of_its_steps_not_of_the_clock(tok, monkeypatch):
    """The same steps give the same weights however slow the machine is (no time budget)."""
    texts = ["The quick brown fox jumps over the lazy dog. " * 20] * 3
    results = []
    for slow in (False, True):
        if slow:  # a loaded machine: every step seems to take a minute
            ticks = iter(range(0, 10**6, 60))
            monkeypatch.setattr(pretrain.time, "perf_counter", lambda ticks=ticks: float(next(ticks)))
        model = build_student("micro", vocab_size=len(tok), seed=3)
        train_causal_lm(model, tok, texts, steps=6, seq_len=32, batch_size=4, log=lambda _: None)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_token_stream_puts_eos_after_every_document(tok):
    stream = token_stream(tok, ["one doc", "two docs here", "three"])
    assert (stream == tok.eos_token_id).sum() == 3 and stream[-1] == tok.eos_token_id
    assert tok.decode(stream.tolist()) == f"one doc{EOS_TOKEN}two docs here{EOS_TOKEN}three{EOS_TOKEN}"


def test_train_causal_lm_lowers_the_loss(tok):
    model = build_student("micro", vocab_size=len(tok))
    texts = ["The quick brown fox jumps over the lazy dog. " * 20] * 3
    result = train_causal_lm(
        model, tok, texts, steps=40, seq_len=32, batch_size=8, lr=1e-2, log=lambda _: None
    )
    assert result["steps"] == 40 and result["tokens"] == 40 * 8 * 32
    assert result["final_loss"] < result["first_loss"] - 2.0
    assert not model.training
    with pytest.raises(ConfigError, match="training text too short"):
        train_causal_lm(model, tok, ["hi"], steps=2, seq_len=32, log=lambda _: None)


def test_ensure_demo_teacher_trains_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "TEACHER_SIZE", STUDENT_SIZES["micro"])  # keep the test fast
    lines: list[str] = []
    path = ensure_demo_teacher(
        str(tmp_path), TEXTS[:20], steps=2, vocab_size=400, log=lines.append
    )
    assert path == os.path.join(str(tmp_path), "teacher")
    weights = os.path.join(path, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert any("pretrain: done" in line for line in lines)
    marker = json.loads(open(os.path.join(path, pretrain.MARKER)).read())
    assert marker["result"]["steps"] == 2

    lines.clear()
    again = ensure_demo_teacher(
        str(tmp_path), TEXTS[:20], steps=2, vocab_size=400, log=lines.append
    )
    assert again == path and os.stat(weights).st_mtime_ns == mtime
    assert any("reusing" in line for line in lines) and not any("pretrain" in line for line in lines)

    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    assert model.config.eos_token_id == tokenizer.eos_token_id == 0
    assert tokenizer_sha256(tokenizer) == marker["tokenizer_sha256"]

    os.remove(os.path.join(path, pretrain.MARKER))  # an interrupted run leaves no marker: retrain
    lines.clear()
    ensure_demo_teacher(str(tmp_path), TEXTS[:20], steps=2, vocab_size=400, log=lines.append)
    assert any("pretrain: done" in line for line in lines)


def test_ensure_demo_teacher_crash_while_saving_keeps_the_earlier_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "TEACHER_SIZE", STUDENT_SIZES["micro"])  # keep the test fast
    path = ensure_demo_teacher(str(tmp_path), TEXTS[:20], steps=2, vocab_size=400, log=lambda _: None)
    before = {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    real_build = pretrain.build_llama

    def build_llama(**kwargs):  # a model whose save writes its config, then the process dies
        model = real_build(**kwargs)

        def save_pretrained(directory, **_):
            model.config.save_pretrained(directory)
            raise RuntimeError("killed")

        model.save_pretrained = save_pretrained
        return model

    monkeypatch.setattr(pretrain, "build_llama", build_llama)
    with pytest.raises(RuntimeError, match="killed"):  # other settings: retrained, then killed while saving
        ensure_demo_teacher(str(tmp_path), TEXTS[:20], steps=3, vocab_size=400, log=lambda _: None)
    after = {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}
    assert after == before and os.listdir(tmp_path) == ["teacher"]  # the earlier teacher, whole; no temporaries


def test_align_special_tokens_sets_config_and_generation_config(tok):
    model = build_student("micro", vocab_size=len(tok))
    align_special_tokens(model, tok)
    assert model.config.eos_token_id == model.generation_config.pad_token_id == tok.eos_token_id

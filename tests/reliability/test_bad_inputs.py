"""Bad input is boring: one ``error:`` line naming the field or file and the fix, exit 2, no traceback,
and nothing written (issue #19).

Every case runs the real CLI (``support.run_cli``; one case a real ``python -m raydistill`` process)
in a fresh folder ``t`` that holds its config and its output ``t/out``. "Nothing written" is
checked strictly: every file under ``t`` is the same (name, size, mtime) after the command as
before it and no file or folder was added, so a plan, a tokenizer copy or a stray temporary
anywhere fails the case. The hub is forced offline (``HF_HUB_OFFLINE``) so no case depends on the network.
Almost every case fails before Ray starts, in well under a second: that is the point, and only
cases that would start Ray or train are marked ``slow`` (none do today).

Each case reports itself to ``chaos_record`` (kind ``bad_input``) before its asserts, for
tools/chaos.py to count.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from support import free_port, run_cli

REPO = Path(__file__).resolve().parents[2]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes anywhere: chmod cases cannot fail
HAS_GPU = torch.cuda.is_available()  # the "no GPUs" cases need a machine without one
GPT2_POSITIONS = 32


@dataclass
class Cmd:
    """What a case runs: CLI arguments, the words its one error line must hold, and how."""

    args: list[str]
    needles: tuple[str, ...]
    env: dict[str, str] | None = None  # set: run `python -m raydistill` in a fresh process with this env added
    cwd: Path | None = None


@dataclass
class Case:
    name: str
    build: object  # (inputs, t, monkeypatch) -> Cmd
    marks: list = field(default_factory=list)


CASES: list[Case] = []


def case(name: str, *marks):
    def register(build):
        CASES.append(Case(name, build, list(marks)))
        return build
    return register


# --- shared inputs (built once per module) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher, tiny_corpus, other_tokenizer) -> SimpleNamespace:
    """Model directories, corpora and a shard set, each broken in one way (or good, to be broken by a setting)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from support import write_synthetic_set
    from transformers import GPT2Config, GPT2LMHeadModel

    from raydistill.contracts.shards import Codec, TargetWindow, VocabTable

    root = tmp_path_factory.mktemp("bad-inputs")
    teacher = Path(tiny_teacher)
    tokenizer_files = [f for f in teacher.iterdir() if f.name.startswith(("tokenizer", "special_tokens"))]

    def model_dir(name: str, *files: Path) -> Path:
        d = root / name
        d.mkdir()
        for f in files:
            shutil.copy(f, d / f.name)
        return d

    tok_only = model_dir("tokenizer-only", *tokenizer_files)
    no_weights = model_dir("no-weights", teacher / "config.json", *tokenizer_files)
    no_tokenizer = model_dir("no-tokenizer", teacher / "config.json", teacher / "model.safetensors")
    gguf_only = model_dir("gguf-only", *tokenizer_files)
    (gguf_only / "teacher-q8.gguf").write_bytes(b"GGUF not really")
    bad_weights = model_dir("bad-weights", *teacher.iterdir())
    (bad_weights / "model.safetensors").write_bytes(b"not safetensors")
    bad_config = model_dir("bad-config", *teacher.iterdir())
    (bad_config / "config.json").write_text("{ this is not json")

    def gpt2(name: str, vocab: int, tokenizer_dir: Path):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=GPT2_POSITIONS, n_embd=16, n_layer=1,
                                           n_head=2))
        d = root / name
        model.save_pretrained(d)
        for f in tokenizer_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, d / f.name)
        return d

    gpt2_teacher = gpt2("gpt2-32-positions", 384, teacher)
    other_reference = gpt2("other-tokenizer-reference", 512, Path(other_tokenizer))

    corpora = root / "corpora"
    corpora.mkdir()
    (corpora / "bad.parquet").write_bytes(os.urandom(300))
    (corpora / "bad.jsonl.gz").write_bytes(os.urandom(100))
    whole = gzip.compress(b'{"text": "hello world"}\n' * 200)
    (corpora / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (corpora / "body.jsonl").write_text('{"body": "a document under another key"}\n')
    pq.write_table(pa.table({"body": ["a document under another column"]}), corpora / "body.parquet")
    (corpora / "blank.jsonl").write_text('{"text": "   "}\n{"text": ""}\n')
    (corpora / "table.csv").write_text("text\nhello\n")

    rng = np.random.default_rng(0)
    vocab, k = 384, 4
    windows = [TargetWindow(doc_id=f"{d:016x}", window=0, tokens=rng.integers(0, vocab, 40),
                            ids=np.stack([rng.choice(vocab, k, replace=False) for _ in range(40)]),
                            probs=np.full((40, k), 0.2, np.float32), tail=np.full(40, 0.2, np.float32))
               for d in range(4)]
    shards = str(root / "shards")
    write_synthetic_set(shards, [windows[:2], windows[2:]], Codec("topk", k, vocab, VocabTable(rng.integers(0, 50, vocab))))
    return SimpleNamespace(teacher=tiny_teacher, corpus=tiny_corpus, tok_only=tok_only, no_weights=no_weights,
                           no_tokenizer=no_tokenizer, gguf_only=gguf_only, bad_weights=bad_weights,
                           bad_config=bad_config, gpt2=gpt2_teacher, other_reference=other_reference,
                           corpora=corpora, shards=shards)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No case may depend on the network: the hub counts as unreachable (as on this CI machine)."""
    from huggingface_hub import constants

    from raydistill.models.tokenizers import hub_unreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


def write(t: Path, **data) -> str:
    path = t / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def capture(w, t: Path, **over) -> str:
    """A capture config that would run, with ``over`` applied (``None`` removes a key)."""
    data = dict(teacher=w.teacher, output=str(t / "out"), corpus={"source": w.corpus, "split": "all"}, mode="topk",
                k=16, max_length=64, unit_bytes=3500, num_actors=1, batch_tokens=512)
    data.update(over)
    return write(t, **{key: v for key, v in data.items() if v is not None})


def select(w, t: Path, **over) -> str:
    data = dict(teacher=w.teacher, reference=w.teacher, output=str(t / "out"),
                corpus={"source": w.corpus, "split": "all"}, max_length=64, unit_bytes=3500, num_actors=1)
    data.update(over)
    return write(t, **data)


def train(w, t: Path, **over) -> str:
    data = dict(shards=w.shards, output=str(t / "out"), seq_len=32, micro_batch_size=2, steps=2, num_workers=1,
                student={"size": "micro"})
    data.update(over)
    return write(t, **{key: v for key, v in data.items() if v is not None})


def train_corpus(w, t: Path, **over) -> str:
    data = dict(shards=None, corpus={"source": w.corpus, "split": "all"}, tokenizer=w.teacher, loss="ce")
    data.update(over)
    return train(w, t, **data)


def corpus_folder(w, t: Path) -> Path:
    """A copy of the tiny corpus in its own folder under ``t``."""
    data = t / "data"
    data.mkdir()
    shutil.copy(w.corpus, data / "docs.jsonl")
    return data


# --- the cases ---------------------------------------------------------------------------------------------------
# config files and --set

@case("set-unclosed-list")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t), "--set", "k=[1,"], ("'k'", "valid integer"))


@case("set-glob-source-matching-nothing")
def _(w, t, mp):
    (t / "cwd").mkdir()
    mp.chdir(t / "cwd")
    return Cmd(["capture", capture(w, t), "--set", "corpus.source=*.jsonl"], ("corpus source '*.jsonl' matches no files",))


@case("set-value-with-colons")
def _(w, t, mp):
    (t / "cwd").mkdir()
    mp.chdir(t / "cwd")
    return Cmd(["capture", capture(w, t), "--set", "corpus.source=a: b: c"], ("corpus source 'a: b: c' matches no files",))


@case("set-without-key")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t), "--set", "=3"], ("override '=3' needs a key",))


@case("set-empty-nested-key")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t), "--set", "corpus.=3"], ("override 'corpus.=3' needs a key",))


@case("set-unknown-key")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t), "--set", "top_k=5"], ("top_k",))


@case("config-not-utf8")
def _(w, t, mp):
    (t / "bad.yaml").write_bytes(b"teacher: caf\xe9\n")
    return Cmd(["capture", str(t / "bad.yaml")], ("is not UTF-8 text", "bad.yaml"))


@case("config-not-yaml")
def _(w, t, mp):
    (t / "bad.yaml").write_text("teacher: [unclosed\n")
    return Cmd(["capture", str(t / "bad.yaml")], ("is not valid YAML", "bad.yaml"))


@case("config-a-list-not-a-mapping")
def _(w, t, mp):
    (t / "bad.yaml").write_text("- teacher\n- output\n")
    return Cmd(["capture", str(t / "bad.yaml")], ("must hold a mapping", "bad.yaml"))


@case("config-missing")
def _(w, t, mp):
    return Cmd(["train", str(t / "missing.yaml")], ("config file not found", "missing.yaml"))


@case("config-unknown-key")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, top_k=5)], ("unknown key 'top_k'", "config.yaml"))


@case("config-unknown-key-select")
def _(w, t, mp):
    return Cmd(["select", select(w, t, fractoin=0.3)], ("fractoin",))


@case("select-repeated-lines-above-one")
def _(w, t, mp):
    return Cmd(["select", select(w, t, max_repeated_lines=1.5)], ("max_repeated_lines", "1"))


@case("config-missing-required-key")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=None)], ("teacher",))


@case("config-wrong-type")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, k="many")], ("'k'", "valid integer"))


@case("config-out-of-bounds-temperature")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, temperature=-1)], ("temperature",))


@case("config-out-of-bounds-zero-stage")
def _(w, t, mp):
    return Cmd(["train", train(w, t), "--set", "zero_stage=7"], ("zero_stage", "0, 1, 2 or 3"))


@case("config-bad-choice-mode")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, mode="dense")], ("mode",))


# addresses

@case("address-nothing-listening")
def _(w, t, mp):
    port = free_port()
    return Cmd(["capture", capture(w, t), "--address", f"127.0.0.1:{port}"], ("cannot connect", f"127.0.0.1:{port}"))


@case("address-dashboard-url")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t), "--address", "http://127.0.0.1:8265"], ("http://127.0.0.1:8265",
                                                                                  "dashboard"))


@case("address-ray-address-env")
def _(w, t, mp):
    port = free_port()
    mp.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    return Cmd(["train", train(w, t)], ("cannot connect", f"127.0.0.1:{port}"))


@case("address-ray-client-nothing-listening")
def _(w, t, mp):
    port = free_port()
    return Cmd(["select", select(w, t), "--address", f"ray://127.0.0.1:{port}"], ("cannot connect", str(port)))


# teachers and other model directories

@case("teacher-missing")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(t / "no-such-model"))], ("no-such-model", "does not exist"))


@case("teacher-dir-without-config-json")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.tok_only))], ("tokenizer-only", "no config.json"))


@case("teacher-dir-with-only-a-gguf-file")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.gguf_only))], ("gguf-only", "gguf_file: teacher-q8.gguf"))


@case("teacher-gguf-file-missing")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.gguf_only), gguf_file="other.gguf")], ("other.gguf",))


@case("teacher-without-weights")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.no_weights))], ("no-weights", "no weights"))


@case("teacher-corrupt-weights")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.bad_weights))], ("model.safetensors", "cannot be read"))


@case("teacher-corrupt-config-json")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.bad_config))], ("bad-config", "config cannot be read"))


@case("teacher-without-tokenizer")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.no_tokenizer))], ("no-tokenizer", "not a tokenizer directory"))


@case("teacher-is-a-file")
def _(w, t, mp):
    (t / "model.bin").write_bytes(b"weights?")
    return Cmd(["capture", capture(w, t, teacher=str(t / "model.bin"))], ("model.bin", "is a file"))


@case("k-larger-than-vocab")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, k=1000)], ("k=1000", "384"))


@case("max-length-beyond-rope-positions")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, max_length=512)],
               ("max_length 512 is longer than the teacher's 256 positions", "max_length <= 256"))


@case("max-length-beyond-gpt2-positions")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, teacher=str(w.gpt2))],
               (f"max_length 64 is longer than the teacher's {GPT2_POSITIONS} positions", "gpt2-32-positions"))


@case("teacher-relative-path-two-parts")
def _(w, t, mp):
    (t / "cwd").mkdir()
    mp.chdir(t / "cwd")
    return Cmd(["capture", capture(w, t, teacher="models/teacher")],
               ("teacher 'models/teacher' is not a local directory", str(t / "cwd" / "models" / "teacher"),
                "hub cannot be reached"))


@case("teacher-relative-path-one-part")
def _(w, t, mp):
    (t / "cwd").mkdir()
    mp.chdir(t / "cwd")
    return Cmd(["capture", capture(w, t, teacher="teacher")], ("teacher 'teacher' is not a local directory",
                                                               "hub cannot be reached"))


@case("teacher-relative-path-folder-exists-hub-reachable")
def _(w, t, mp):
    """With a hub that answers, a name whose folder exists here is still taken for the path it is."""
    from raydistill.models import tokenizers

    mp.setattr(tokenizers, "hub_unreachable", lambda: None)
    (t / "cwd" / "models").mkdir(parents=True)
    mp.chdir(t / "cwd")
    return Cmd(["capture", capture(w, t, teacher="models/teacher")], ("'models' exists but holds no 'teacher'",))


@case("teacher-dot-relative-path-missing")
def _(w, t, mp):
    (t / "cwd").mkdir()
    mp.chdir(t / "cwd")
    return Cmd(["capture", capture(w, t, teacher="./models/teacher")], ("./models/teacher", "does not exist"))


@case("shipped-capture-yaml-run-outside-the-repo")
def _(w, t, mp):
    """jobs/capture.yaml names raydistill-demo/teacher relative to where the command runs."""
    mp.chdir(t)
    return Cmd(["capture", str(REPO / "jobs" / "capture.yaml")],
               ("teacher 'raydistill-demo/teacher' is not a local directory", str(t / "raydistill-demo")))


# corpora

@case("corpus-missing-path")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(t / "nope.jsonl")})], ("nope.jsonl", "matches no files"))


@case("corpus-glob-matching-nothing")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(t / "nope" / "*.jsonl")})], ("nope", "matches no files"))


@case("corpus-unsupported-extension")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(w.corpora / "table.csv")})],
               ("table.csv", "unsupported extension"))


@case("corpus-jsonl-without-text-field")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(w.corpora / "body.jsonl")})],
               ("body.jsonl", "no field 'text'", "corpus.text_field"))


@case("corpus-parquet-without-text-column")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(w.corpora / "body.parquet")})],
               ("body.parquet", "no column 'text'", "corpus.text_field"))


@case("corpus-corrupt-parquet")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(w.corpora / "bad.parquet")})],
               ("bad.parquet", "cannot be read as Parquet"))


@case("corpus-not-gzip-jsonl-gz")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(w.corpora / "bad.jsonl.gz")})],
               ("bad.jsonl.gz", "cannot be read as compressed JSON lines"))


@case("corpus-truncated-jsonl-gz")
def _(w, t, mp):
    return Cmd(["select", select(w, t, corpus={"source": str(w.corpora / "truncated.jsonl.gz")})],
               ("truncated.jsonl.gz", "cannot be read as compressed JSON lines"))


@case("corpus-only-blank-documents")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, corpus={"source": str(w.corpora / "blank.jsonl")})],
               ("blank.jsonl", "has no documents"))


@case("eval-corpus-corrupt-parquet")
def _(w, t, mp):
    return Cmd(["eval", w.teacher, "--source", str(w.corpora / "bad.parquet")], ("bad.parquet", "cannot be read as"))


@case("eval-corpus-truncated-jsonl-gz")
def _(w, t, mp):
    return Cmd(["eval", w.teacher, "--source", str(w.corpora / "truncated.jsonl.gz")],
               ("truncated.jsonl.gz", "cannot be read as"))


# outputs

@case("output-is-a-file")
def _(w, t, mp):
    (t / "a-file").write_text("not a directory")
    return Cmd(["capture", capture(w, t, output=str(t / "a-file"))], ("a-file", "is a file, not a directory"))


@case("output-under-a-file")
def _(w, t, mp):
    (t / "a-file").write_text("not a directory")
    return Cmd(["capture", capture(w, t, output=str(t / "a-file" / "shards"))], ("lies under", "which is a file"))


@case("output-unwritable" + ("-skipped-as-root" if AS_ROOT else ""),
      *([pytest.mark.skip(reason="root may write anywhere: chmod cannot make a folder unwritable")] if AS_ROOT else []))
def _(w, t, mp):
    (t / "locked").mkdir()
    (t / "locked").chmod(0o500)
    return Cmd(["capture", capture(w, t, output=str(t / "locked" / "out"))], ("locked", "may not write"))


@case("output-gs-without-gcsfs")
def _(w, t, mp):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    return Cmd(["capture", capture(w, t, output="gs://bucket/shards")],
               ("gs://bucket/shards", "needs a package that is not installed"))


@case("output-unknown-protocol")
def _(w, t, mp):
    return Cmd(["select", select(w, t, output="nosuchfs://bucket/scores")], ("nosuchfs://", "fsspec URL"))


@case("output-inside-corpus-folder")
def _(w, t, mp):
    data = corpus_folder(w, t)
    return Cmd(["capture", capture(w, t, corpus={"source": str(data), "split": "all"}, output=str(data / "shards"))],
               ("lies inside the corpus folder", str(data / "shards"), str(data)))


@case("output-inside-corpus-glob-folder")
def _(w, t, mp):
    data = corpus_folder(w, t)
    return Cmd(["capture", capture(w, t, corpus={"source": str(data / "*.jsonl"), "split": "all"},
                                   output=str(data / "shards"))], ("lies inside the corpus folder", "*.jsonl"))


@case("output-is-the-corpus-folder-relative")
def _(w, t, mp):
    corpus_folder(w, t)
    mp.chdir(t)
    return Cmd(["capture", capture(w, t, corpus={"source": "data/", "split": "all"}, output="data")],
               ("output 'data' lies inside the corpus folder",))


@case("select-output-inside-corpus-folder")
def _(w, t, mp):
    data = corpus_folder(w, t)
    return Cmd(["select", select(w, t, corpus={"source": str(data), "split": "all"}, output=str(data / "select"))],
               ("lies inside the corpus folder", str(data / "select")))


@case("select-refined-inside-corpus-folder")
def _(w, t, mp):
    data = corpus_folder(w, t)
    return Cmd(["select", select(w, t, corpus={"source": str(data / "*.jsonl"), "split": "all"},
                                 refined=str(data / "refined"))], ("refined", "lies inside the corpus folder"))


@case("train-corpus-output-inside-corpus-folder")
def _(w, t, mp):
    data = corpus_folder(w, t)
    return Cmd(["train", train_corpus(w, t, corpus={"source": str(data), "split": "all"}, output=str(data / "student"))],
               ("lies inside the corpus folder", str(data / "student")))


# the cluster: resources it can never give, a local Ray that cannot start

@case("num-gpus-per-actor-on-cpu",
      *([pytest.mark.skip(reason="this machine has a GPU")] if HAS_GPU else []))
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, num_gpus_per_actor=1)],
               ("num_gpus_per_actor=1 but the cluster has 0 GPUs", "set num_gpus_per_actor: 0"))


@case("num-gpus-per-actor-auto-on-cpu-select",
      *([pytest.mark.skip(reason="this machine has a GPU")] if HAS_GPU else []))
def _(w, t, mp):
    return Cmd(["select", select(w, t, num_gpus_per_actor=1, num_actors="auto")],
               ("num_gpus_per_actor=1 but the cluster has 0 GPUs",))


@case("threads-per-actor-beyond-the-cpus")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, threads_per_actor=4096)], ("threads_per_actor=4096", "CPUs"))


@case("num-actors-beyond-the-cpus")
def _(w, t, mp):
    return Cmd(["capture", capture(w, t, num_actors=4096)], ("num_actors=4096", "CPUs", "set num_actors <="))


@case("train-use-gpu-on-cpu", *([pytest.mark.skip(reason="this machine has a GPU")] if HAS_GPU else []))
def _(w, t, mp):
    return Cmd(["train", train(w, t, use_gpu=True)], ("use_gpu=true but the cluster has 0 GPUs", "use_gpu: false"))


@case("train-workers-beyond-the-cpus")
def _(w, t, mp):
    return Cmd(["train", train(w, t, num_workers=4096)], ("num_workers=4096", "CPUs"))


@case("ray-tmpdir-under-a-file")
def _(w, t, mp):
    """A fresh process (the test process may already hold a Ray): Ray's temp dir cannot be made."""
    (t / "a-file").write_text("not a directory")
    return Cmd(["capture", capture(w, t)], ("cannot start a local Ray", str(t / "a-file"), "RAY_TMPDIR"),
               env={"RAY_TMPDIR": str(t / "a-file"), "HF_HUB_OFFLINE": "1"})


# select

@case("select-missing-reference")
def _(w, t, mp):
    return Cmd(["select", select(w, t, reference=str(t / "no-such-reference"))], ("no-such-reference",))


@case("select-reference-without-config-json")
def _(w, t, mp):
    return Cmd(["select", select(w, t, reference=str(w.tok_only))], ("reference", "no config.json"))


@case("select-reference-max-length-beyond-positions")
def _(w, t, mp):
    return Cmd(["select", select(w, t, reference=str(w.gpt2))],
               (f"max_length 64 is longer than the reference's {GPT2_POSITIONS} positions",))


@case("select-reference-other-tokenizer")
def _(w, t, mp):
    return Cmd(["select", select(w, t, reference=str(w.other_reference), max_length=32)], ("tokenize differently",))


@case("select-refined-names-a-file")
def _(w, t, mp):
    return Cmd(["select", select(w, t, refined=str(t / "refined.parquet"))], ("refined=", "names a file", "folder"))


@case("select-fraction-out-of-bounds")
def _(w, t, mp):
    return Cmd(["select", select(w, t, fraction=1.5)], ("fraction",))


# train, sweep, demo

@case("train-missing-shard-set")
def _(w, t, mp):
    return Cmd(["train", train(w, t, shards=str(t / "no-shards"))], ("no-shards",))


@case("train-unknown-student-size")
def _(w, t, mp):
    return Cmd(["train", train(w, t, student={"size": "huge"})], ("unknown student size 'huge'",))


@case("train-seq-len-beyond-positions")
def _(w, t, mp):
    return Cmd(["train", train_corpus(w, t, seq_len=100000)], ("seq_len 100000", "positions"))


@case("train-student-model-missing")
def _(w, t, mp):
    return Cmd(["train", train(w, t, student={"model": str(t / "no-student")})], ("no-student",))


@case("train-both-shards-and-corpus")
def _(w, t, mp):
    return Cmd(["train", train(w, t, corpus={"source": w.corpus})], ("set either shards or corpus",))


@case("train-no-data-source")
def _(w, t, mp):
    return Cmd(["train", train(w, t, shards=None)], ("set a data source",))


@case("train-corpus-with-a-kd-loss")
def _(w, t, mp):
    return Cmd(["train", train_corpus(w, t), "--set", "loss=forward_kl"], ("loss: ce",))


@case("train-corpus-corrupt-parquet")
def _(w, t, mp):
    return Cmd(["train", train_corpus(w, t, corpus={"source": str(w.corpora / "bad.parquet"), "split": "all"})],
               ("bad.parquet", "cannot be read as Parquet"))


@case("eval-missing-model")
def _(w, t, mp):
    return Cmd(["eval", str(t / "no-such-model"), "--max-documents", "2"], ("no-such-model",))


@case("eval-corrupt-weights")
def _(w, t, mp):
    return Cmd(["eval", str(w.bad_weights), "--max-documents", "2"], ("bad-weights",))


@case("eval-max-length-too-small")
def _(w, t, mp):
    return Cmd(["eval", w.teacher, "--max-length", "4"], ("max_length",))


@case("inspect-missing-path")
def _(w, t, mp):
    return Cmd(["inspect", str(t / "nothing")], ("nothing",))


@case("verify-missing-path")
def _(w, t, mp):
    return Cmd(["verify", str(t / "nothing")], ("nothing",))


@case("inspect-not-a-shard-set")
def _(w, t, mp):
    return Cmd(["inspect", w.teacher], ("manifest",))


@case("sweep-unknown-size-in-the-ladder")
def _(w, t, mp):
    return Cmd(["sweep", write(t, shards=w.shards, output=str(t / "out"), sizes=["micro", "huge"])],
               ("sizes: huge: unknown student size 'huge'",))


@case("sweep-empty-ladder")
def _(w, t, mp):
    return Cmd(["sweep", write(t, shards=w.shards, output=str(t / "out"), sizes=[])], ("sizes",))


@case("sweep-missing-shard-set")
def _(w, t, mp):
    return Cmd(["sweep", write(t, shards=str(t / "no-shards"), output=str(t / "out"))], ("no-shards",))


@case("sweep-object-store-output")
def _(w, t, mp):
    return Cmd(["sweep", write(t, shards=w.shards, output="s3://bucket/sweep")], ("s3://bucket/sweep",
                                                                                   "must be a local directory"))


@case("sweep-owned-train-key")
def _(w, t, mp):
    return Cmd(["sweep", write(t, shards=w.shards, output=str(t / "out"), train={"seed": 3})], ("train.seed",))


@case("demo-bad-setting")
def _(w, t, mp):
    return Cmd(["demo", "--workdir", str(t / "out"), "--set", "steps=0"], ("steps",))


@case("demo-unknown-setting")
def _(w, t, mp):
    return Cmd(["demo", "--workdir", str(t / "out"), "--set", "stepz=10"], ("stepz",))


# --- the one test --------------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, mtime) and folder under ``root``: what "nothing written" compares. A folder's own
    mtime is left out: the stage guard may take the output's lock (creating, then removing, the output
    folder and its lock file) before the stage's checks run; what counts is that nothing is left."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def _run_process(cmd: Cmd, cwd: Path) -> tuple[int, str]:
    env = {**os.environ, **(cmd.env or {})}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "raydistill", *cmd.args], cwd=cmd.cwd or cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    return run.returncode, run.stderr


@pytest.mark.parametrize("name", [pytest.param(c.name, marks=c.marks, id=c.name) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(name, inputs, tmp_path, monkeypatch, capsys, chaos_record):
    """The case's command exits 2 with one ``error:`` line naming what is wrong, and leaves ``tmp_path`` as it was."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t = tmp_path
    cmd = next(c for c in CASES if c.name == name).build(inputs, t, monkeypatch)
    before = _snapshot(t)
    t0 = time.perf_counter()
    if cmd.env is not None:
        code, err = _run_process(cmd, t)
    else:
        code, _, err = run_cli(capsys, *cmd.args)
    seconds = time.perf_counter() - t0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    line = lines[0] if len(lines) == 1 else ""
    missing = [n for n in cmd.needles if n not in line]
    written = sorted(set(_snapshot(t).items()) ^ set(before.items()))
    ok = (code == 2 and len(lines) == 1 and line.startswith("error: ") and "Traceback" not in err and not missing
          and not written)
    chaos_record("bad_input", name, ok, seconds=round(seconds, 3), command=cmd.args[0], exit_code=code,
                 lines=len(lines), written=len(written))
    assert code == 2, err
    assert len(lines) == 1 and line.startswith("error: "), err
    assert "Traceback" not in err
    assert not missing, (missing, line)
    assert not written, written
    assert not (t / "out").exists() or not any((t / "out").iterdir())


def test_the_table_is_long_enough():
    """Issue #19 asks for at least 45 bad inputs, each with its own id."""
    names = [c.name for c in CASES]
    assert len(names) >= 45 and len(set(names)) == len(names)
    json.dumps(names)

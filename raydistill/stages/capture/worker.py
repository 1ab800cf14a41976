"""The teacher side of a capture, callable with or without Ray.

``TeacherWorker`` loads the teacher once and turns one work unit (a list of documents)
into one shard: tokenize, cut into windows, batch by length, forward, sparsify, encode,
write atomically, mark done. Ray wraps it as an actor in :mod:`raydistill.stages.capture.run`;
benchmarks (``tools/bench_capture.py``) call it directly, on a GPU too, without Ray.

The tensor work (forward + sparsify) runs under a device lock and only the small
[tokens, k] results leave it; tokenizing, encoding and writing run outside. With two calls
in flight per actor, one unit's encode and write overlap the next unit's forward. On a GPU
that hides all host work; on CPU it needs a core to spare (actors × threads < cores):
where every core already runs a forward, the actor's throughput is the serial one.

By default (``head="auto"``) a plain decoder with an ``lm_head`` runs without its head:
the output projection is applied to the valid positions' final hidden states a chunk of
rows at a time (``sparsify_hidden``), so the [batch, length, vocab] logits never exist,
padded positions are never projected, and each chunk is still in cache when top-k reads it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from raydistill.config.base import WorkerSettings
from raydistill.config.sections import TargetsConfig, UnitInputConfig, WindowConfig
from raydistill.contracts.shards.codec import Codec
from raydistill.contracts.shards.format import TargetWindow
from raydistill.contracts.shards.vocab import VocabTable, load_vocab_table
from raydistill.contracts.shards.writer import write_shard
from raydistill.contracts.units import UnitKey, mark_done
from raydistill.errors import ConfigError, first_line
from raydistill.io.corpus import Document
from raydistill.io.slices import Slice
from raydistill.models.loading import load_causal_lm, pick_device_and_dtype
from raydistill.models.tokenizers import load_tokenizer, vocab_size_of
from raydistill.models.windows import PaddedBatch, document_windows, length_batches, make_batch
from raydistill.runtime.unit_input import UnitDocuments, read_unit_documents
from raydistill.stages.capture.sparsify import (
    SparseTargets,
    budget_cut,
    hybrid_cut,
    sparsify_hidden,
    sparsify_topk,
)

__all__ = ["TeacherSettings", "TeacherWorker", "choose_head", "codec_for", "draw_uniforms"]

log = logging.getLogger(__name__)

_CPU_CHUNK_BYTES = 8 << 20  # float32 logits per sparsify chunk on CPU: stays in L2/L3 between matmul and top-k
_GPU_CHUNK_ROWS = 4096  # per design.md's H100 measurements
# Config keys of models whose logits are not a plain lm_head(hidden): never bypass their head.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class TeacherSettings(WorkerSettings, WindowConfig, TargetsConfig, UnitInputConfig):
    """Everything an actor needs to capture: the window, target and unit-input sections as the capture config
    has them (``CaptureConfig.section(TeacherSettings, ...)``), plus where the teacher and the set's
    vocabulary table are. Picklable, so Ray ships it to every actor (and to a restarted one)."""

    teacher: str
    gguf_file: str | None = Field(None, description="a GGUF file inside `teacher` (weights, config, tokenizer)")
    device_map: str | None = Field(None, description="HF device_map, e.g. 'auto': one teacher over every GPU of "
                                   "the actor (needs accelerate)")
    head: Literal["auto", "chunked", "full"] = Field(
        "auto", description="chunked: decoder + lm_head chunk by chunk; full: the model's logits; auto: chunked "
        "where provably exact")
    sparsify_chunk: int = Field(0, ge=0, description="rows per sparsify chunk; 0 = ≈ 8 MiB of float32 logits on "
                                "CPU, 4096 rows on a GPU")
    vocab_table: str | None = Field(None, description="URL of the shard set's vocab.parquet (ids are renumbered "
                                    "by it) ...")
    vocab_table_sha256: str | None = Field(None, description="... and its checksum")


def draw_uniforms(seed: int, doc_id: str, window: int, n: int, draws: int) -> np.ndarray:
    """[n, draws] float32 uniforms in [0, 1) for one window's sampled targets (hybrid: [n, 2 · draws],
    the deep-tail draws on the device, then the draws after the unit's cut).

    Keyed by a hash of (seed, doc_id, window), so the draws are the same whichever actor,
    batch or retry computes them (a rerun after a failure writes identical shards).
    """
    digest = hashlib.sha256(f"{seed}\0{doc_id}\0{window}".encode()).digest()
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))
    return rng.random((n, draws), dtype=np.float32)


class TeacherWorker:
    """Holds one teacher in memory and captures whole work units; safe for 2+ calls at once."""

    def __init__(self, settings: TeacherSettings, vocab_counts: np.ndarray | None = None):
        """The vocabulary table comes from ``settings.vocab_table`` (capture), else ``vocab_counts``
        (benchmarks, tests), else all counts are equal (identity renumbering)."""
        torch.set_num_threads(settings.threads_per_actor)
        self.settings = settings
        self.device, self.dtype = pick_device_and_dtype(settings.dtype)
        self.tokenizer = load_tokenizer(settings.teacher, trust_remote_code=settings.trust_remote_code,
                                        gguf_file=settings.gguf_file)
        self.vocab_size = vocab_size_of(self.tokenizer)
        table = self._vocab_table(vocab_counts)
        self.codec = codec_for(settings.section(TargetsConfig), self.vocab_size, table)
        self.model = _load_teacher(settings, self.device, self.dtype)
        self.device = self.model.get_input_embeddings().weight.device  # the first shard's under a device_map
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.head = choose_head(self.model, settings.head, self.vocab_size)
        self._decoder = self.model.get_decoder() if self.head == "chunked" else None
        self.chunk_rows = settings.sparsify_chunk or (
            _GPU_CHUNK_ROWS if self.device.type != "cpu" else max(16, _CPU_CHUNK_BYTES // (4 * self.vocab_size)))
        self._device_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to call from two threads

    def _vocab_table(self, counts: np.ndarray | None) -> VocabTable:
        """The set's table from storage (so a restarted actor needs nothing from the driver), else
        from ``counts``, else all-equal counts."""
        s = self.settings
        if s.vocab_table is not None:
            return load_vocab_table(s.vocab_table, self.vocab_size, s.vocab_table_sha256)[0]
        return VocabTable(counts) if counts is not None else VocabTable.uniform(self.vocab_size)

    def tokenize(self, documents: list[Document]) -> list[tuple[str, int, list[int]]]:
        """(doc_id, window index, token ids) for every window of every non-empty document."""
        with self._tokenizer_lock:
            windows = document_windows(self.tokenizer, documents, self.settings.max_length)
        return [(documents[i].id, w, chunk) for i, w, chunk in windows]

    def batches(self, windows: list[list[int]]) -> list[PaddedBatch]:
        """The padded batches ``targets_for`` runs, in its order (benchmarks reuse them)."""
        return [make_batch(windows, rows, self.pad_id)
                for rows in length_batches([len(w) for w in windows], self.settings.batch_tokens)]

    @torch.inference_mode()
    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """What the sparsify needs from the device: final hidden states (chunked head) or logits."""
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        if self.head == "chunked":
            return self._decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    @torch.inference_mode()
    def sparsify(self, out: torch.Tensor, batch: PaddedBatch, uniforms: torch.Tensor | None = None) -> SparseTargets:
        """Sparse targets of the batch's valid positions, row-major, never touching padding.

        ``uniforms`` [valid positions, draws]: the sampled mode's random numbers, row-major too.
        """
        s = self.settings
        kw = dict(k=s.k, temperature=s.temperature, vocab_size=self.vocab_size, chunk_size=self.chunk_rows,
                  mode=s.mode, threshold=s.threshold if s.mode == "adaptive" else None,
                  min_prob=s.min_prob if s.mode == "adaptive" else 0.0)
        if uniforms is not None:
            uniforms = uniforms.to(out.device)
        if self.head == "chunked":
            hidden = out.flatten(0, 1) if not batch.padded else out[batch.attention_mask.to(out.device).bool()]
            weight = self.model.get_output_embeddings().weight
            return sparsify_hidden(hidden.to(weight.device), weight, uniforms=uniforms, **kw)
        if not batch.padded:
            return sparsify_topk(out.flatten(0, 1), uniforms=uniforms, **kw)
        starts = np.concatenate([[0], np.cumsum(batch.lengths)])
        parts = [sparsify_topk(out[r, :n], uniforms=None if uniforms is None else uniforms[starts[r]:starts[r + 1]],
                               **kw) for r, n in enumerate(batch.lengths.tolist())]  # views, no copy
        fields = ("ids", "probs", "tail", "drawn") if s.mode == "hybrid" else ("ids", "probs", "tail")
        return SparseTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))

    def _window_uniforms(self, key: tuple[str, int], n: int) -> np.ndarray:
        """The window's uniforms: [n, draws] (sampled) or [n, 2 · draws] (hybrid)."""
        s = self.settings
        return draw_uniforms(s.seed, key[0], key[1], n, s.draw_count * (2 if s.mode == "hybrid" else 1))

    def _batch_uniforms(self, batch: PaddedBatch, keys: list[tuple[str, int]] | None) -> torch.Tensor | None:
        """What the device needs of the batch's uniforms (hybrid: the first half, its deep-tail draws)."""
        if self.settings.mode not in ("sampled", "hybrid"):
            return None
        if keys is None:
            raise ValueError(f"{self.settings.mode} mode needs the (doc_id, window) key of every window")
        d = self.settings.draw_count
        return torch.from_numpy(np.concatenate([
            self._window_uniforms(keys[i], int(n))[:, :d] for i, n in zip(batch.rows, batch.lengths, strict=True)]))

    def targets_for(self, windows: list[list[int]], timings: dict | None = None,
                    keys: list[tuple[str, int]] | None = None) -> list[tuple[np.ndarray, ...]]:
        """Sparse targets (ids, probs, tail[, hybrid's deep draws]) for each window, computed batch by batch.

        ``keys``: (doc_id, window index) of each window, which seed the sampled mode's draws.
        """
        results: list = [None] * len(windows)
        timings = timings if timings is not None else {}
        for batch in self.batches(windows):
            uniforms = self._batch_uniforms(batch, keys)
            with self._device_lock:
                t0 = time.perf_counter()
                targets = _to_numpy(self.sparsify(self.forward(batch), batch, uniforms))
                timings["device_s"] = timings.get("device_s", 0.0) + time.perf_counter() - t0
            bounds = np.cumsum(batch.lengths)[:-1]
            for i, *parts in zip(batch.rows, *(np.split(a, bounds) for a in targets), strict=True):
                results[i] = tuple(parts)  # views into the batch's arrays
        return results

    @torch.inference_mode()
    def bare_forward(self, windows: list[list[int]]) -> int:
        """The model's own forward (logits included) over the batches ``targets_for`` would run, and
        nothing else: the baseline a benchmark compares the capture with, in the same process."""
        for batch in self.batches(windows):
            with self._device_lock:
                self.model(input_ids=batch.input_ids.to(self.device),
                           attention_mask=batch.attention_mask.to(self.device), use_cache=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sum(len(w) for w in windows)

    def run_unit(self, root: str, unit: UnitKey, piece: Slice) -> dict:
        """Read slice ``piece`` and capture it as one unit into ``root`` (the ``runtime.pool.UnitWorker``
        call); returns the shard's record as a dict plus timing."""
        t0 = time.perf_counter()
        read = read_unit_documents(piece, self.settings, self.tokenizer, self._tokenizer_lock)
        result = self.capture_documents(root, unit, read.documents, read)
        result["timings"]["read_s"] = time.perf_counter() - t0 - result["seconds"]
        result["seconds"] = time.perf_counter() - t0
        return result

    def capture_documents(self, root: str, unit: UnitKey, documents: list[Document],
                          read: UnitDocuments | None = None) -> dict:
        """Capture documents already read as unit ``unit`` (``read``: what the record says was read)."""
        t0 = time.perf_counter()
        windows = self.tokenize(documents)
        tokenize_s = time.perf_counter() - t0
        result = self.capture_windows(root, unit, windows, read)
        result["seconds"] = time.perf_counter() - t0
        result["timings"]["tokenize_s"] = tokenize_s
        return result

    def capture_windows(self, root: str, unit: UnitKey, windows: list[tuple[str, int, list[int]]],
                        read: UnitDocuments | None = None) -> dict:
        """Capture already tokenized windows as unit ``unit``: targets, encode, write, mark done.

        Returns ``{"shard": ShardInfo dict, "seconds", "tokens", "timings": {device_s, write_s}}``:
        ``device_s`` is the time holding the device lock (forward + sparsify), ``write_s`` the
        encode + write + completion record; waiting for the lock is in neither.
        """
        t0 = time.perf_counter()
        timings = {"device_s": 0.0}
        targets = self.targets_for([w[2] for w in windows], timings, keys=[(w[0], w[1]) for w in windows])
        t_write = time.perf_counter()
        if self.settings.mode == "budget":
            targets = _cut_unit(targets, self.settings.budget_mean_ids)
        elif self.settings.mode == "hybrid":
            after_cut = [self._window_uniforms((w[0], w[1]), len(w[2]))[:, self.settings.draw_count:]
                         for w in windows]
            targets = _cut_unit_hybrid(targets, after_cut, self.settings.budget_mean_ids)
        rows = [
            TargetWindow(doc_id=doc_id, window=w, tokens=np.asarray(ids, dtype=np.int64),
                         ids=tgt[0], probs=tgt[1], tail=tgt[2], counts=tgt[3] if len(tgt) > 3 else None)
            for (doc_id, w, ids), tgt in zip(windows, targets, strict=True)
        ]
        info = write_shard(root, rows, codec=self.codec, unit=unit)
        if read is not None:  # what the worker read, for the record (benchmarks capture bare windows)
            info = info.model_copy(update=read.record_fields())
        mark_done(root, info)  # last: only now does the unit count as done
        timings["write_s"] = time.perf_counter() - t_write
        return {"shard": info.model_dump(), "seconds": time.perf_counter() - t0, "tokens": info.tokens,
                "timings": timings}


def codec_for(targets: TargetsConfig, vocab_size: int, table: VocabTable) -> Codec:
    """The codec a capture with these target settings writes (the driver records the same one)."""
    return Codec.for_mode(targets.mode, k=targets.k, draws=targets.draw_count, vocab_size=vocab_size, table=table,
                          value_scale=targets.value_scale)


def _cut_unit(targets: list[tuple[np.ndarray, np.ndarray, np.ndarray]], mean_ids: float
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Budget mode: one probability cut over the whole unit, so it stores ``mean_ids`` ids per token."""
    if not targets:
        return targets
    bounds = np.cumsum([len(t[2]) for t in targets])[:-1]
    cut = budget_cut(*(np.concatenate([t[i] for t in targets]) for i in range(3)), mean_ids)
    return list(zip(*(np.split(a, bounds) for a in cut), strict=True))


def _cut_unit_hybrid(targets: list[tuple[np.ndarray, ...]], uniforms: list[np.ndarray], mean_ids: float
                     ) -> list[tuple[np.ndarray, ...]]:
    """Hybrid mode: the unit's budget cut, then each token's tail draws (``sparsify.hybrid_cut``)."""
    if not targets:
        return targets
    bounds = np.cumsum([len(t[2]) for t in targets])[:-1]
    cut = hybrid_cut(*(np.concatenate([t[i] for t in targets]) for i in range(4)), np.concatenate(uniforms), mean_ids)
    return list(zip(*(np.split(a, bounds) for a in (cut.ids, cut.probs, cut.tail, cut.counts)), strict=True))


def _to_numpy(t: SparseTargets) -> tuple[np.ndarray, ...]:
    arrays = (t.ids, t.probs, t.tail) if t.drawn is None else (t.ids, t.probs, t.tail, t.drawn)
    return tuple(a.cpu().numpy() for a in arrays)


def _load_teacher(settings: TeacherSettings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The teacher in eval mode: on ``device``, or spread by HF over the actor's GPUs."""
    model = load_causal_lm(settings.teacher, trust_remote_code=settings.trust_remote_code, dtype=dtype,
                           gguf_file=settings.gguf_file,
                           device_map=settings.device_map)
    return (model if settings.device_map is not None else model.to(device)).eval()


def choose_head(model: torch.nn.Module, requested: str, vocab_size: int) -> str:
    """"chunked" if ``lm_head(decoder(x))`` provably gives the model's logits, else "full".

    "auto" falls back to "full" quietly; an explicit "chunked" that cannot be honoured is a
    ConfigError, since silently changing the targets would be worse than refusing.
    """
    if requested == "full":
        return "full"
    reason = _why_not_chunked(model, vocab_size)
    if reason is None:
        return "chunked"
    if requested == "chunked":
        raise ConfigError(f"head='chunked' does not fit this teacher: {reason}; use head='auto' or 'full'")
    log.info("teacher logits come from the full model (%s)", reason)
    return "full"


@torch.inference_mode()
def _why_not_chunked(model: torch.nn.Module, vocab_size: int) -> str | None:
    """None if the chunked head is exact for ``model``; otherwise the reason, for the log."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return "its output layer is not a bias-free nn.Linear"
    for key in _LOGIT_POSTPROCESSING:
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            return f"its config sets {key}"
    try:  # a probe: the two ways must agree on a few tokens
        ids = (torch.arange(8) % vocab_size).unsqueeze(0).to(model.get_input_embeddings().weight.device)
        full = model(input_ids=ids, use_cache=False).logits[0, :, :vocab_size].float()
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
        mine = (hidden.to(head.weight.device) @ head.weight[:vocab_size].t()).float()
    except Exception as err:  # a decoder that cannot be called alone
        return f"its decoder cannot run alone ({first_line(err)})"
    scale = float(full.abs().max()) + 1.0
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2  # bf16/fp16 matmuls may round differently
    if full.shape != mine.shape or not torch.allclose(mine, full.to(mine.device), rtol=0, atol=tolerance * scale):
        return "lm_head(decoder output) differs from its logits"
    return None

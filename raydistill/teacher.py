"""The teacher side of a capture, callable with or without Ray.

``TeacherWorker`` loads the teacher once and turns one work unit (a list of documents)
into one shard: tokenize, cut into windows, batch by length, forward, sparsify, encode,
write atomically, mark done. Ray wraps it as an actor in :mod:`raydistill.capture`;
benchmarks can call it directly on a GPU without Ray.

The device work (forward + top-k) runs under a lock; encoding and writing run outside
it, so with two calls in flight per actor the next unit's forward overlaps the previous
unit's encode and write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from raydistill.corpus import Document
from raydistill.models import load_causal_lm
from raydistill.shards.format import TargetWindow
from raydistill.shards.manifest import ShardInfo, shard_relpath, write_completion
from raydistill.shards.writer import write_shard
from raydistill.sparsify import sparsify_topk
from raydistill.storage import join
from raydistill.tokenization import load_tokenizer, vocab_size_of


@dataclass(frozen=True)
class TeacherSettings:
    teacher: str
    k: int
    temperature: float
    max_length: int
    batch_tokens: int
    dtype: str = "auto"
    threads: int = 1
    trust_remote_code: bool = False


def pick_device_and_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU (the capture runs for days there), fp32 on CPU (faster on CPUs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def cut_windows(token_ids: list[int], max_length: int) -> list[list[int]]:
    """Split one document's tokens into consecutive windows of at most ``max_length``."""
    return [token_ids[i : i + max_length] for i in range(0, len(token_ids), max_length)]


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group window indices by length so each padded batch stays under ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class TeacherWorker:
    """Holds one teacher in memory and captures whole work units."""

    def __init__(self, settings: TeacherSettings):
        torch.set_num_threads(settings.threads)
        self.settings = settings
        self.device, self.dtype = pick_device_and_dtype(settings.dtype)
        self.tokenizer = load_tokenizer(settings.teacher, trust_remote_code=settings.trust_remote_code)
        self.vocab_size = vocab_size_of(self.tokenizer)
        model = load_causal_lm(settings.teacher, trust_remote_code=settings.trust_remote_code, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._device_lock = threading.Lock()

    def tokenize(self, documents: list[Document]) -> list[tuple[str, int, list[int]]]:
        """(doc_id, window index, token ids) for every window of every non-empty document."""
        encoded = self.tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
        windows = []
        for doc, ids in zip(documents, encoded, strict=True):
            for w, chunk in enumerate(cut_windows(ids, self.settings.max_length)):
                windows.append((doc.id, w, chunk))
        return windows

    @torch.inference_mode()
    def targets_for(self, windows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Sparse targets (ids, probs, tail) for each window, computed batch by batch on the device."""
        s = self.settings
        results: list = [None] * len(windows)
        for batch in length_batches([len(w) for w in windows], s.batch_tokens):
            width = max(len(windows[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(windows[i])] = torch.tensor(windows[i])
                mask[row, : len(windows[i])] = 1
            with self._device_lock:
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits
                flat = logits[mask.to(self.device).bool()]  # [valid tokens, V_padded], row-major
                t = sparsify_topk(flat, k=s.k, temperature=s.temperature, vocab_size=self.vocab_size)
                ids, probs, tail = t.ids.cpu().numpy(), t.probs.cpu().numpy(), t.tail.cpu().numpy()
            start = 0
            for i in batch:
                n = len(windows[i])
                results[i] = (ids[start : start + n], probs[start : start + n], tail[start : start + n])
                start += n
        return results

    def capture_unit(self, root: str, unit: int, documents: list[Document]) -> dict:
        """Capture one unit into ``root``; returns the ShardInfo as a dict plus timing."""
        t0 = time.perf_counter()
        windows = self.tokenize(documents)
        targets = self.targets_for([w[2] for w in windows])
        rows = [
            TargetWindow(doc_id=doc_id, window=w, tokens=np.asarray(ids, dtype=np.int64),
                         topk_ids=tgt[0], topk_probs=tgt[1], tail_mass=tgt[2])
            for (doc_id, w, ids), tgt in zip(windows, targets, strict=True)
        ]
        relpath = shard_relpath(unit)
        info: ShardInfo = write_shard(join(root, relpath), rows, vocab_size=self.vocab_size, k=self.settings.k,
                                      unit=unit, relpath=relpath)
        write_completion(root, info)  # last: only now does the unit count as done
        return {"shard": info.model_dump(), "seconds": time.perf_counter() - t0}

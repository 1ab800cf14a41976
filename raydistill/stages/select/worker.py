"""The scoring side of ``raydistill select``: a unit worker holding the teacher and the reference model.

Per document it sums both models' next-token losses over every predicted token (windows of
``max_length``, as the capture cuts them), measures its repeated lines, and writes one scores
file per unit, then the unit's completion record (``contracts.selection`` / ``contracts.units``).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from raydistill.config.base import WorkerSettings
from raydistill.config.sections import UnitInputConfig, WindowConfig
from raydistill.contracts.selection import UNIT_SCHEMA, unit_scores_relpath
from raydistill.contracts.units import UnitKey, mark_done, write_unit_output
from raydistill.io.slices import Slice
from raydistill.models.loading import load_causal_lm, pick_device_and_dtype
from raydistill.models.tokenizers import load_tokenizer
from raydistill.models.windows import document_windows, length_batches, make_batch
from raydistill.runtime.unit_input import read_unit_documents
from raydistill.stages.select.repetition import repeated_line_chars

__all__ = ["ScoreSettings", "ScoreWorker", "summed_nll"]


class ScoreSettings(WorkerSettings, WindowConfig, UnitInputConfig):
    """What a ``ScoreWorker`` actor needs: both models, and the window and unit-input sections as the select
    config has them."""

    teacher: str
    reference: str
    gguf_file: str | None = Field(None, description="a GGUF file inside `teacher`")
    reference_gguf_file: str | None = Field(None, description="a GGUF file inside `reference`")


class ScoreWorker:
    """Holds the teacher and the reference; scores whole units. Safe for 2 calls at once (one uses
    the models while the other writes)."""

    def __init__(self, settings: ScoreSettings):
        torch.set_num_threads(settings.threads_per_actor)
        self.settings = settings
        self.device, dtype = pick_device_and_dtype(settings.dtype)
        self.tokenizer = load_tokenizer(settings.teacher, trust_remote_code=settings.trust_remote_code,
                                        gguf_file=settings.gguf_file)
        self.models = [
            load_causal_lm(path, trust_remote_code=settings.trust_remote_code, dtype=dtype, gguf_file=gguf)
            .to(self.device).eval()
            for path, gguf in ((settings.teacher, settings.gguf_file),
                               (settings.reference, settings.reference_gguf_file))
        ]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._device_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    def run_unit(self, root: str, unit: UnitKey, piece: Slice) -> dict:
        """Read slice ``piece``; per document, predicted tokens and summed next-token losses of both models,
        written to ``scores/unit-N.parquet`` (atomically), then the unit's completion record."""
        t0 = time.perf_counter()
        read = read_unit_documents(piece, self.settings, self.tokenizer, self._tokenizer_lock)
        documents = read.documents
        with self._tokenizer_lock:
            cut = document_windows(self.tokenizer, documents, self.settings.max_length)
        cut = [c for c in cut if len(c[2]) >= 2]  # a window predicts len - 1 tokens
        owner, windows = [c[0] for c in cut], [c[2] for c in cut]
        losses = np.zeros((2, len(documents)), dtype=np.float64)
        tokens = np.zeros(len(documents), dtype=np.int64)
        np.add.at(tokens, owner, [len(w) - 1 for w in windows])
        for rows in length_batches([len(w) for w in windows], self.settings.batch_tokens):
            batch = make_batch(windows, rows, self.pad_id)
            with self._device_lock:
                sums = [summed_nll(model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
                        for model in self.models]
            for m, s in enumerate(sums):
                np.add.at(losses[m], [owner[r] for r in rows], s)
        table = pa.table({"doc_id": [d.id for d in documents], "tokens": tokens, "teacher_loss": losses[0],
                          "reference_loss": losses[1],
                          "repeated_line_chars": [repeated_line_chars(d.text) for d in documents]}, schema=UNIT_SCHEMA)
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        record = write_unit_output(root, unit_scores_relpath(unit.unit), out.getvalue(), unit=unit, rows=len(documents),
                                   tokens=int(tokens.sum()))
        mark_done(root, record.model_copy(update=read.record_fields()))  # last: only now does the unit count as done
        return {"unit": unit.unit, "tokens": int(tokens.sum()), "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def summed_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Sum over each row of −log p(next token) in float32, padding excluded: [B] float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    out = np.zeros(input_ids.shape[0], dtype=np.float64)
    for r in range(input_ids.shape[0]):  # one row at a time: a float32 copy of [T, V], not of [B, T, V]
        n = int(attention_mask[r].sum())
        if n >= 2:
            nll = torch.nn.functional.cross_entropy(logits[r, : n - 1].float(), input_ids[r, 1:n], reduction="sum")
            out[r] = float(nll)
    return out

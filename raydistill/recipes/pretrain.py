"""Train the demo teacher (and the selection's reference) briefly on CPU, for a fixed number of steps.

A plain torch loop on purpose: the teacher is a fixture of the demo, not the product, and
it must train in minutes on a laptop without Ray or DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.models.loading import align_special_tokens, count_parameters
from raydistill.models.sizes import STUDENT_SIZES, TEACHER_SIZE, build_llama
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, train_tokenizer

__all__ = ["MARKER", "ensure_demo_reference", "ensure_demo_teacher", "lr_at", "token_stream",
           "train_causal_lm"]

MARKER = "raydistill-teacher.json"  # written last: its presence with matching settings = a usable teacher
_LOG_EVERY_S = 15.0


def lr_at(step: int, *, peak: float, warmup: int, progress: float, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio·peak`` as ``progress`` goes 0→1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> np.ndarray:
    """All texts tokenized once and concatenated, with eos after each document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token; documents cannot be separated")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    flat = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in ids])
    return np.insert(flat, np.cumsum([len(doc) for doc in ids]), eos)  # eos after every document


def train_causal_lm(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    steps: int,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Next-token training on random fixed-length windows of the concatenated texts, for exactly ``steps``.

    A fixed step count with a step-based warmup + cosine schedule, never a time budget: the model
    is the same on a quiet or a loaded machine (only the progress lines depend on the clock).
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    stream = torch.from_numpy(token_stream(tokenizer, texts))
    if len(stream) <= seq_len + 1:
        raise ConfigError(
            f"training text too short: {len(stream)} tokens, need more than seq_len+1={seq_len + 1}"
        )
    rng = np.random.default_rng(seed)
    offsets = torch.arange(seq_len + 1)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, min(20, steps // 10))
    losses: list[float] = []
    model.train()
    start = last_log = time.perf_counter()
    for step in range(steps):
        progress = (step - warmup) / max(1, steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=lr, warmup=warmup, progress=progress)
        starts = torch.from_numpy(rng.integers(0, len(stream) - seq_len, size=batch_size))
        chunk = stream[starts[:, None] + offsets].to(device)  # [batch, seq_len + 1], no per-token loop
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        now = time.perf_counter()
        if now - last_log >= _LOG_EVERY_S:
            last_log = now
            tok_s = (step + 1) * batch_size * seq_len / (now - start)
            log(f"pretrain: step {step + 1}/{steps} loss {np.mean(losses[-10:]):.3f} {tok_s:,.0f} tok/s")
    model.eval()
    seconds = time.perf_counter() - start
    result = {
        "steps": steps,
        "tokens": steps * batch_size * seq_len,
        "seconds": round(seconds, 3),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-10:])),
    }
    log(f"pretrain: done, {steps} steps, {result['tokens']:,} tokens in {seconds:.0f} s, loss {result['final_loss']:.3f}")
    return result


def ensure_demo_teacher(
    workdir: str,
    train_texts: list[str],
    *,
    steps: int,
    vocab_size: int = 4096,
    log: Callable[[str], None] = print,
) -> str:
    """Return ``<workdir>/teacher``: a trained HF model + tokenizer, reused when settings match.

    The directory is written whole or not at all (``storage.atomic_dir``), its marker file last, so
    an interrupted run is retrained, not reused half-written, and never leaves a partial
    ``teacher/``. ``workdir`` is a local directory (save_pretrained writes locally).
    """
    settings = {"version": 2, "size": TEACHER_SIZE, "vocab_size": vocab_size, "steps": steps,
                "texts_sha256": _texts_sha256(train_texts)}

    def tokenizer_for_teacher() -> PreTrainedTokenizerBase:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size)
        log(f"teacher: trained a {len(tokenizer)}-token BPE tokenizer in {time.perf_counter() - t0:.1f} s")
        return tokenizer

    return _ensure_trained(os.path.join(workdir, "teacher"), "teacher", settings, tokenizer_for_teacher,
                           TEACHER_SIZE, train_texts, steps=steps, log=log)


def ensure_demo_reference(
    workdir: str,
    teacher_dir: str,
    train_texts: list[str],
    *,
    steps: int,
    size: str = "micro",
    log: Callable[[str], None] = print,
) -> str:
    """Return ``<workdir>/reference``: MiniPLM's reference model for ``raydistill select``, a much smaller
    model with the teacher's tokenizer, trained briefly on the same texts; reused when settings match."""
    tokenizer = load_tokenizer(teacher_dir)
    settings = {"version": 2, "size": STUDENT_SIZES[size], "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "steps": steps, "texts_sha256": _texts_sha256(train_texts)}
    return _ensure_trained(os.path.join(workdir, "reference"), "reference", settings, lambda: tokenizer,
                           STUDENT_SIZES[size], train_texts, steps=steps, log=log)


def _ensure_trained(model_dir: str, name: str, settings: dict, make_tokenizer: Callable[[], PreTrainedTokenizerBase],
                    size: dict, texts: list[str], *, steps: int, log: Callable[[str], None]) -> str:
    """``model_dir`` when its marker records ``settings``; else build, train and save it there, marker last,
    replacing an older ``model_dir`` only once the new one is whole."""
    marker = os.path.join(model_dir, MARKER)
    if _reusable(model_dir, marker, settings):
        log(f"{name}: reusing {model_dir}")
        return model_dir
    tokenizer = make_tokenizer()
    model = build_llama(vocab_size=len(tokenizer), **size)
    align_special_tokens(model, tokenizer)
    log(f"{name}: {count_parameters(model) / 1e6:.2f}M parameters, {steps} steps")
    result = train_causal_lm(model, tokenizer, texts, steps=steps, log=log)
    record = {"settings": settings, "result": result, "parameters": count_parameters(model),
              "tokenizer_sha256": tokenizer_sha256(tokenizer)}
    with storage.atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        storage.atomic_write_text(os.path.join(tmp, MARKER), json.dumps(record, indent=2, sort_keys=True))
    return model_dir


def _reusable(teacher_dir: str, marker: str, settings: dict) -> bool:
    if not (os.path.isfile(os.path.join(teacher_dir, "config.json")) and os.path.isfile(marker)):
        return False
    if not any(
        os.path.isfile(os.path.join(teacher_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f).get("settings")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == json.loads(json.dumps(settings))  # compare as JSON (tuples -> lists)


def _texts_sha256(texts: list[str]) -> str:
    """Order-sensitive hash of the training texts (each length-prefixed, so joins cannot collide)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()

"""A GGUF model as a plain HF directory, written once: what online KD and evaluation load.

Capture reads a GGUF teacher directly (``gguf_file``); a sweep's online-KD runs and its
held-out scoring load the teacher in every worker, and dequantizing the file there each time
costs seconds per load and needs `gguf` on every node. Exporting it once to safetensors (fp32,
as transformers dequantizes it) gives every later step an ordinary model directory.
"""

from __future__ import annotations

import json
import os

import torch

from raydistill.io import storage
from raydistill.models.loading import load_causal_lm, model_identity
from raydistill.models.tokenizers import load_tokenizer

__all__ = ["EXPORT_MARKER", "export_gguf"]

EXPORT_MARKER = "raydistill-gguf-export.json"  # the source file's identity, written last


def export_gguf(path: str, gguf_file: str, out: str) -> str:
    """``out``: the model and tokenizer of ``path/gguf_file`` saved by ``save_pretrained``; reused when
    its marker names the same source file (by sha256), rewritten whole otherwise."""
    source = model_identity(path, gguf_file)
    marker = os.path.join(out, EXPORT_MARKER)
    if os.path.isfile(marker) and storage.dir_complete(out):
        with open(marker, encoding="utf-8") as f:
            if json.load(f).get("weights_sha256") == source["weights_sha256"]:
                return out
    model = _plain_copy(load_causal_lm(path, gguf_file=gguf_file, dtype=torch.float32))
    tokenizer = load_tokenizer(path, gguf_file=gguf_file)
    with storage.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, EXPORT_MARKER), "w", encoding="utf-8") as f:
            json.dump(source, f)
    return out


def _plain_copy(model):
    """The same weights in a model built from its config: transformers marks a model loaded from GGUF
    as quantized and refuses to save it, though its tensors are ordinary fp32 ones by now."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain.eval()

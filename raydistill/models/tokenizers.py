"""Tokenizer training, loading and identity.

The tokenizer hash is part of the shard contract: a student may only train on targets whose
ids mean the same tokens, so the hash must depend on the vocabulary and the rules, not on
file layout or runtime padding/truncation state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from raydistill.errors import ModelLoadError, first_line

__all__ = ["EOS_TOKEN", "HUB_CONNECT_TIMEOUT_S", "check_local_or_hub", "hub_unreachable", "load_from_gguf",
           "load_tokenizer", "looks_local", "tokenizer_sha256", "train_tokenizer", "vocab_size_of"]

EOS_TOKEN = "<|endoftext|>"
# Files from which AutoTokenizer can build a tokenizer; a directory with none of them is not one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
HUB_CONNECT_TIMEOUT_S = 3.0  # one TCP connect to the hub (or the proxy), where the hub client retries for ~55 s


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts``; one special token serves as eos, bos and pad.

    Byte-level means every string is encodable (no unknown token), so any corpus can be
    captured with it. Deterministic for the same input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )


def load_tokenizer(path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained, with any failure turned into one ModelLoadError line.

    ``gguf_file``: a GGUF file inside ``path`` whose metadata holds the tokenizer (needs `gguf`).
    """
    check_local_or_hub(path, "tokenizer path")
    if gguf_file is not None:
        return load_from_gguf(AutoTokenizer, path, gguf_file, "tokenizer", trust_remote_code=trust_remote_code)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"'{path}' is not a tokenizer directory (no {' or '.join(_TOKENIZER_FILES[:2])}); "
            "pass a directory written by save_pretrained or a hub id"
        )
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelLoadError(
            f"cannot load a tokenizer from '{path}': {first_line(err)}; "
            "pass a directory holding tokenizer files (save_pretrained) or a hub id"
        ) from err


def load_from_gguf(auto_class, path: str, gguf_file: str, what: str, **kwargs):
    """``auto_class.from_pretrained(path, gguf_file=...)`` with the usual one-line errors."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"gguf_file={gguf_file!r} needs the 'gguf' package: pip install 'raydistill[gguf]'")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, gguf_file)):
        raise ModelLoadError(f"GGUF file '{gguf_file}' not found in '{path}'")
    try:
        return auto_class.from_pretrained(path, gguf_file=gguf_file, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"cannot load a {what} from GGUF file '{os.path.join(path, gguf_file)}': "
                             f"{first_line(err)}") from err


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the canonical tokenizer JSON: stable across save/load and across calls."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Runtime state, not identity: HF sets these on the backend when called with padding.
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:  # a slow (pure Python) tokenizer: its vocabulary and special tokens are its identity
        spec = {"vocab": tokenizer.get_vocab(), "special": tokenizer.all_special_tokens}
    canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def vocab_size_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """True vocabulary size, added tokens included (a model's embedding may be padded beyond it)."""
    return len(tokenizer)


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ('org/name' or 'name')."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.exists(path)


def check_local_or_hub(path: str, what: str) -> None:
    """Refuse in one line, before any hub request, a model or tokenizer name that cannot be loaded.

    A local directory passes. A name that looks like a path (``/``, ``.``, ``~``, two slashes) but is
    no directory is refused. A name that could be a hub id ('org/name', 'name') is refused too when
    the hub cannot be reached and the hub cache has no copy (the hub client would otherwise retry
    for about a minute before failing), or, with a hub, when its folder exists here (``models/teacher``
    beside a ``models/`` folder: a path run from the wrong directory). With no hub but a cached copy,
    this process is put in offline mode so the copy loads at once. ``what`` names the field.
    """
    if os.path.isdir(path):
        return
    where = os.path.abspath(os.path.expanduser(path))
    fix = "pass the path of a directory written by save_pretrained, or a hub id"
    if os.path.exists(path):
        raise ModelLoadError(f"{what} '{path}' is a file, not a model directory; {fix}")
    if looks_local(path):
        raise ModelLoadError(f"{what} '{path}' does not exist (looked in {where}); {fix}")
    why = hub_unreachable()
    folder = os.path.dirname(path)
    if why is None and folder and os.path.isdir(folder):
        raise ModelLoadError(f"{what} '{path}' is not a local directory (looked in {where}: '{folder}' exists but "
                             f"holds no '{os.path.basename(path)}'); fix the path, or run from the directory it is "
                             "relative to")
    if why is None:
        return
    if _in_hub_cache(path):
        _go_offline()
        return
    raise ModelLoadError(f"{what} '{path}' is not a local directory (looked in {where}) and the hub cannot be "
                         f"reached ({why}); run from the directory it is relative to, pass an absolute path, or "
                         "use a hub id on a machine with network")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None if it can (checked once per process).

    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` count as unreachable; otherwise one TCP connect
    (``HUB_CONNECT_TIMEOUT_S``) to ``HF_ENDPOINT``'s host, or to the HTTPS proxy when one is set.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(constants.ENDPOINT)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"no answer from {host}:{port}: {err.strerror or err}"
    return None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo_id, name), str)
                   for name in ("config.json", *_TOKENIZER_FILES))
    except Exception:  # an id the hub client rejects: not cached
        return False


def _go_offline() -> None:
    """Load from the hub cache without asking the hub: this process, and the local Ray it starts."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True

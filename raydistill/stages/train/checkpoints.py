"""Resuming loads tensors, never code: DeepSpeed checkpoints read with torch's weights-only unpickler.

DeepSpeed reads its checkpoint files with ``torch.load(..., weights_only=False)``, a full unpickler:
a file planted in a shared ``storage_path`` could then run any code in every training worker. A
record of sha256s written by the run would not help, since whoever can write the checkpoint can
write the record beside it. So the files are read with ``weights_only=True`` while DeepSpeed loads
them (:func:`weights_only_torch_load` replaces ``torch.load`` for that call only), allowing, beyond
torch's own tensors and containers, just the few plain DeepSpeed types its ZeRO 0–3 checkpoints hold
(:data:`DEEPSPEED_CHECKPOINT_GLOBALS`, found by saving real ones; the unpickler only sets attributes
on these, it calls nothing). Anything else is refused with one line naming the file and the global.

:func:`check_checkpoints` runs the same test on the driver before Ray Train starts, by reading the
pickles' opcodes only (``torch.serialization.get_unsafe_globals_in_checkpoint``), so a planted
file is refused at once rather than after Ray Train's retries.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
from collections.abc import Iterator

import torch

from raydistill.errors import CheckpointError, PlanMismatchError, first_line
from raydistill.io import storage

__all__ = ["DEEPSPEED_CHECKPOINT_GLOBALS", "RESUMABLE_CHANGES", "TRAIN_CONFIG_FILE", "check_checkpoints",
           "check_resume_settings", "load_deepspeed_checkpoint", "weights_only_torch_load"]

log = logging.getLogger(__name__)

# What DeepSpeed 0.19's ZeRO 0-3 checkpoints (fp32 and bf16, with and without optimizer offload) pickle
# besides tensors and builtin containers: a loss scaler (plain attributes), the ZeRO stage enum and a
# namedtuple of offsets.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand[^\n]*|[\w ]*not an allowed[^\n]*")


def _allowed_globals() -> list:
    out = []
    for dotted in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, name = dotted.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):  # another DeepSpeed version: not needed there
            out.append(getattr(importlib.import_module(module), name))
    return out


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every ``torch.load`` call is a weights-only load (whatever ``weights_only`` its
    caller passes) that also accepts :data:`DEEPSPEED_CHECKPOINT_GLOBALS`."""
    original = torch.load
    allowed = _allowed_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)  # a weights-only load brings its own unpickler
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _refusal(where: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {storage.redact_url(where)} holds more than tensors and plain data ({why}), so it was not "
        "written by raydistill's training and is not loaded (unpickling it could run code); delete it, or "
        "resume from another storage_path or name")


def _why(err: BaseException) -> str:
    match = _UNSUPPORTED.search(str(err))
    if match and match.group(1):
        return f"the global {match.group(1)}"
    return match.group(0).strip() if match else first_line(err, 160)


def load_deepspeed_checkpoint(engine, directory: str, tag: str) -> None:
    """``engine.load_checkpoint(directory, tag=tag)`` with every file read weights-only; a file with
    anything else in it is one :class:`CheckpointError` and nothing of it is executed."""
    try:
        with weights_only_torch_load():
            engine.load_checkpoint(directory, tag=tag)
    except Exception as err:  # torch's pickle.UnpicklingError (no pickle import here: tests/unit/test_safety.py)
        if type(err).__name__ != "UnpicklingError":
            raise
        raise _refusal(directory, _why(err)) from None


def check_checkpoints(root: str) -> None:
    """Refuse, before any worker starts, checkpoint files under ``root`` (a run's Ray Train folder, local)
    whose pickles name a global a weights-only load would refuse. Reads opcodes only, runs nothing.

    Files that cannot be parsed (a checkpoint cut short by a killed upload, which Ray Train does not
    resume from) are left to the weights-only load in the workers. Object-store roots are left to it too.
    """
    fs, path = storage.filesystem(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local") or not fs.isdir(path):
        return
    for file in sorted(p for p in fs.find(path) if p.endswith(".pt")):
        try:  # DeepSpeed's globals compared by name: the driver need not import DeepSpeed
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - set(DEEPSPEED_CHECKPOINT_GLOBALS)
        except Exception as err:  # not a zip checkpoint, or truncated
            log.info("checkpoint file %s not checked on the driver (%s)", file, first_line(err))
            continue
        if unsafe:
            raise _refusal(file, f"the global{'s' if len(unsafe) > 1 else ''} {', '.join(sorted(unsafe)[:3])}")


# Settings a resumed run may change: how long it runs and how it reports, not what it learns from or how.
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "checkpoint_every", "threads_per_worker", "check_shards"})
TRAIN_CONFIG_FILE = "train_config.json"  # rank 0 writes it into every checkpoint (trainer.save_checkpoint)


def check_resume_settings(root: str, current: dict, defaults: dict) -> None:
    """Refuse, before any worker starts, to resume checkpoints under ``root`` written with other settings.

    Ray Train resumes whatever checkpoint the run's name and storage hold; without this a rerun with another
    learning rate, data or student would continue (or, if finished, merely re-export) the earlier run and
    label it with the new settings. ``current`` is the run's config as its checkpoints store it (JSON,
    credentials redacted); ``defaults`` fills keys that checkpoints written before a setting existed lack.
    """
    fs, path = storage.filesystem(root)
    if not fs.isdir(path):
        return
    for file in sorted(p for p in fs.find(path) if p.rsplit("/", 1)[-1] == TRAIN_CONFIG_FILE):
        try:
            stored = json.loads(fs.cat_file(file))
        except ValueError:  # a checkpoint cut short: Ray Train does not resume from it either
            continue
        changed = sorted(k for k in current.keys() - RESUMABLE_CHANGES
                         if stored.get(k, defaults.get(k)) != current[k])
        if changed:
            first = changed[0]
            more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
            raise PlanMismatchError(
                f"checkpoint {file.rsplit('/', 1)[0]} was written by a run with other settings: {first} "
                f"{stored.get(first, defaults.get(first))!r} there, {current[first]!r} now{more}; rerun with its "
                f"settings to resume it, or start over with another name or output (or delete {root})")

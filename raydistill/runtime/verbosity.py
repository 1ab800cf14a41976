"""How much the libraries under raydistill may print: nothing but errors unless ``--verbose``.

A person running ``raydistill demo`` wants the stages, the bars and the tables, not Ray worker
logs, DeepSpeed warnings or a "Loading weights" bar per model. The settings are environment
variables, so the same choice reaches every Ray worker (``cluster.worker_env``) and takes
effect there before the libraries are imported.
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["QUIET_ENV", "VERBOSE_ENV", "forwarded_env", "is_verbose", "quiet_library_loggers", "set_verbosity"]

VERBOSE_ENV = "RAYDISTILL_VERBOSE"
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' own warnings
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # and its "Loading weights" bars (read at import)
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning",
}


def set_verbosity(verbose: bool) -> None:
    """Call once, first thing in a command: quiet libraries (the default) or all their output."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    quiet_library_loggers()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_library_loggers() -> None:
    """Errors only from loggers that set their own level when created (DeepSpeed warns at import time,
    e.g. about picking the CPU accelerator): a filter on the logger object outlives that."""
    logger = logging.getLogger("DeepSpeed")
    if _errors_only not in logger.filters:
        logger.addFilter(_errors_only)


def is_verbose() -> bool:
    return bool(os.environ.get(VERBOSE_ENV))


def forwarded_env() -> dict[str, str]:
    """The verbosity settings of this process, for its Ray workers."""
    keys = (VERBOSE_ENV, *QUIET_ENV)
    return {key: os.environ[key] for key in keys if key in os.environ}

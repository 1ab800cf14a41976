"""Errors that the CLI turns into one clear line and a non-zero exit code.

Raise these (never a bare ``assert``) for anything a user can cause: bad config,
missing files, shard sets that do not match what they are asked to do.
"""


class RaydistillError(Exception):
    """Base class: the message alone must tell the user what is wrong and how to fix it."""


class ConfigError(RaydistillError):
    """A config file or command-line value is invalid."""


class ContractError(RaydistillError):
    """A shard set does not match what it is asked to serve (tokenizer, vocab, format)."""


class PlanMismatchError(ContractError):
    """An output directory already holds a capture of another corpus or other settings."""


class ShardError(RaydistillError):
    """A shard file is missing, truncated or corrupted."""


class ModelLoadError(RaydistillError):
    """A model or tokenizer directory cannot be loaded."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty): what a one-line error quotes."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:limit]


class CheckpointError(RaydistillError):
    """A checkpoint a resume would load holds something other than tensors and plain data."""

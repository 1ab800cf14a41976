"""Errors coming back from Ray, turned into the project's one-line errors.

Ray wraps a worker's exception in its own (``RayTaskError``, ``ActorDiedError``, Ray Train's
``TrainingFailedError``), often several layers deep and with remote tracebacks in the text.
The user needs the innermost cause's first line and what to do next; the full chain stays
attached as ``__cause__`` for ``--verbose`` logs.
"""

from __future__ import annotations

from raydistill.errors import RaydistillError

__all__ = ["error_from_ray", "innermost_cause"]


def innermost_cause(err: BaseException) -> BaseException:
    """The exception at the bottom of Ray's wrapping (``__cause__`` chain, ``RayTaskError.cause``)."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = getattr(err, "cause", None) or err.__cause__
        if not isinstance(nxt, BaseException):
            break
        err = nxt
    return err


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1].strip() if text else type(err).__name__


def error_from_ray(err: BaseException, doing: str, remedy: str) -> RaydistillError:
    """One line: ``<doing> failed: <cause>; <remedy>``. A RaydistillError raised inside a worker
    (bad input found there) keeps its own message, which already says what to fix."""
    cause = innermost_cause(err)
    if isinstance(cause, RaydistillError):
        return type(cause)(str(cause))
    name = type(cause).__name__
    line = _last_line(cause)
    what = line if line.startswith(name) else f"{name}: {line}"
    return RaydistillError(f"{doing} failed: {what}; {remedy}")

"""Errors coming back from Ray become one project error: the innermost cause's line and what to do."""

from __future__ import annotations

from raydistill.errors import ConfigError, RaydistillError
from raydistill.runtime.failures import error_from_ray, innermost_cause


class _RayStyleError(Exception):
    """Like ``RayTaskError``: the worker's exception in ``.cause``, a remote traceback in the text."""

    def __init__(self, cause: BaseException):
        super().__init__("ray::TeacherWorker.run_unit() (pid=1, ip=127.0.0.1)\n  File ...\n" + str(cause))
        self.cause = cause


def test_the_innermost_cause_is_found_through_both_kinds_of_wrapping():
    root = ValueError("bad width")
    try:
        raise RuntimeError("outer") from _RayStyleError(root)
    except RuntimeError as err:
        assert innermost_cause(err) is root


def test_one_line_with_the_cause_and_the_remedy():
    err = error_from_ray(_RayStyleError(IndexError("index 300 is out of bounds\nfor dimension 0")), "a capture unit",
                         "run the same command again to resume")
    assert isinstance(err, RaydistillError) and "\n" not in str(err)
    assert str(err) == ("a capture unit failed: IndexError: for dimension 0; run the same command again to resume")


def test_a_project_error_raised_in_a_worker_keeps_its_own_message_and_type():
    err = error_from_ray(_RayStyleError(ConfigError("k=5000 is larger than the vocabulary; choose k <= 384")),
                         "training run 'x'", "see the Ray logs")
    assert type(err) is ConfigError and str(err) == "k=5000 is larger than the vocabulary; choose k <= 384"


def test_a_cause_chain_that_loops_ends():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert innermost_cause(a) in (a, b)

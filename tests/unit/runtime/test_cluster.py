"""Joining Ray: which address is used (flag, then RAY_ADDRESS) and the one-line errors for wrong ones."""

from __future__ import annotations

import pytest
from support import free_port

JOB_TIMEOUT_S = 240
HEAD_START_TIMEOUT_S = 90
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "AWS_DEFAULT_REGION", "AWS_PROFILE")


def test_address_comes_from_the_flag_then_ray_address(monkeypatch):
    from raydistill.errors import RaydistillError
    from raydistill.runtime.cluster import checked_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert checked_address(None) is None  # no address anywhere: start a local Ray
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(RaydistillError, match=f"cannot connect to a Ray cluster at '{dead}'"):
        checked_address(None)
    assert checked_address("auto") == "auto"  # the flag wins over RAY_ADDRESS

def test_dashboard_url_as_address_is_explained():
    """`export RAY_ADDRESS=http://...:8265` is right for `ray job`, wrong for joining a cluster."""
    from raydistill.errors import RaydistillError
    from raydistill.runtime.cluster import check_reachable

    with pytest.raises(RaydistillError, match="is a dashboard / job submission address"):
        check_reachable("http://127.0.0.1:8265")
    check_reachable("auto")  # left to ray.init, which finds (or fails to find) a local cluster itself

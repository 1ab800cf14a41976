"""A name that is no local directory: refused in one line at once when it cannot be a reachable hub id.

Before issue #19, ``teacher: models/teacher`` run from the wrong directory was taken for a hub id and
cost about 55 s of hub retries before the error; these tests pin the fast paths and check that the
real hub path (a machine with network, or a cached copy) is left working.
"""

from __future__ import annotations

import socket
import time

import pytest

from raydistill.errors import ModelLoadError
from raydistill.models import tokenizers
from raydistill.models.tokenizers import check_local_or_hub, hub_unreachable


@pytest.fixture()
def fresh_hub_check():
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


def test_hub_ids_pass_untouched_when_the_hub_answers(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokenizers, "hub_unreachable", lambda: None)
    check_local_or_hub("HuggingFaceTB/SmolLM2-135M", "teacher")  # left to the hub client
    check_local_or_hub("gpt2", "teacher")
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="'models' exists but holds no 'teacher'"):  # a path, not a hub id
        check_local_or_hub("models/teacher", "teacher")


def test_without_a_hub_a_relative_name_fails_at_once_naming_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokenizers, "hub_unreachable", lambda: "no answer from huggingface.co:443")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        check_local_or_hub("models/teacher", "teacher")
    assert time.perf_counter() - t0 < 1.0
    message = str(err.value)
    assert message.startswith("teacher 'models/teacher' is not a local directory")
    assert str(tmp_path / "models" / "teacher") in message and "hub cannot be reached" in message


def test_the_hub_check_is_one_short_connect_and_honours_offline_mode(monkeypatch, fresh_hub_check):
    from huggingface_hub import constants

    attempts = []

    def no_network(address, timeout):
        attempts.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    assert "Network is unreachable" in hub_unreachable()
    assert hub_unreachable() is not None and len(attempts) == 1  # once per process
    assert attempts[0][1] <= 5
    hub_unreachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    hub_unreachable()
    assert attempts[-1][0] == ("proxy.internal", 3128)  # behind a proxy, the proxy is what must answer
    hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_a_cached_hub_model_loads_offline_instead_of_retrying(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokenizers, "hub_unreachable", lambda: "no answer")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: f"/cache/{repo}/{name}" if name == "config.json" else None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_local_or_hub("org/cached-model", "teacher")
    assert constants.HF_HUB_OFFLINE is True  # the hub client now reads the cache without asking
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # and so does the local Ray started from here

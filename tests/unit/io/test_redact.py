"""Credentials inside URLs are never printed or stored (io.storage.redact_url and the places that use it)."""

from __future__ import annotations

import logging

import pytest
from support import assert_one_error_line, run_cli, write_config

from raydistill import cli
from raydistill.config import CorpusConfig
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.io.corpus import describe
from raydistill.io.storage import redact_text, redact_url, redact_values


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:pa55@host:8443/c.jsonl", "https://***@host:8443/c.jsonl"),
    ("https://host/c.jsonl?token=abc&n=1#frag", "https://host/c.jsonl?token=***&n=1#frag"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=***"),
    ("https://acct.blob.core.windows.net/c/f?sv=2024&sig=abc%3D&se=2026", "https://acct.blob.core.windows.net/c/f?sv=2024&sig=***&se=2026"),
    ("s3://bucket/prefix?access_key=AK&secret=SK&versionId=3", "s3://bucket/prefix?access_key=***&secret=***&versionId=3"),
    ("hf://user:hf_token@datasets/x", "hf://***@datasets/x"),
    ("s3://bucket/shards", "s3://bucket/shards"),
    ("/data/shards", "/data/shards"),
    ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_every_url_in_a_text_or_a_stored_value_is_redacted():
    text = "corpus 'https://u:pw@h/a.jsonl' and http://h/b?token=t9 failed"
    assert redact_text(text) == "corpus 'https://***@h/a.jsonl' and http://h/b?token=*** failed"
    value = {"corpus": {"source": "https://u:pw@h/a.jsonl"}, "steps": 3, "sizes": ["s3://b/x?sig=zz"]}
    assert redact_values(value) == {"corpus": {"source": "https://***@h/a.jsonl"}, "steps": 3,
                                    "sizes": ["s3://b/x?sig=***"]}


def test_the_corpus_description_that_plans_and_manifests_store_has_no_credentials():
    cfg = CorpusConfig(source="https://u:pw@h/c.jsonl?token=t9", selection="s3://b/sel?sig=s1")
    assert "pw" not in describe(cfg) and "t9" not in describe(cfg) and "s1" not in describe(cfg)
    assert describe(cfg).startswith("https://***@h/c.jsonl?token=***:text/train")


def test_storage_errors_quote_urls_without_their_credentials():
    with pytest.raises(ConfigError) as err:
        storage.filesystem("nosuchfs://user:pw-42@bucket/shards")
    assert "pw-42" not in str(err.value) and "nosuchfs://***@bucket/shards" in str(err.value)


def test_the_cli_error_line_and_log_lines_are_redacted(capsys, tmp_path):
    cfg = write_config(tmp_path, teacher="t", output="nosuchfs://key:pw-42@bucket/out")
    code, out, err = run_cli(capsys, "capture", cfg)
    assert_one_error_line(code, err, "nosuchfs://***@bucket/out")
    assert "pw-42" not in out + err
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "reading %s", ("https://u:pw-42@h/c",), None)
    assert cli._redacted(record) and record.getMessage() == "reading https://***@h/c"

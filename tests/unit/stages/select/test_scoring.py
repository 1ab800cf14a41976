"""The selection's math against slow references: summed losses of a padded batch, the ranking's rules, the
repeated-line share, config checks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydistill.config import SelectConfig
from raydistill.errors import ConfigError
from raydistill.models.loading import load_causal_lm
from raydistill.models.windows import make_batch
from raydistill.stages.select.ranking import ranked_scores
from raydistill.stages.select.repetition import GOPHER_MAX_REPEATED_LINE_CHARS, repeated_line_chars
from raydistill.stages.select.worker import summed_nll

DOCS, PER_UNIT, MAX_LENGTH = 30, 3, 48


def test_summed_nll_of_a_padded_batch_matches_one_row_at_a_time(tiny_teacher):
    model = load_causal_lm(tiny_teacher).eval()
    windows = [[5, 9, 12, 40, 7, 3], [8, 2], [30], [11, 12, 13, 14]]
    batch = make_batch(windows, [0, 1, 2, 3], pad_id=0)
    got = summed_nll(model, batch.input_ids, batch.attention_mask)
    for r, window in enumerate(windows):
        want = 0.0
        if len(window) >= 2:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), dim=-1)
            want = -sum(float(logp[t, window[t + 1]]) for t in range(len(window) - 1))
        assert got[r] == pytest.approx(want, rel=1e-5, abs=1e-5)

@pytest.mark.parametrize("max_repeated", [None, 0.2])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.999, 1.0])
def test_ranking_matches_a_slow_sort(fraction, max_repeated):
    rng = np.random.default_rng(3)
    n = 41
    tokens = rng.integers(0, 5, n)  # zeros: documents without a predicted token
    teacher = rng.integers(0, 4, n).astype(float) * tokens  # few values: many exact ties
    reference = rng.integers(0, 4, n).astype(float) * tokens
    ids = [f"{rng.integers(0, 16**8):08x}" for _ in range(n)]
    repeated = rng.choice([0.0, 0.1, 0.2, 0.3, 0.9], n)
    table = ranked_scores(pa.table({"doc_id": ids, "tokens": tokens, "teacher_loss": teacher,
                                    "reference_loss": reference, "repeated_line_chars": repeated}),
                          fraction, max_repeated)
    scores = [(r - t) / k if k else math.nan for r, t, k in zip(reference, teacher, tokens, strict=True)]
    dropped = [max_repeated is not None and x > max_repeated for x in repeated]
    order = sorted(range(n), key=lambda i: (math.isnan(scores[i]), dropped[i],
                                            -(0 if math.isnan(scores[i]) else scores[i]), ids[i]))
    keep = max(1, min(n, round(fraction * n)))
    assert table.column("rank").to_pylist() == [order.index(i) for i in range(n)]
    assert table.column("repetitive").to_pylist() == dropped
    assert table.column("kept").to_pylist() == [order.index(i) < keep and not dropped[i] for i in range(n)]
    np.testing.assert_array_equal(np.isnan(table.column("score").to_numpy()), tokens == 0)

def test_select_config_refuses_a_refined_file_name():
    """The refined corpus is a folder of parts written by the workers, so a file name is a mistake."""
    with pytest.raises(ValueError, match=r"names a file.*name a folder, e.g. s3://b/refined/"):
        SelectConfig(teacher="t", reference="r", output="o", refined="s3://b/refined.parquet")
    assert SelectConfig(teacher="t", reference="r", output="o", refined="s3://b/refined").refined == "s3://b/refined"


def test_ranking_refuses_a_threshold_that_drops_every_document():
    table = pa.table({"doc_id": ["a", "b"], "tokens": [3, 4], "teacher_loss": [1.0, 2.0],
                      "reference_loss": [2.0, 3.0], "repeated_line_chars": [0.5, 0.6]})
    with pytest.raises(ConfigError, match=r"max_repeated_lines=0.4 leaves no document.*holds 0.50"):
        ranked_scores(table, 0.5, 0.4)


def slow_repeated_share(text: str) -> float:
    """The share counted the obvious way: every non-blank line after its first occurrence."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    repeated = sum(len(line) for i, line in enumerate(lines) if line in lines[:i])
    return repeated / sum(map(len, lines)) if lines else 0.0


@pytest.mark.parametrize("text", [
    "", "\n\n  \n", "one line", "a\nb\na\n", "Accept cookies\n\nHome | About\nAccept cookies\n  Accept cookies  \n",
    "x = 1\nprint(x)\nx = 1\nprint(x)\nprint(x)\n", "para one.\n\npara two.\n\npara one.",
])
def test_repeated_line_share_matches_a_slow_count(text):
    assert repeated_line_chars(text) == pytest.approx(slow_repeated_share(text))


def test_boilerplate_is_repetitive_and_prose_is_not():
    prose = "Difference sampling keeps documents a teacher knows better than a reference.\nIt favours copies.\n"
    boiler = "Home | Docs | Blog\nAccept all cookies\n" * 10 + "Page 3\n"
    assert repeated_line_chars(prose) == 0.0
    assert repeated_line_chars(boiler) > 0.85 > GOPHER_MAX_REPEATED_LINE_CHARS

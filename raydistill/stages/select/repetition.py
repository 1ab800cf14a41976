"""Repeated lines per document: the check difference sampling needs beside it.

A large teacher predicts text that repeats earlier lines of its document (it copies from context); a
small reference does not. So (reference − teacher) loss per token is largest on boilerplate repeated
line after line, and difference sampling keeps it (docs/results.md: on the noisy pool every such
document scored above the cut). Gopher's quality rules (Rae et al. 2021) drop a document when lines
repeating an earlier line hold more than 20% of its characters. ``select`` stores that share for every
document and ``max_repeated_lines`` applies it when ranking, so another threshold re-ranks without
running a model.
"""

from __future__ import annotations

__all__ = ["GOPHER_MAX_REPEATED_LINE_CHARS", "repeated_line_chars"]

GOPHER_MAX_REPEATED_LINE_CHARS = 0.2  # Gopher's published threshold for this share


def repeated_line_chars(text: str) -> float:
    """Share of the characters of ``text``'s non-blank lines (whitespace stripped) that sit in lines
    repeating an earlier line of the same text; 0.0 for a text without any."""
    seen: set[str] = set()
    repeated = total = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            repeated += len(line)
        else:
            seen.add(line)
    return repeated / total if total else 0.0

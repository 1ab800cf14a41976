"""A noisy mixture of the embedded corpus: where difference-based data selection should help.

Usage: python tools/noisy_corpus.py OUT.jsonl [--noise-fraction 0.3] [--seed 0] [--max-documents N]

The train split of the embedded default corpus (clean Python documentation) mixed with low-quality
documents, so that they are ``noise_fraction`` of the mixture's documents, of three kinds in turn:
- ``shuffled``: a clean document's words in a random order (the unigram statistics of real text, no syntax);
- ``boilerplate``: a few navigation / legal / cookie lines repeated, with a page number, to a clean length;
- ``random``: random letters, digits and punctuation in word-like runs.
Each noise document takes its length from a clean one, so the mixture's length distribution does not
give it away. Deterministic for a seed: the same file on every machine (ids are content hashes). Each line
is ``{"id", "text", "noise"}`` with ``noise`` the kind or null, so a selection can be scored on how much
noise it kept. Last line of output: one JSON object (documents and characters by kind).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections import Counter
from pathlib import Path

from raydistill.config import CorpusConfig
from raydistill.io import storage
from raydistill.io.corpus import read_documents
from raydistill.io.documents import document_id

NOISE_KINDS = ("shuffled", "boilerplate", "random")
BOILERPLATE = (
    "Home | About | Contact | Privacy Policy | Terms of Use",
    "Copyright (c) All rights reserved. Unauthorized reproduction is prohibited.",
    "This site uses cookies to improve your experience. Click here to accept.",
    "Subscribe to our newsletter for the latest updates and exclusive offers!",
    "Share this page: Facebook Twitter LinkedIn Email Print",
)
RANDOM_ALPHABET = string.ascii_letters + string.digits + string.punctuation


def shuffled_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines)


def boilerplate(length: int, rng: random.Random) -> str:
    block = rng.sample(BOILERPLATE, 3)
    lines, page = [], 1
    while sum(len(line) + 1 for line in lines) < length:
        lines.extend(block)
        lines.append(f"Page {page}")
        page += 1
    return "\n".join(lines)


def random_characters(length: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < length:
        word = "".join(rng.choice(RANDOM_ALPHABET) for _ in range(rng.randint(1, 10)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def noise_document(kind: str, source: str, rng: random.Random) -> str:
    if kind == "shuffled":
        return shuffled_words(source, rng)
    if kind == "boilerplate":
        return boilerplate(len(source), rng)
    return random_characters(len(source), rng)


def noisy_mixture(clean: list[str], noise_fraction: float = 0.3, seed: int = 0) -> list[dict]:
    """The clean texts and ``round(n · f / (1 − f))`` noise documents, in a seeded random order."""
    if not 0 <= noise_fraction < 1:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    rng = random.Random(seed)
    n_noise = round(len(clean) * noise_fraction / (1 - noise_fraction))
    rows = [{"text": text, "noise": None} for text in clean]
    seen = set(clean)
    for i in range(n_noise):
        kind = NOISE_KINDS[i % len(NOISE_KINDS)]
        text = noise_document(kind, rng.choice(clean), rng)
        while text in seen:  # ids are content hashes: two equal documents would be one
            text += f"\n{rng.randint(0, 10**9)}"
        seen.add(text)
        rows.append({"text": text, "noise": kind})
    rng.shuffle(rows)
    return [{"id": document_id(r["text"]), **r} for r in rows]


def write_mixture(path: str, rows: list[dict]) -> None:
    storage.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("--noise-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=None, help="clean documents to start from")
    args = p.parse_args()
    clean = [d.text for d in read_documents(CorpusConfig(split="train", max_documents=args.max_documents))]
    rows = noisy_mixture(clean, args.noise_fraction, args.seed)
    write_mixture(str(Path(args.output).resolve()), rows)
    kinds = Counter(r["noise"] or "clean" for r in rows)
    chars = Counter()
    for r in rows:
        chars[r["noise"] or "clean"] += len(r["text"])
    print(f"{args.output}: {len(rows)} documents ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    print(json.dumps({"output": args.output, "documents": len(rows), "documents_by_kind": dict(kinds),
                      "characters_by_kind": dict(chars), "noise_fraction": args.noise_fraction, "seed": args.seed}))


if __name__ == "__main__":
    main()

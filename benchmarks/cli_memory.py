"""Peak memory of ``tembed encode`` at two corpus sizes: streaming keeps it flat as the corpus grows.

Builds JSON Lines corpora from real text (the InsuranceQA answers, repeated with distinct ids), runs
``python -m tembed.cli encode`` on each as a subprocess and reports the child's peak RSS (``os.wait4``), the RSS
sampled along the run, the time and the output size.

    .venv/bin/python benchmarks/cli_memory.py                      # 20,000 and 100,000 lines, --max-length 32
    .venv/bin/python benchmarks/cli_memory.py --sizes 2000 10000 --max-length 16
    .venv/bin/python benchmarks/cli_memory.py --sizes 4096 --max-length 256 --model M3_FOLDER --colbert
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from realdata import insuranceqa_answers  # noqa: E402


def write_corpus(path: str, lines: int) -> None:
    answers = insuranceqa_answers()
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(lines):
            handle.write(json.dumps({"id": f"ans-{index}", "text": answers[index % len(answers)]}) + "\n")


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(source: str, output: str, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "tembed.cli", "encode", source, "-o", output, "--quiet", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    samples = []
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        samples.append((time.perf_counter() - started, rss_kib(process.pid)))
        time.sleep(0.5)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with {process.returncode}")
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "samples": samples,
        "output_mb": os.path.getsize(output) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: tembed's default model")
    parser.add_argument("--colbert", action="store_true", help="write dense and ColBERT vectors (a BGE-M3 model)")
    args = parser.parse_args()
    extra = ["--max-length", str(args.max_length), "--device", "cpu"]
    if args.colbert:
        extra += ["--dense", "--colbert"]
    if args.model:
        extra += ["--model", args.model]
    with tempfile.TemporaryDirectory() as folder:
        for lines in args.sizes:
            source = os.path.join(folder, f"corpus-{lines}.jsonl")
            write_corpus(source, lines)
            result = run(source, os.path.join(folder, f"out-{lines}.parquet"), extra)
            samples = result["samples"]
            quarters = [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in (1, 2, 3, 4)] if samples else []
            along = ", ".join(f"{rss / 1024:.0f} MiB at {t:.0f} s" for t, rss in quarters)
            print(
                f"{lines:>9,} lines ({os.path.getsize(source) / 1e6:.1f} MB jsonl): peak RSS "
                f"{result['peak_rss_mib']:.0f} MiB, {result['seconds']:.0f} s "
                f"({lines / result['seconds']:.0f} texts/s incl. start-up), output {result['output_mb']:.1f} MB; "
                f"RSS along the run: {along}",
                flush=True,
            )


if __name__ == "__main__":
    main()

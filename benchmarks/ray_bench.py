"""Benchmark: ``tembed encode --engine ray`` against the single-machine ``tembed encode`` on the same corpus.

The corpus: 20,000 real texts (the STS-B sentences of every split, then InsuranceQA answers), as JSON Lines. Each
variant is the real command in its own process, run alternately (best of ``--repeats``), so drift on a shared
machine hits all of them. From each command's own summary line:

* the encode time after start-up: the local job's encode time (model loaded), the Ray job's time from the first
  actor ready to the last shard written;
* the start-up: the command's wall time less that (imports, Ray start, model loads, the final merge).

The overhead of the Ray engine is its encode time over the local job's, less 1 (target: under 15%).

    .venv/bin/python benchmarks/ray_bench.py --out build/ray_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from concurrency import cpu_description  # benchmarks/concurrency.py

from realdata import insuranceqa_answers, sts_b

LOCAL = re.compile(r"encoded ([\d,]+) texts in ([\d.]+) s \(\+([\d.]+) s loading")
RAY = re.compile(
    r"encoded ([\d,]+) texts on (\d+) Ray actors .*?: ([\d.]+) s after start-up.*?\+([\d.]+) s starting Ray"
)


def corpus(path: str, count: int) -> None:
    texts = []
    for split in ("train", "dev", "test"):
        for a, b, _ in sts_b(split):
            texts += [a, b]
    texts = (texts + insuranceqa_answers())[:count]
    with open(path, "w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def run(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", nargs="*", help="run only the variants whose name contains one of these")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tembed-ray-bench-")
    source = os.path.join(work, "corpus.jsonl")
    corpus(source, args.texts)
    tembed = [sys.executable, "-m", "tembed.cli", "encode", source, "--backend", args.backend]
    variants = {
        "local (1 process, 2 threads)": ["-o", os.path.join(work, "local.parquet")],
        "ray, 2 actors x 1 CPU": ["-o", os.path.join(work, "ray2"), "--engine", "ray", "--actors", "2"],
        "ray, 1 actor x 2 CPUs": [
            "-o",
            os.path.join(work, "ray1"),
            "--engine",
            "ray",
            "--actors",
            "1",
            "--cpus-per-actor",
            "2",
        ],
    }
    if args.only:
        variants = {n: v for n, v in variants.items() if n.startswith("local") or any(o in n for o in args.only)}
    print(f"CPU: {cpu_description()}; corpus: {args.texts:,} texts; backend {args.backend}", flush=True)
    run([*tembed, *variants["local (1 process, 2 threads)"]])  # warm the model's export cache
    best: dict[str, dict[str, float]] = {}
    for repeat in range(args.repeats):
        for name, extra in variants.items():
            output = extra[1]
            shutil.rmtree(output, ignore_errors=True)
            if os.path.isfile(output):
                os.remove(output)
            wall, stderr = run([*tembed, *extra])
            row = parse(name, wall, stderr)
            print(f"  run {repeat + 1} {name}: {row}", flush=True)
            if name not in best or row["encode_s"] < best[name]["encode_s"]:
                best[name] = row
    base = best["local (1 process, 2 threads)"]
    print("\n| variant | encode after start-up (s) | texts/s | vs local | start-up (s) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, row in best.items():
        ratio = row["encode_s"] / base["encode_s"]
        print(
            f"| {name} | {row['encode_s']:.1f} | {args.texts / row['encode_s']:,.0f} | {ratio:.2f}x "
            f"({(ratio - 1) * 100:+.0f}%) | {row['startup_s']:.1f} | {row['wall_s']:.1f} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"cpu": cpu_description(), "texts": args.texts, "results": best}, handle, indent=1)
    shutil.rmtree(work, ignore_errors=True)


def parse(name: str, wall: float, summary: str) -> dict[str, float]:
    if name.startswith("local"):
        match = LOCAL.search(summary)
        if not match:
            raise SystemExit(f"no summary from {name}: {summary[-500:]}")
        encode = float(match.group(2))
        return {"encode_s": encode, "startup_s": wall - encode, "wall_s": wall}
    match = RAY.search(summary)
    if not match:
        raise SystemExit(f"no summary from {name}: {summary[-500:]}")
    encode = float(match.group(3))
    return {"encode_s": encode, "startup_s": wall - encode, "ray_start_s": float(match.group(4)), "wall_s": wall}


if __name__ == "__main__":
    main()

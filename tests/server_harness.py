"""Starting tembed servers on 127.0.0.1 for tests: in this process (uvicorn in a thread, for speed and for
fault injection) or as a ``tembed serve`` subprocess (for signals, worker pools and the real command line)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yields the base URL; stops it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post(
    base: str, path: str, body: Any, *, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], Any]:
    """POST JSON with the standard library (no client of ours); returns ``(status, headers, parsed body)``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method="POST", headers={"content-type": "application/json", **(headers or {})}
    )
    return _open(request, timeout)


def get(
    base: str, path: str, *, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], Any]:
    return _open(urllib.request.Request(base + path, headers=headers or {}), timeout)


def _open(request: urllib.request.Request, timeout: float) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, dict(error.headers), error.read()
    headers = {key.lower(): value for key, value in headers.items()}
    parsed = json.loads(raw) if headers.get("content-type", "").startswith("application/json") else raw
    return status, headers, parsed


class ServerProcess:
    """``tembed serve MODEL --port P ...`` as a subprocess, in its own process group."""

    def __init__(self, model: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        command = [sys.executable, "-m", "tembed.cli", "serve", model, "--host", HOST, "--port", str(self.port), *args]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.process = subprocess.Popen(
            command, env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, text=True
        )

    def output(self) -> str:
        """What the server printed so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tembed serve exited with {self.process.returncode}: {self.output()[-3000:]}")
            with contextlib.suppress(OSError):
                if get(self.base, "/health", timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("tembed serve did not become healthy in time")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the whole process group (only what this test started)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything left in the group (pool workers)
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def overload(base: str, total: int, concurrency: int, deadline: float) -> collections.Counter:
    """The bounded overload recipe of server-api.md section 6: ``total`` requests of 1-16 texts, ``concurrency`` at
    once, within ``deadline`` seconds; counts statuses, ``unexpected`` ones and transport errors (a 429 or 503
    without Retry-After counts as unexpected)."""
    counts: collections.Counter = collections.Counter()
    gate, stop = asyncio.Semaphore(concurrency), time.monotonic() + deadline
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def one(i: int) -> None:
            if time.monotonic() > stop:
                counts["skipped"] += 1
                return
            body = {"model": "m", "input": [f"doc {i} " + "word " * (i % 120)] * (1 + i % 16)}
            async with gate:
                try:
                    response = await c.post("/v1/embeddings", json=body)
                except httpx.TransportError:
                    counts["transport_error"] += 1
                    return
                counts[response.status_code] += 1
                if response.status_code == 200:
                    assert len(response.json()["data"]) == len(body["input"])
                elif response.status_code in (429, 503):
                    if "retry-after" not in response.headers or "error" not in response.json():
                        counts["unexpected"] += 1
                else:
                    counts["unexpected"] += 1

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), deadline + 30)
    return counts

"""A worker process: started by the parent, it builds a :class:`~tembed.local_encoder.LocalEncoder` and answers
encode tasks until told to stop or until the parent disappears.

This module imports :mod:`tembed.local_encoder` in the child, never :mod:`tembed.embedder` (which may itself
start a pool).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import threading
from typing import TYPE_CHECKING, Any

from tembed.pool.errors import pack_exception
from tembed.pool.transport import (
    POLL_SECONDS,
    ChunkDone,
    ChunkFailed,
    Hello,
    Ready,
    StartError,
    Task,
    WorkerHandle,
    WorkerMessage,
    dumps,
)
from tembed.settings import EmbedderConfig

if TYPE_CHECKING:
    from tembed.encoder import Encoder


# ------------------------------------------------------------------------------------------ the parent's side
def create_worker(
    ctx: Any,
    index: int,
    device: str,
    config: EmbedderConfig,
    threads: int | None,
    stop_event: Any,
    queue_size: int,
) -> WorkerHandle:
    """The handle of a new worker process, not yet started (call its ``start()``; then wait for its
    :class:`Ready`: the worker loads the model in the background).

    Args:
        ctx: the multiprocessing context (spawn or forkserver).
        index: the worker's number, for messages and the process name.
        device: where it runs (``"cpu"``, ``"cuda:1"``).
        config: the embedder options it builds its encoder from.
        threads: torch threads in the worker; None: torch's default.
        stop_event: a multiprocessing Event shared by all workers: set, they exit.
        queue_size: the most tasks queued for it.
    """
    tasks = ctx.Queue(maxsize=queue_size)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=worker_main,
        name=f"tembed-worker-{index}-{device}",
        args=(config, device, threads, tasks, send, stop_event),
        daemon=True,
    )
    return WorkerHandle(index, device, process, tasks, receive, send)


# ------------------------------------------------------------------------------------------ the worker's side
def worker_main(
    config: EmbedderConfig, device: str, threads: int | None, tasks: Any, results: Any, stop_event: Any
) -> None:
    """The worker process: load the model, then answer tasks until told to stop or the parent disappears."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; no tracebacks from here
    parent = os.getppid()

    def send(message: WorkerMessage) -> None:
        results.send_bytes(dumps(message))

    try:
        send(Hello(os.getpid()))
        prepare_process(threads)
        from tembed.local_encoder import LocalEncoder

        encoder = LocalEncoder(config, device)
    except Exception as error:
        with contextlib.suppress(Exception):
            send(StartError(pack_exception(error)))
        return
    try:
        send(Ready(encoder.settings))
        _serve(encoder, tasks, results, stop_event, parent)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the parent closed its end or died
    finally:
        with contextlib.suppress(Exception):
            encoder.close()


def prepare_process(threads: int | None) -> None:
    """Thread limits and a process-local tqdm lock, before the model is loaded."""
    # tqdm otherwise creates a multiprocessing lock here, registered with the resource tracker the whole pool
    # shares; a worker killed by a signal would then leave a "leaked semaphore" warning at exit.
    import tqdm.std

    tqdm.std.tqdm.set_lock(threading.RLock())
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


def _serve(encoder: Encoder, tasks: Any, results: Any, stop_event: Any, parent: int) -> None:
    """Answer :class:`Task` messages until a :class:`Stop`, the stop event, or the parent's death."""
    while not stop_event.is_set():
        try:
            payload = tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:
                return  # the parent is gone
            continue
        task = pickle.loads(payload)
        if not isinstance(task, Task) or stop_event.is_set():
            return  # Stop, or shutting down
        results.send_bytes(_answer(encoder, task))


def _answer(encoder: Encoder, task: Task) -> bytes:
    """The pickled :class:`ChunkDone` of ``task``, or :class:`ChunkFailed` if encoding (or pickling) raised."""
    try:
        outputs = encoder.encode(task.texts, task.options)
        return dumps(ChunkDone(task.call_id, task.chunk_id, outputs))
    except Exception as error:
        return dumps(ChunkFailed(task.call_id, task.chunk_id, pack_exception(error)))

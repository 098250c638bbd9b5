"""Checks a pool makes in the caller before it starts any process.

Everything that can be checked here raises here, in the caller, not once per worker: the pool's options, an
unknown embedder option, an unresolvable model, and a pool created where it cannot start processes.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from typing import Any

from tembed.pool.errors import GUARD_HINT
from tembed.settings import EmbedderConfig
from tembed.types import check_positive

START_METHODS = ("spawn", "forkserver")


def check_pool_options(
    start_method: str, chunk_size: int, threads_per_worker: int | None, max_pending_chunks: int | None
) -> None:
    """Refuse a pool in a process that cannot start one, and invalid pool options.

    Raises:
        RuntimeError: called while a spawned process re-imports the main script (no ``__main__`` guard), or in
            a daemonic process.
        ValueError: ``start_method`` is not spawn / forkserver, or a count is not a positive int.
    """
    refuse_inside_bootstrap()
    if start_method not in START_METHODS:
        raise ValueError(
            f"start_method must be 'spawn' or 'forkserver', got {start_method!r} "
            "('fork' deadlocks torch thread pools and CUDA in the children)"
        )
    check_positive("chunk_size", chunk_size)
    if threads_per_worker is not None:
        check_positive("threads_per_worker", threads_per_worker)
    if max_pending_chunks is not None:
        check_positive("max_pending_chunks", max_pending_chunks)


def refuse_inside_bootstrap() -> None:
    """Raise RuntimeError when this process cannot start workers: it is itself a worker being bootstrapped (a
    script without a ``__main__`` guard), or a daemonic process."""
    process = multiprocessing.current_process()
    if getattr(process, "_inheriting", False):
        raise RuntimeError(
            "an EmbedderPool is being created while a worker process re-imports the main script. " + GUARD_HINT
        )
    if process.daemon:
        raise RuntimeError(
            f"an EmbedderPool cannot be created in daemonic process {process.name!r} (daemonic processes may not "
            "have children); create it in the main process"
        )


def build_config(config: EmbedderConfig | str | os.PathLike[str], kwargs: dict[str, Any]) -> EmbedderConfig:
    """The workers' config: ``config`` with ``kwargs`` applied, or ``EmbedderConfig(model=config, **kwargs)``.

    Raises:
        TypeError: ``device=`` among ``kwargs`` (devices are the pool's argument), or an unknown option.
        ValueError: an invalid option value (EmbedderConfig's checks).
    """
    if "device" in kwargs:
        raise TypeError("give the devices as EmbedderPool(config, devices), not device=")
    try:
        if isinstance(config, EmbedderConfig):
            return config.replace(**kwargs) if kwargs else config
        return EmbedderConfig(model=os.fspath(config) if isinstance(config, os.PathLike) else config, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise TypeError(f"EmbedderPool: {error} (keyword arguments are EmbedderConfig options)") from None


def check_model_resolves(model: str, cache_dir: str | None = None) -> None:
    """Resolve (and, when online, download) the model once in the parent, so N workers do not race for it."""
    from tembed.models.resolve import resolve_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers warn about the model themselves
        resolve_model(model, cache_dir=cache_dir)

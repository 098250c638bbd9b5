"""Ray itself: connecting (:func:`ray_session`), the Ray Data settings tembed relies on (:func:`configure_data`),
the CPU / GPU budget check that turns Ray Data's silent hang into an error (:func:`check_resources`), and
:func:`encode_dataset`, which puts :class:`~tembed.ray.batch.RayEncoder` on a ``ray.data.Dataset``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tembed.settings import EmbedderConfig, EncodeOptions

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "ResourceError",
    "check_resources",
    "configure_data",
    "default_actors",
    "encode_dataset",
    "ray_session",
]

DEFAULT_STALL_TIMEOUT = 600.0
"""Seconds without any output before a Ray Data job is stopped with an error (Ray's own default is 1800)."""


class ResourceError(ValueError):
    """The actors asked for do not fit the cluster: Ray Data would wait for resources forever."""


@contextlib.contextmanager
def ray_session(address: str = "local", num_cpus: int | None = None, **init_options: Any) -> Iterator[bool]:
    """Connect to Ray for the block and disconnect after it. Yields whether this call started the connection.

    ``address``: ``"local"`` starts a private instance that ends with the block (never joins a cluster by
    accident), ``"auto"`` joins the cluster this machine belongs to (``ray start``), ``"HOST:PORT"`` a given one.
    ``num_cpus`` (local only) caps the CPUs the instance offers. When Ray is already initialized (a notebook, a
    test) that session is used as is and left running. Ray's usage statistics are turned off.
    """
    import logging

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield False
        return
    # Ray's own chatter (the token-auth notice, Data's execution plan, ray-project/ray#53727's harmless C++ error
    # line) stays out of the job's output; failures still arrive as exceptions. Set these variables to see it.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # tembed says each failure in one line
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    options.update(init_options)
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, **options)
    else:
        ray.init(address=address, **options)
    try:
        yield True
    finally:
        ray.shutdown()


def configure_data(
    stall_timeout: float = DEFAULT_STALL_TIMEOUT, preserve_order: bool | None = None, context: Any = None
) -> None:
    """Set a Ray Data context (default: the current one; a dataset keeps a copy of the context it was made
    with, ``dataset.context``): original exception types from ``map_batches`` (not only Ray's
    wrapper), a job with no output for ``stall_timeout`` seconds stops with ``ExecutionTimeoutError`` instead of
    hanging, no Ray progress bars, no silently dropped blocks (``max_errored_blocks=0``), and ``preserve_order``
    when given (None: left as it is)."""
    import ray.data

    context = context or ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    context.execution_no_progress_timeout_s = stall_timeout
    context.enable_progress_bars = False
    context.max_errored_blocks = 0
    if preserve_order is not None:
        context.execution_options.preserve_order = preserve_order


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def default_actors(cpus_per_actor: float, gpus_per_actor: float = 0.0, reserve_cpus: float = 0.0) -> int:
    """As many actors as fit the cluster's nodes (each actor on one node), leaving ``reserve_cpus`` free; at
    least 1."""
    return max(1, _placeable(cpus_per_actor, gpus_per_actor, reserve_cpus))


def _placeable(cpus_per_actor: float, gpus_per_actor: float, reserve_cpus: float = 0.0) -> int:
    fits = 0
    for resources in _node_resources():
        cpus = math.floor(resources.get("CPU", 0.0) / cpus_per_actor) if cpus_per_actor > 0 else 1 << 30
        gpus = math.floor(resources.get("GPU", 0.0) / gpus_per_actor) if gpus_per_actor > 0 else 1 << 30
        fits += min(cpus, gpus)
    total = sum(r.get("CPU", 0.0) for r in _node_resources())
    if reserve_cpus and cpus_per_actor > 0:
        fits = min(fits, math.floor((total - reserve_cpus) / cpus_per_actor))
    return fits


def check_resources(actors: int, cpus_per_actor: float, gpus_per_actor: float = 0.0, reserve_cpus: float = 0.0) -> None:
    """Refuse, with :class:`ResourceError`, actors that cannot all run at once on the cluster's nodes with
    ``reserve_cpus`` CPUs left for Ray Data's own read / write tasks: Ray Data would otherwise wait without end
    (ray-project/ray#44687: actors holding every CPU starve the read task; a 0.5-CPU actor per 1-CPU node leaves
    no node a whole CPU)."""
    nodes = _node_resources()
    total_cpus = sum(r.get("CPU", 0.0) for r in nodes)
    total_gpus = sum(r.get("GPU", 0.0) for r in nodes)
    wanted = actors * cpus_per_actor + reserve_cpus
    advice = "use fewer actors (--actors) or fewer CPUs per actor (--cpus-per-actor)"
    if wanted > total_cpus + 1e-9:
        reserve = f" + {reserve_cpus:g} for Ray Data's read / write tasks" if reserve_cpus else ""
        raise ResourceError(
            f"{actors} actors x {cpus_per_actor:g} CPUs{reserve} = {wanted:g} CPUs, but the Ray cluster has "
            f"{total_cpus:g}: the job would wait for CPUs forever; {advice}"
        )
    if gpus_per_actor and actors * gpus_per_actor > total_gpus + 1e-9:
        raise ResourceError(
            f"{actors} actors x {gpus_per_actor:g} GPUs = {actors * gpus_per_actor:g} GPUs, but the Ray cluster has "
            f"{total_gpus:g}; use fewer actors or --gpus-per-actor"
        )
    placeable = _placeable(cpus_per_actor, gpus_per_actor)
    if placeable < actors:
        raise ResourceError(
            f"{actors} actors of {cpus_per_actor:g} CPUs / {gpus_per_actor:g} GPUs do not fit the nodes "
            f"(at most {placeable} fit, an actor cannot span nodes); {advice}"
        )


def encode_dataset(
    dataset: ray.data.Dataset,
    config: EmbedderConfig | str,
    options: EncodeOptions | None = None,
    *,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int | None = None,
    text_column: str = "text",
    id_column: str | None = "id",
    reserve_cpus: float = 1.0,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
) -> ray.data.Dataset:
    """``dataset`` mapped by :class:`~tembed.ray.batch.RayEncoder` on a pool of actors (lazy, like any
    ``map_batches``): rows of the single-machine Parquet schema (id, dense, sparse_ids / sparse_weights, colbert).

    Args:
        dataset: rows with ``text_column`` (and ``id_column``).
        config: the model configuration, or a model name. ``options``: role, outputs, max length.
        actors: the pool's size; None: as many as fit the cluster (:func:`default_actors`).
        cpus_per_actor: CPUs per actor (default 1), also its torch / OpenVINO threads (rounded up).
        gpus_per_actor: GPUs per actor (default 0: the CPU); with GPUs the model runs on ``cuda``.
        batch_size: rows per call; None: 256 on GPUs, 512 on CPUs (the encoder cuts them by tokens inside).
        reserve_cpus: CPUs left for the dataset's read / write tasks (default 1).
        stall_timeout: seconds without output before the job stops with an error (see :func:`configure_data`,
            which this calls on ``dataset.context``: an actor's exception then reaches the caller with
            its own type, the message naming the record's id).

    Raises:
        ResourceError: the actors do not fit the cluster (checked now, not after an endless wait).
    """
    import ray.data

    if isinstance(config, str):
        config = EmbedderConfig(model=config)
    if actors is None:
        actors = default_actors(cpus_per_actor, gpus_per_actor, reserve_cpus)
    check_resources(actors, cpus_per_actor, gpus_per_actor, reserve_cpus)
    configure_data(stall_timeout, context=dataset.context)
    from tembed.ray.batch import RayEncoder

    kwargs: dict[str, Any] = {
        "config": config,
        "options": options or EncodeOptions(),
        "text_column": text_column,
        "id_column": id_column,
        "device": "cuda" if gpus_per_actor else "cpu",
        "threads": max(1, math.ceil(cpus_per_actor)),
    }
    return dataset.map_batches(
        RayEncoder,
        fn_constructor_kwargs=kwargs,
        batch_format="pyarrow",
        batch_size=batch_size or (256 if gpus_per_actor else 512),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )

"""tembed on Ray Data (the ``tembed[ray]`` extra): encode corpora on a cluster.

* :class:`RayEncoder`: the callable class for ``Dataset.map_batches``: an Arrow batch of texts (and ids) to an
  Arrow batch of the single-machine ``tembed encode`` Parquet schema, the model loaded once per actor;
* :func:`encode_dataset`: :class:`RayEncoder` on a ``ray.data.Dataset`` with an actor pool, after checking that
  the actors fit the cluster (Ray Data waits forever otherwise);
* :func:`run_ray_job`: what ``tembed encode INPUT -o FOLDER --engine ray`` runs (sharded, resumable).

Neither ``import tembed`` nor ``import tembed.ray`` imports ray: it is imported when first used. See docs/ray.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tembed.ray.batch import RayEncoder, TableEncoder
    from tembed.ray.dataset import ResourceError, check_resources, encode_dataset, ray_session
    from tembed.ray.run import RayJobOptions, RayJobResult, run_ray_job

__all__ = [
    "RayEncoder",
    "RayJobOptions",
    "RayJobResult",
    "ResourceError",
    "TableEncoder",
    "check_resources",
    "encode_dataset",
    "ray_session",
    "run_ray_job",
]

_HOMES = {
    "RayEncoder": "tembed.ray.batch",
    "TableEncoder": "tembed.ray.batch",
    "ResourceError": "tembed.ray.dataset",
    "check_resources": "tembed.ray.dataset",
    "encode_dataset": "tembed.ray.dataset",
    "ray_session": "tembed.ray.dataset",
    "RayJobOptions": "tembed.ray.run",
    "RayJobResult": "tembed.ray.run",
    "run_ray_job": "tembed.ray.run",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tembed.ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)

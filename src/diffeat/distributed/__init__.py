"""Many workers, one store: ``--shard K/N`` partitions and Ray Data extraction.

- :mod:`diffeat.distributed.shard`: :func:`resolve_shard` (``K/N``, ``auto`` from
  torchrun, Slurm arrays or Kubernetes indexed jobs), :func:`select_shard` (the
  inputs one worker owns, by content key or path), :func:`shard_of`.
- :mod:`diffeat.distributed.ray_job`: :func:`ray_extract`, the same extraction as
  a Ray Data pipeline (decoding on CPU tasks, the model in a pool of actors that
  write the store themselves). Ray is optional (``pip install 'diffeat[ray]'``);
  it is imported only when a job starts.

See ``docs/scaling.md``.
"""

from __future__ import annotations

from typing import Any

from diffeat.distributed.shard import (
    SHARD_BY,
    Shard,
    Subset,
    bind_local_gpu,
    parse_shard,
    resolve_shard,
    select_shard,
    shard_of,
)

__all__ = [
    "SHARD_BY",
    "Shard",
    "Subset",
    "bind_local_gpu",
    "parse_shard",
    "ray_extract",
    "resolve_shard",
    "select_shard",
    "shard_of",
]


def ray_extract(*args: Any, **kwargs: Any) -> Any:
    """:func:`diffeat.distributed.ray_job.ray_extract` (documented there)."""
    from diffeat.distributed.ray_job import ray_extract as run

    return run(*args, **kwargs)

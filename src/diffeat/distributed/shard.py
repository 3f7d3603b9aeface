"""``--shard K/N``: a deterministic partition of the inputs, so N independent workers fill one store.

An image belongs to shard ``sha256(content key) mod N`` (the first 8 bytes of
the digest, big-endian): the same on every machine, Python version and run
(never Python's salted ``hash()``), and independent of the input order and of
the path an image is found under. Every image lands in exactly one shard, so
workers never write the same entry; an image whose pixels appear under two
paths lands twice in the same shard and is stored once. A rerun of a shard
skips what is stored (the store's resume), so any shard can be rerun after a
crash or preemption.

The content key hashes the decoded pixels, so every worker reads and decodes
every input once to find its own (threads, one pass before extracting), and
decodes its own images once more while extracting. Where that costs too much
(millions of images, a slow filesystem), ``by="path"`` partitions by the path
string as given instead: no extra read, but the same pixels under two paths may
then go to two workers (the store keeps the first complete entry; the second
worker's work is wasted, never wrong), and every worker must get the same
paths (the same command line).

Where K/N come from (:func:`resolve_shard`): ``--shard K/N``; ``--shard auto``
(or ``auto/N``) reads the scheduler's environment: ``RANK``/``WORLD_SIZE``
(torchrun, ``torch.distributed``), ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``
(Slurm job arrays numbered from 0; with ``auto/N`` the count is N, which a rerun of
some tasks needs), or ``JOB_COMPLETION_INDEX`` (Kubernetes indexed jobs; N from
``auto/N``, the job's ``completions``). Without ``--shard``, ``RANK``/``WORLD_SIZE`` are used when
both are set, as torchrun sets them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from diffeat.core.datasets import ImageRef, LazyImages
from diffeat.core.errors import DiffeatError, ImageError
from diffeat.core.images import ImageInput, as_input

T = TypeVar("T")

#: how a partition assigns images: by content key (default) or by path string
SHARD_BY = ("key", "path")


def shard_of(key: str, count: int) -> int:
    """The shard (``0 <= shard < count``) that owns ``key``: ``sha256(key)`` mod ``count``.

    Stable across machines, processes and Python versions (not Python's ``hash()``).
    """
    if count < 1:
        raise DiffeatError(f"a partition needs at least one shard, not {count}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``); ``origin`` says where it came from."""

    index: int
    count: int
    origin: str = "--shard"

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise DiffeatError(
                f"shard {self.index}/{self.count} (from {self.origin}) is out of range: "
                f"K/N needs N >= 1 and 0 <= K < N (shards are numbered from 0)"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        """Whether ``key`` (a content key, or a path with ``by="path"``) is in this shard."""
        return shard_of(key, self.count) == self.index


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DiffeatError(f"{what} = {text!r} is not a whole number") from None


def parse_shard(spec: str) -> Shard:
    """``"K/N"`` -> :class:`Shard` (``--shard 3/8``), with a clear error otherwise."""
    parts = spec.split("/")
    if len(parts) != 2:
        raise DiffeatError(
            f"--shard {spec!r}: write K/N (this worker's shard K of N, from 0), e.g. --shard 0/4, "
            "or --shard auto to read RANK/WORLD_SIZE, SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX"
        )
    return Shard(_int(parts[0], "--shard K"), _int(parts[1], "--shard N"), "--shard")


def _from_env(env: Mapping[str, str], count: int | None) -> Shard:
    """K (and N) from the first scheduler variables set in ``env``."""
    if "RANK" in env and "WORLD_SIZE" in env:
        index, total = _int(env["RANK"], "RANK"), _int(env["WORLD_SIZE"], "WORLD_SIZE")
        origin = "RANK/WORLD_SIZE"
    elif "SLURM_ARRAY_TASK_ID" in env:
        # the task id itself (arrays numbered from 0), so that a rerun of some tasks
        # (--array=3,5 with --shard auto/N) keeps their shards; the count only without N
        index = _int(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID")
        raw = env.get("SLURM_ARRAY_TASK_COUNT")
        total = _int(raw, "SLURM_ARRAY_TASK_COUNT") if raw is not None and count is None else -1
        origin = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
        if count is None and index >= total > 0:
            raise DiffeatError(
                f"--shard auto: SLURM_ARRAY_TASK_ID = {index} but SLURM_ARRAY_TASK_COUNT = "
                f"{total}: number the array from 0 (--array=0-{total - 1}), or give the number "
                "of shards with --shard auto/N (also when rerunning some tasks)"
            )
    elif "JOB_COMPLETION_INDEX" in env:
        index, total = _int(env["JOB_COMPLETION_INDEX"], "JOB_COMPLETION_INDEX"), -1
        origin = "JOB_COMPLETION_INDEX"
    else:
        raise DiffeatError(
            "--shard auto found no scheduler variables (RANK and WORLD_SIZE, "
            "SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX): give --shard K/N"
        )
    if count is not None:
        if total not in (-1, count):
            raise DiffeatError(
                f"--shard auto/{count} disagrees with the scheduler ({origin} says {total} "
                f"workers): give the same N or --shard auto"
            )
        total = count
    if total == -1:
        raise DiffeatError(
            f"--shard auto: {origin} gives this worker's index but not the number of workers; "
            "write --shard auto/N with N the job's completions (array size)"
        )
    return Shard(index, total, origin)


def resolve_shard(spec: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard a worker runs: ``--shard`` ``K/N``, ``auto`` or ``auto/N`` (see the module
    docstring); without a spec, ``RANK``/``WORLD_SIZE`` when both are set (torchrun), else
    ``None`` (every input)."""
    env = os.environ if env is None else env
    if spec is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            return _from_env(env, None)
        return None
    text = spec.strip()
    if text == "auto":
        return _from_env(env, None)
    if text.startswith("auto/"):
        return _from_env(env, _int(text[len("auto/") :], "--shard auto/N"))
    return parse_shard(text)


def bind_local_gpu(env: Mapping[str, str] | None = None) -> int | None:
    """Under torchrun (``LOCAL_RANK`` set, several GPUs visible), make GPU ``LOCAL_RANK`` the
    current CUDA device, so that ``device = "auto"`` (``cuda``) means this process's own GPU
    and not GPU 0 for every process of the node. Returns the index, or ``None``."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env:
        return None
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    index = _int(env["LOCAL_RANK"], "LOCAL_RANK") % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


class Subset(Sequence[T]):
    """The items of ``base`` at ``indices`` (lazy: a :class:`LazyImages` still decodes on
    access); picklable when ``base`` is."""

    def __init__(self, base: Sequence[T], indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Subset[T]: ...

    def __getitem__(self, index: int | slice) -> T | Subset[T]:
        if isinstance(index, slice):
            return Subset(self.base, self.indices[index])
        return self.base[self.indices[index]]

    def __iter__(self) -> Iterator[T]:
        for i in self.indices:
            yield self.base[i]


def _path_of(images: Sequence[Any], index: int) -> str:
    if isinstance(images, LazyImages):
        return str(images.refs[index].path)
    item = images[index]
    if isinstance(item, ImageRef):
        return str(item.path)
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, ImageInput):  # a decoded video frame: "video.mp4#frame 12"
        return item.source
    raise DiffeatError(
        f"cannot partition a {type(item).__name__} by path (it has none): use by='key' "
        "(--shard-by key)"
    )


def _key_of(images: Sequence[Any], index: int) -> str:
    """The content key of an input; an unreadable one is partitioned by its path, so exactly
    one worker reports it."""
    item = images[index]
    try:
        return (item.load() if isinstance(item, ImageRef) else as_input(item)).key
    except ImageError:
        return _path_of(images, index)


def select_shard(
    images: Sequence[T],
    shard: Shard,
    *,
    by: str = "key",
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> Subset[T]:
    """The inputs of ``images`` in ``shard``, in input order.

    ``by="key"`` partitions by content key (reads every image once, in ``threads`` threads);
    ``by="path"`` by the path string as given (reads nothing). ``progress(n)`` is called as
    inputs are keyed.
    """
    if by not in SHARD_BY:
        raise DiffeatError(f"--shard-by {by!r}: use one of {', '.join(SHARD_BY)}")
    if shard.count == 1:
        return Subset(images, range(len(images)))
    keyer = _key_of if by == "key" else _path_of
    workers = threads or min(8, os.cpu_count() or 1)
    mine: list[int] = []
    chunk = 64 * workers  # a bounded number of images in flight, however many inputs
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(images), chunk):
            indices = range(start, min(start + chunk, len(images)))
            for index, key in zip(indices, pool.map(lambda i: keyer(images, i), indices)):
                if shard.owns(key):
                    mine.append(index)
                if progress is not None:
                    progress(1)
    return Subset(images, mine)

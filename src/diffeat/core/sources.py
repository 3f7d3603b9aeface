"""One extractor with the feature store in front of it: keys, reuse, batching, resume.

:class:`FeatureSource` is the only code that builds store keys: the extractor's
cache key (plugin + result-affecting options + model identity) and each
image's key (content hash + the extractor's conditioning). Everything else
(the pipeline, ``train``, ``eval``, the CLI) asks a source: :meth:`FeatureSource.is_stored`,
:meth:`FeatureSource.read`, :meth:`FeatureSource.reader` for worker processes.

Cast policy: features go to the store on the extractor's device; the store
checks the float16 range and casts there, so only storage-precision bytes
cross to the host. What a run keeps in memory is rounded to the storage
precision on the device, so a later run reading the store sees exactly the
features this run used.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffeat.core.components import (
    Extractor,
    FeatureStorage,
    PreprocessingExtractor,
    batch_size_of,
    conditioning_of,
    device_of,
    preprocessor_of,
)
from diffeat.core.config import StageConfig, config_digest
from diffeat.core.errors import DiffeatError, ImageError, StoreError
from diffeat.core.features import FeatureSet, LayerInfo
from diffeat.core.images import ImageInput, ImageLike, as_input
from diffeat.core.options import options_dict
from diffeat.core.paths import absolute_source
from diffeat.core.prefetch import ExtractSettings, Prepared, prepared_inputs
from diffeat.core.store_writes import can_write, refused_write, write_refusal
from diffeat.core.writer import BackgroundWriter, WriteResult

STORE_KEY_VERSION = 1


def extractor_cache_key(
    plugin: str, options: Any, model_identity: dict[str, Any], store_dtype: str = "float16"
) -> str:
    """The store key of an extractor: plugin + result-affecting options + model identity,
    and the store's storage dtype when it is not the default float16 (so float32 and
    bfloat16 entries are entries of their own, and float16 keys stay as they were)."""
    data = {
        "v": STORE_KEY_VERSION,
        "plugin": plugin,
        "config": options_dict(options, cache_only=True),
        "model": model_identity,
    }
    if store_dtype != "float16":
        data["store_dtype"] = store_dtype
    return f"{plugin}-{config_digest(data)[:20]}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, stored with the features."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    dists = (
        "diffeat",
        "torch",
        "diffusers",
        "transformers",
        "open_clip_torch",
        "zarr",
        "numpy",
        "pillow",
    )
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class Progress(Protocol):
    """What the sources need of a progress bar (``tqdm`` fits)."""

    def update(self, n: int = 1) -> object: ...


@dataclass
class ExtractReport:
    """What an extraction run did."""

    total: int = 0
    #: extracted and stored by this run
    computed: int = 0
    #: already stored when the run reached them
    cached: int = 0
    #: extracted, but another process stored the same entry first: its entry is kept and used
    found: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


class FeatureSource:
    """An extractor (built on first use) reading and writing through an optional store.

    A run that finds every image in the store never builds the extractor's
    model: the cache key needs only the model identity (a file fingerprint).
    """

    def __init__(self, stage: StageConfig, store: FeatureStorage | None = None) -> None:
        self.stage = stage
        self.store = store
        self._extractor: Extractor | None = None
        self._cache_key: str | None = None
        self._registered = False

    @property
    def name(self) -> str:
        return self.stage.name or self.stage.plugin

    @property
    def extractor(self) -> Extractor:
        """The extractor, built on first use (a run that finds everything stored never builds it)."""
        if self._extractor is None:
            self._extractor = self.stage.build()
        return self._extractor

    def layers(self) -> list[LayerInfo]:
        return list(self.extractor.layers())

    @property
    def cache_key(self) -> str:
        if self._cache_key is None:
            self._cache_key = extractor_cache_key(
                self.stage.plugin,
                self.stage.options,
                self.extractor.model_identity(),
                getattr(self.store, "dtype", "float16"),
            )
        return self._cache_key

    def extractor_info(self) -> dict[str, Any]:
        """What the store keeps about this extractor."""
        return {
            "plugin": self.stage.plugin,
            "config": self.stage.resolved(),
            "model": self.extractor.model_identity(),
            "layers": [info.to_dict() for info in self.layers()],
            "timesteps": list(self.extractor.timesteps()),
            "versions": library_versions(),
        }

    @property
    def device(self) -> torch.device:
        return device_of(self.extractor)

    def _register(self, *, degrade: bool = True) -> None:
        """Record the extractor in the store once. A store that refuses writes is, with
        ``degrade``, read from only (:mod:`diffeat.core.store_writes`), else a StoreError
        (``extract``, whose only purpose is writing)."""
        if self.store is None or self._registered:
            return
        if degrade and not can_write(self.store):
            return
        try:
            self.store.register_extractor(self.cache_key, self.extractor_info())
        except (OSError, DiffeatError) as exc:
            if degrade:
                if refused_write(self.store, exc):
                    return
                raise
            reason = write_refusal(exc)
            if reason is None:
                raise
            raise StoreError(
                f"cannot write into the feature store {self.store.path} ({reason}): "
                "extracting keeps features there; choose a writable --store"
            ) from exc
        self._registered = True

    def image_key(self, inp: ImageInput) -> str:
        """The store key of an image: its content hash, plus the extractor's conditioning."""
        extra = conditioning_of(self.extractor, inp)
        if not extra:
            return inp.key
        return f"{inp.key}-{hashlib.sha256(extra.encode()).hexdigest()[:12]}"

    # -- reading what is stored ---------------------------------------------------

    def _require_store(self, what: str) -> FeatureStorage:
        if self.store is None:
            raise DiffeatError(f"{what} needs a feature store: pass store=PATH (--store PATH)")
        return self.store

    def is_stored(self, image: ImageLike) -> bool:
        """Whether a complete entry of ``image`` is in the store (``False`` without a store)."""
        if self.store is None:
            return False
        return self.store.has(self.cache_key, self.image_key(as_input(image)))

    def has_key(self, image_key: str) -> bool:
        """Whether a complete entry is stored under an image key from :meth:`image_key`."""
        return self.store is not None and self.store.has(self.cache_key, image_key)

    def read(
        self,
        image_key: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> FeatureSet:
        """The stored features under an image key (see :meth:`image_key`)."""
        store = self._require_store("reading features")
        return store.get(self.cache_key, image_key, device=device, dtype=dtype)

    def stored_dtype(self, image_key: str) -> str:
        """``"float16"`` when every layer of a stored entry is float16, else ``"float32"``."""
        info = self._require_store("reading features").entry_info(self.cache_key, image_key)
        dtypes = {spec["dtype"] for spec in info["layers"].values()}
        return "float16" if dtypes == {"float16"} else "float32"

    def reader(self, dtype: str = "float32") -> StoredFeatures:
        """A picklable read-only handle on this extractor's entries, for worker processes."""
        store = self._require_store("reading features")
        return StoredFeatures(store.path, self.cache_key, dtype, opener=type(store))

    # -- writing --------------------------------------------------------------------

    def put(self, image: ImageLike, fs: FeatureSet) -> None:
        """Store features computed outside :meth:`features`, e.g. while generating ``image``."""
        self._require_store("storing features")
        self._register()
        self._store_and_round(as_input(image), fs, keep=False)

    def _store_and_round(
        self,
        inp: ImageInput,
        fs: FeatureSet,
        *,
        keep: bool,
        report: ExtractReport | None = None,
    ) -> FeatureSet | None:
        """Store ``fs`` (cast by the store on the features' device); with ``keep``, return
        it rounded to the store's precision on the device (see the module's cast policy).

        A complete entry is never replaced: when another process stored the image
        first (while this one computed it), its entry is kept, counted in
        ``report.found``, and (with ``keep``) read back and used.

        A store that cannot be written (:mod:`diffeat.core.store_writes`: opened read-only,
        or a write refused) keeps nothing; the features are used as if they were kept
        (rounded alike), and the store is warned about once.
        """
        store = self._require_store("storing features")
        key = self.image_key(inp)
        mine: bool | None = None
        if can_write(store):
            try:
                mine = store.put(self.cache_key, key, fs, source=inp.source, replace=False)
            except (OSError, DiffeatError) as exc:
                if not refused_write(store, exc):
                    raise
        if report is not None:
            if mine is False:
                report.found += 1
            else:
                report.computed += 1
        if not keep:  # extract only: nothing comes back
            return None
        if mine is False:
            return self.read(key, device=self.device)
        storage = getattr(torch, store.dtype)
        rounded = fs.to(dtype=storage)
        if mine is None:  # not kept: the store's range check was not made, make it here
            for name, layer in rounded.layers.items():
                if bool((torch.isinf(layer) & torch.isfinite(fs.layers[name])).any()):
                    raise StoreError(
                        f"layer {name!r} of image {key!r} has values beyond the {store.dtype} "
                        "range of the store: use a store with --store-dtype float32"
                    )
        return rounded.to(self.device, torch.float32)

    def _iter_features(
        self,
        items: Sequence[ImageLike],
        report: ExtractReport,
        *,
        keep: bool,
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, FeatureSet | None]]:
        """Yield ``(index, features)`` in input order, reading the store or extracting batches."""
        batch: list[tuple[int, ImageInput]] = []
        batch_size = batch_size_of(self.extractor)

        def flush() -> Iterator[tuple[int, FeatureSet | None]]:
            feats = self.extractor.extract([inp for _, inp in batch])
            self._register()  # only now: a run that finds everything stored never loads the model
            for (index, inp), fs in zip(batch, feats):
                fs.meta.setdefault("source", absolute_source(inp.source))
                if self.store is not None:
                    fs = self._store_and_round(inp, fs, keep=keep, report=report)
                else:
                    report.computed += 1
                if progress is not None:
                    progress.update(1)
                yield index, (fs if keep else None)
            batch.clear()

        for index, item in enumerate(items):
            report.total += 1
            try:
                inp = as_input(item)
            except ImageError as exc:
                if keep:
                    raise
                report.failed.append((str(item), str(exc)))
                if progress is not None:
                    progress.update(1)
                continue
            if self.store is not None and self.store.has(self.cache_key, self.image_key(inp)):
                report.cached += 1
                if progress is not None:
                    progress.update(1)
                stored = self.read(self.image_key(inp), device=self.device) if keep else None
                yield index, stored
                continue
            batch.append((index, inp))
            if len(batch) >= batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def features(
        self, images: Sequence[ImageLike], *, progress: Progress | None = None
    ) -> list[FeatureSet]:
        """Features of each image, from the store when present, else extracted (and stored)."""
        report = ExtractReport()
        out: dict[int, FeatureSet] = {}
        for index, fs in self._iter_features(images, report, keep=True, progress=progress):
            assert fs is not None
            out[index] = fs
        return [out[i] for i in range(len(images))]

    def extract(
        self,
        images: Sequence[ImageLike],
        *,
        progress: Progress | None = None,
        settings: ExtractSettings | None = None,
    ) -> ExtractReport:
        """Extract and store features of many images; unreadable images are reported, not fatal.

        ``settings`` (:class:`~diffeat.core.prefetch.ExtractSettings`) sets the images per
        extractor call, the worker processes that decode and preprocess ahead, and the
        memory bound of the background writer that stores entries while the next batch
        computes. A store error of one entry (:class:`DiffeatError`) is reported for its
        image; any other error stops the run (entries already written stay complete).
        """
        store = self._require_store("extract")
        settings = settings or ExtractSettings()
        report = ExtractReport()
        batch_size = settings.batch_size or batch_size_of(self.extractor)
        failed: list[tuple[int, str, str]] = []
        # with workers, preprocessing happens there; else just before each batch
        preprocess = preprocessor_of(self.extractor) if settings.workers else None
        pending: list[Prepared] = []
        submitted: set[str] = set()
        tick = progress.update if progress is not None else (lambda n=1: None)
        writer_error: list[BaseException | None] = [None]

        def take(results: list[WriteResult]) -> None:
            for res in results:
                index, source = res.tag  # type: ignore[misc]
                if res.error is None:
                    if res.value is False:
                        report.found += 1
                    else:
                        report.computed += 1
                elif isinstance(res.error, DiffeatError):
                    failed.append((index, source, str(res.error)))
                else:
                    writer_error[0] = res.error
                    raise res.error
                tick(1)

        writer = BackgroundWriter(settings.write_queue_bytes)
        inputs = prepared_inputs(images, preprocess, workers=settings.workers, ahead=2 * batch_size)
        try:
            for prep in inputs:
                report.total += 1
                if prep.image is None:
                    failed.append((prep.index, prep.item, prep.error))
                    tick(1)
                    continue
                key = self.image_key(prep.image)
                # an image met earlier in this run (the same content twice) counts as
                # stored: its entry may still be in the batch or the writer's queue
                if key in submitted or store.has(self.cache_key, key):
                    report.cached += 1
                    tick(1)
                    continue
                submitted.add(key)
                pending.append(prep)
                if len(pending) >= batch_size:
                    self._extract_batch(pending, writer, settings)
                    pending = []
                take(writer.results())
            if pending:
                self._extract_batch(pending, writer, settings)
            take(writer.close())
        except BaseException as exc:
            if exc is writer_error[0]:
                writer.abort()  # the store failed: write nothing more
            else:
                writer.close()  # entries computed before the error are still stored
            raise
        finally:
            inputs.close()  # stops the worker processes
        if report.cached and not self._registered and getattr(store, "mode", "a") != "r":
            # entries found are no proof that the extractor info is sound: a zarr.json lost
            # or garbled (what `store verify` reports) is rewritten, as a run that computes
            # would; the model is not loaded for this
            if self.cache_key in store.damaged_extractors():
                self._register(degrade=False)
        report.failed = [(item, error) for _, item, error in sorted(failed)]
        return report

    def _extract_batch(
        self, batch: list[Prepared], writer: BackgroundWriter, settings: ExtractSettings
    ) -> None:
        """One extractor call on ``batch``; each entry goes to the background writer."""
        store = self._require_store("extract")
        extractor = self.extractor
        inputs = [p.image for p in batch if p.image is not None]
        if isinstance(extractor, PreprocessingExtractor):
            preprocess = None
            rows = []
            for p, inp in zip(batch, inputs):
                if p.pixels is None:  # no workers: preprocessed here, just before the batch
                    preprocess = preprocess or extractor.preprocessor()
                    p.pixels = preprocess(inp)
                rows.append(p.pixels)
            pin = settings.pin_memory
            if pin is None:
                pin = self.device.type == "cuda"
            if len({tuple(r.shape) for r in rows}) > 1:  # per-image sizes: a call per size
                shapes = [tuple(r.shape) for r in rows]
                by_shape: dict[int, FeatureSet] = {}
                for shape in dict.fromkeys(shapes):
                    idx = [i for i, s in enumerate(shapes) if s == shape]
                    part = extractor.extract_preprocessed(
                        [inputs[i] for i in idx], torch.stack([rows[i] for i in idx])
                    )
                    by_shape.update(zip(idx, part))
                feats = [by_shape[i] for i in range(len(rows))]
            elif pin:  # staged in pinned memory: the copy to the GPU does not block
                staged = torch.empty(
                    (len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=True
                )
                pixels = torch.stack(rows, out=staged).to(self.device, non_blocking=True)
                feats = extractor.extract_preprocessed(inputs, pixels)
            else:
                feats = extractor.extract_preprocessed(inputs, torch.stack(rows))
        else:
            feats = extractor.extract(inputs)
        # only now: a run that finds everything stored never loads the model
        self._register(degrade=False)
        for prep, inp, fs in zip(batch, inputs, feats):
            fs.meta.setdefault("source", absolute_source(inp.source))
            key = self.image_key(inp)
            nbytes = sum(t.numel() * t.element_size() for t in fs.layers.values())
            job = functools.partial(
                store.put, self.cache_key, key, fs, source=inp.source, replace=False
            )
            writer.submit((prep.index, inp.source), nbytes, job)


@dataclass(frozen=True)
class StoredFeatures:
    """Read-only access to one extractor's stored entries that survives pickling.

    It holds the store's location and class (pickled by reference), never an
    open handle: each process (a DataLoader worker started with ``spawn``)
    opens the store read-only, as ``opener(path, mode="r")``, on its first
    :meth:`get`. Without an ``opener`` the ``diffeat.stores`` entry point is used.
    """

    store_path: str | os.PathLike[str]
    cache_key: str
    dtype: str = "float32"
    opener: Callable[..., FeatureStorage] | None = None

    def get(self, image_key: str) -> FeatureSet:
        """The features stored under ``image_key``, on the CPU in :attr:`dtype`."""
        return self._store().get(self.cache_key, image_key, dtype=getattr(torch, self.dtype))

    def _store(self) -> FeatureStorage:
        """One read-only handle per process, store class and path."""
        key = (self.opener, str(self.store_path))
        if key not in _READ_ONLY:
            if self.opener is not None:
                _READ_ONLY[key] = self.opener(self.store_path, mode="r")
            else:
                _READ_ONLY[key] = open_store(self.store_path, mode="r")
        return _READ_ONLY[key]


_READ_ONLY: dict[tuple[object, str], FeatureStorage] = {}


#: the entry-point group naming store implementations; diffeat's own is ``zarr``
STORE_ENTRY_POINTS = "diffeat.stores"
DEFAULT_STORE = "zarr"


def open_store(path: str | os.PathLike[str], **kwargs: Any) -> FeatureStorage:
    """Open the store at ``path`` with the implementation registered under the
    ``diffeat.stores`` entry point ``zarr`` (:class:`~diffeat.store.FeatureStore`).
    ``path`` is a folder or an object-store URL (``s3://bucket/feats.zarr``, ``gs://``,
    ``az://``), which the implementation opens on object storage.

    Core never imports the store package; it finds it as it finds plugins.
    """
    from importlib import metadata

    for ep in metadata.entry_points(group=STORE_ENTRY_POINTS, name=DEFAULT_STORE):
        return ep.load()(path, **kwargs)
    raise DiffeatError(
        f"no feature store implementation is installed to open {path} (entry point "
        f"{STORE_ENTRY_POINTS}:{DEFAULT_STORE}); reinstall diffeat (pip install -e .) or pass "
        "store=FeatureStore(path)"
    )

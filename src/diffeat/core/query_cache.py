"""What a query-conditioned matcher computes per (image, query), kept in the feature store.

Hedlin et al.'s matcher optimises a text context per source point: minutes of
UNet passes that depend only on the source image, the point and the
optimisation's settings, never on the target. A matcher that declares
:class:`~diffeat.core.components.CachingMatcher` gets a :class:`QueryCache`
from the pipeline when it has a store; a second target for the same source
point, a rerun, or an evaluation where an image recurs across pairs then
computes nothing twice, and an interrupted evaluation resumes with the points
it finished.

Keys are built here, as :class:`~diffeat.core.sources.FeatureSource` builds
them for extractors: the cache key hashes the plugin, its result-affecting
options (``opt(..., cache=False)`` marks the others) and the model identity;
the entry key is the image's content key plus a hash of the query. Values are
kept in float32 whatever the store's feature dtype, so a cached result is
bitwise the computed one. A store that cannot be written (read-only) is used
for reading; the matcher computes what is missing, with one warning.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from typing import Any

from PIL import Image

from diffeat.core.components import FeatureStorage
from diffeat.core.errors import DiffeatError
from diffeat.core.features import FeatureSet
from diffeat.core.images import as_input
from diffeat.core.sources import extractor_cache_key, library_versions
from diffeat.core.store_writes import can_write, mark_read_only, refused_write

__all__ = ["QueryCache"]


class QueryCache:
    """Per (image, query) results of one matcher configuration in a feature store."""

    def __init__(
        self,
        store: FeatureStorage,
        plugin: str,
        options: Any,
        model_identity: Callable[[], dict[str, Any]],
        *,
        config: dict[str, Any] | None = None,
    ) -> None:
        """``model_identity`` is called on first use (it may load the model)."""
        self.store = store
        self.plugin = plugin
        self.options = options
        self._model_identity = model_identity
        self._config = config or {}
        self._cache_key: str | None = None
        self._exact: FeatureStorage | None = None
        self._registered = False

    @property
    def cache_key(self) -> str:
        """The store key of this matcher configuration's results."""
        if self._cache_key is None:
            self._cache_key = extractor_cache_key(self.plugin, self.options, self._model_identity())
        return self._cache_key

    @property
    def _values(self) -> FeatureStorage:
        """The store reopened to keep values in float32 (bitwise what was computed)."""
        if self._exact is None:
            mode = getattr(self.store, "mode", "a")
            can_write(self.store, stacklevel=3)  # opened read-only: warns now, once per store
            if getattr(self.store, "dtype", "float32") == "float32":
                self._exact = self.store
            else:
                opener: Any = type(self.store)
                try:
                    self._exact = opener(self.store.path, mode, dtype="float32")
                except TypeError:  # a store class without these arguments: use it as it is
                    self._exact = self.store
        return self._exact

    def key(self, image: Image.Image, query: str) -> str:
        """The entry key of ``query`` on ``image``: its content key + a hash of the query."""
        digest = hashlib.sha256(query.encode()).hexdigest()[:16]
        return f"{as_input(image).key}-q{digest}"

    def get(self, image: Image.Image, query: str) -> FeatureSet | None:
        """The stored result of ``query`` on ``image``, or None."""
        key = self.key(image, query)
        store = self._values
        if not store.has(self.cache_key, key):
            return None
        return store.get(self.cache_key, key)

    def put(self, image: Image.Image, query: str, result: FeatureSet, source: str = "") -> None:
        """Keep a result. A store that cannot be written (read-only, or refusing writes) is
        read from only, with one warning for the store (:mod:`diffeat.core.store_writes`);
        a result the store refuses is skipped with a warning and the next one is tried."""
        store = self._values
        if not can_write(self.store):
            return
        try:
            if not self._registered:
                store.register_extractor(self.cache_key, self._info())
                self._registered = True
            store.put(
                self.cache_key,
                self.key(image, query),
                result,
                source=source or None,
                replace=False,
            )
        except OSError as exc:  # refused, or any other failure of the disk: keep nothing more
            if not refused_write(self.store, exc):
                mark_read_only(self.store, f"writing failed: {exc}")
        except DiffeatError as exc:
            if refused_write(self.store, exc):
                return
            warnings.warn(
                f"{self.plugin}: result for {query!r} not kept in the store {self.store.path} "
                f"({exc})",
                stacklevel=2,
            )

    def _info(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin,
            "kind": "matcher queries",
            "config": self._config,
            "model": self._model_identity(),
            "versions": library_versions(),
        }

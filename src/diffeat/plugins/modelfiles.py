"""Shared helpers for extractors that load weight files: hub snapshots, fingerprints, hints.

A model is a hub id or a local folder. Hub ids are resolved to a local snapshot
first (downloaded when online, read from the cache when offline), so the model
identity is always a fingerprint of the files actually loaded.

A neutral module: every built-in plugin (Stable Diffusion, the ViTs) imports it,
so they all fingerprint files and word the offline hint the same way, and none
of them imports another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffeat.core.errors import ModelLoadError

__all__ = [
    "file_fingerprint",
    "files_fingerprint",
    "hub_snapshot",
    "is_hub_id",
    "offline_hint",
    "quiet_transformers",
]

_SAMPLE_BLOCK = 1 << 20
_SAMPLES = 16


def file_fingerprint(path: Path) -> str:
    """sha256 of a small file; of the size and 16 evenly spread 1 MiB blocks of a large one."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        if size <= _SAMPLE_BLOCK * _SAMPLES:
            h.update(fh.read())
        else:
            step = (size - _SAMPLE_BLOCK) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                fh.seek(i * step)
                h.update(fh.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def offline_hint(model: str) -> str:
    """How to use ``model`` without network access (download elsewhere, pass the folder)."""
    return (
        f"To use it without network access, download it where the hub is reachable "
        f"(`hf download {model} --local-dir DIR`), copy DIR here, and pass the folder: "
        f'model = "DIR" in the [extractor] table or --model DIR.'
    )


def files_fingerprint(files: Iterable[Path], root: Path | None = None) -> str:
    """A content fingerprint of ``files`` (names relative to ``root`` when given)."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        name = f.relative_to(root).as_posix() if root is not None else f.name
        h.update(name.encode())
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()[:32]


def is_hub_id(model: str) -> bool:
    """True for an ``owner/name`` string that is not an existing path."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return False
    return model.count("/") == 1 and all(model.split("/"))


def hub_snapshot(
    model: str, revision: str, pattern_groups: Sequence[Sequence[str]], weights: Sequence[str]
) -> Path:
    """Download (or find in the cache) the files of ``model`` and return the snapshot folder.

    ``pattern_groups`` are tried in order (e.g. safetensors first, then PyTorch
    pickles loaded with ``weights_only``); the first group that yields a file
    matching one of the ``weights`` globs wins. An unreachable hub or a
    missing cache entry raises :class:`ModelLoadError` saying how to pass a
    local folder instead.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from huggingface_hub import snapshot_download

        folder = None
        for patterns in pattern_groups:
            folder = Path(
                snapshot_download(
                    repo_id=model, revision=revision or None, allow_patterns=list(patterns)
                )
            )
            if any(any(folder.glob(w)) for w in weights):
                return folder
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(
            f"cannot load model {model!r} from the hub ({type(exc).__name__}: {first}). "
            f"{offline_hint(model)}"
        ) from None
    raise ModelLoadError(
        f"model {model!r} on the hub has no weight files this extractor can load "
        f"(looked for {', '.join(weights)} in {folder})"
    )


def quiet_transformers() -> None:
    """Silence per-file progress bars and load reports of transformers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

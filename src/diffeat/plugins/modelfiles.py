"""Shared helpers for extractors that load weight files: hub snapshots, fingerprints, hints.

A model is a hub id or a local folder. Hub ids are resolved to a local snapshot
first (downloaded when online, read from the cache when offline). A folder inside
a hub cache (``.../models--owner--name/snapshots/<commit>/``) is identified by
its repository and commit (:func:`hub_origin`: exact, and nothing is read); any
other folder by a fingerprint of the files actually loaded.

A neutral module: every built-in plugin (Stable Diffusion, the ViTs) imports it,
so they all fingerprint files and word the offline hint the same way, and none
of them imports another.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffeat.core.errors import ModelLoadError

__all__ = [
    "FULL_HASH_ENV",
    "file_fingerprint",
    "full_hash",
    "files_fingerprint",
    "HubOrigin",
    "hub_origin",
    "hub_snapshot",
    "is_hub_id",
    "offline_hint",
    "quiet_transformers",
]

_SAMPLE_BLOCK = 1 << 20
_SAMPLES = 16
_READ_BLOCK = 8 << 20

#: ``1``: fingerprint every byte of large weight files, not 16 sampled blocks (slower:
#: the whole file is read once per process; the store key changes with the mode)
FULL_HASH_ENV = "DIFFEAT_FULL_HASH"

#: (path, size, mtime_ns, inode) -> full fingerprint: each large file is read once a process
_FULL_CACHE: dict[tuple[str, int, int, int], str] = {}


def full_hash() -> bool:
    """Whether large files are hashed whole (:data:`FULL_HASH_ENV` set, not ``0``)."""
    return os.environ.get(FULL_HASH_ENV, "").strip().lower() not in ("", "0", "false", "no")


def file_fingerprint(path: Path, full: bool | None = None) -> str:
    """sha256 of the size and the bytes read of ``path``: every byte of a file of at most
    16 MiB; of a larger one 16 evenly spread 1 MiB blocks (first and last included), or
    every byte with ``full`` (default: :func:`full_hash`, the ``DIFFEAT_FULL_HASH``
    environment variable).

    The sampled rule keeps opening a model fast, but weights edited in place between
    the blocks keep their fingerprint (and so their store key and stored features);
    the full hash sees every byte, and gives a large file a different fingerprint from
    its sampled one, so the two modes never share store entries. Small files have the
    same fingerprint in both modes (they are read whole either way).
    """
    path = Path(path)
    stat = path.stat()
    size = stat.st_size
    full = full_hash() if full is None else full
    small = size <= _SAMPLE_BLOCK * _SAMPLES
    memo = (str(path.absolute()), size, stat.st_mtime_ns, stat.st_ino)
    if full and not small and memo in _FULL_CACHE:
        return _FULL_CACHE[memo]
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        if small:
            h.update(fh.read())
        elif full:
            while block := fh.read(_READ_BLOCK):
                h.update(block)
        else:
            step = (size - _SAMPLE_BLOCK) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                fh.seek(i * step)
                h.update(fh.read(_SAMPLE_BLOCK))
    digest = h.hexdigest()
    if full and not small:
        _FULL_CACHE[memo] = digest
    return digest


def offline_hint(model: str) -> str:
    """How to use ``model`` without network access (download elsewhere, pass the folder)."""
    return (
        f"To use it without network access, download it where the hub is reachable "
        f"(`hf download {model} --local-dir DIR`), copy DIR here, and pass the folder: "
        f'model = "DIR" in the [extractor] table or --model DIR.'
    )


_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubOrigin:
    """Where a folder of the hub cache comes from: the repository and the commit."""

    hub_id: str
    """``owner/name``"""
    revision: str
    """the 40-hex commit hash of the snapshot"""
    snapshot: Path
    """the snapshot folder (``.../models--owner--name/snapshots/<commit>``)"""
    subfolder: str = ""
    """the path's place inside the snapshot (``""``: the snapshot itself)"""

    def identity(self) -> dict[str, str]:
        """``{"hub_id", "revision"}`` (and ``"subfolder"`` below the snapshot's root): the
        model identity of a hub model."""
        out = {"hub_id": self.hub_id, "revision": self.revision}
        if self.subfolder:
            out["subfolder"] = self.subfolder
        return out


def hub_origin(path: Path | str) -> HubOrigin | None:
    """The repository and commit of ``path`` when it lies in a Hugging Face hub cache
    snapshot (``.../models--owner--name/snapshots/<40-hex commit>/...``), else None.

    A snapshot's files are the commit's files (the cache stores them under their
    content hash and links them in), so the commit identifies them exactly without
    reading a byte. The path is normalised (``~``, ``..``) but links are not followed:
    the files of a snapshot are links into ``blobs/``. Only a real cache qualifies: the
    repository folder has ``blobs/`` and ``refs/``, and on POSIX every file under ``path``
    is such a link; a copied or edited snapshot (weights saved over a link) is None, and
    is fingerprinted by content like any local folder.
    """
    absolute = Path(os.path.normpath(Path(path).expanduser().absolute()))
    parts = absolute.parts
    for i in range(len(parts) - 2):
        repo, snapshots, commit = parts[i : i + 3]
        if snapshots == "snapshots" and _COMMIT.fullmatch(commit):
            if repo.startswith("models--") and repo.count("--") >= 2:
                owner, _, name = repo[len("models--") :].partition("--")
                repo_dir = Path(*parts[: i + 1])
                if not (owner and name and _is_cache_snapshot(repo_dir, absolute)):
                    return None
                sub = Path(*parts[i + 3 :]).as_posix() if len(parts) > i + 3 else ""
                return HubOrigin(f"{owner}/{name}", commit, Path(*parts[: i + 3]), sub)
    return None


def _is_cache_snapshot(repo_dir: Path, path: Path) -> bool:
    if not ((repo_dir / "blobs").is_dir() and (repo_dir / "refs").is_dir()):
        return False
    if os.name != "posix":  # the cache copies files where links are not available
        return True
    if path.is_symlink() or not path.exists():
        return True
    if path.is_file():
        return False
    return all((Path(root) / f).is_symlink() for root, _, files in os.walk(path) for f in files)


def files_fingerprint(files: Iterable[Path], root: Path | None = None) -> str:
    """A content fingerprint of ``files`` (names relative to ``root`` when given).

    Files all in one hub cache snapshot (:func:`hub_origin`) are fingerprinted by the
    repository, the commit and their names, without reading them; others by
    :func:`file_fingerprint` of each.
    """
    files = [Path(p) for p in files]
    found = [hub_origin(f) for f in files]
    snapshots = {None if o is None else (o.hub_id, o.revision, o.snapshot) for o in found}
    if len(snapshots) == 1 and None not in snapshots:
        origin = found[0]
        assert origin is not None
        h = hashlib.sha256(f"hub:{origin.hub_id}@{origin.revision}".encode())
        for f in sorted(files):
            place = Path(os.path.normpath(f.expanduser().absolute()))
            h.update(place.relative_to(origin.snapshot).as_posix().encode())
        return h.hexdigest()[:32]
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

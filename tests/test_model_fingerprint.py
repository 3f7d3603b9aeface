"""Model identity: large weight files are fingerprinted by sampled blocks unless
DIFFEAT_FULL_HASH=1 asks for every byte; the mode enters the store key."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffeat.core.sources import extractor_cache_key
from diffeat.plugins import modelfiles
from diffeat.plugins.cross_attention.options import CrossAttentionOptions
from diffeat.plugins.modelfiles import FULL_HASH_ENV, file_fingerprint, files_fingerprint

MIB = 1 << 20
SIZE = 17 * MIB  # above the 16 MiB read whole: 16 sampled 1 MiB blocks, 1/15 MiB apart
UNSAMPLED = MIB + 1000  # after block 0 ([0, 1 MiB)), before block 1 (at 16/15 MiB)


def _big(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "unet.safetensors"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    (folder / "config.json").write_text("{}")
    return path


def _edit(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))
    modelfiles._FULL_CACHE.clear()  # as a new process: the edit may fall in the same mtime tick


def _key(folder: Path) -> str:
    identity = {"fingerprint": files_fingerprint(folder.iterdir(), folder)}
    return extractor_cache_key("cross-attention", CrossAttentionOptions(), identity)


def test_an_unsampled_edit_changes_the_key_only_with_the_full_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    weights = _big(folder)
    monkeypatch.delenv(FULL_HASH_ENV, raising=False)
    sampled = _key(folder)
    monkeypatch.setenv(FULL_HASH_ENV, "1")
    full = _key(folder)
    assert full != sampled  # the two modes never share store entries

    _edit(weights, UNSAMPLED)
    monkeypatch.delenv(FULL_HASH_ENV)
    assert _key(folder) == sampled  # the sampled rule does not see the edit
    monkeypatch.setenv(FULL_HASH_ENV, "1")
    assert _key(folder) != full  # every byte is hashed

    _edit(weights, 0)  # a sampled byte: both modes see it
    monkeypatch.setenv(FULL_HASH_ENV, "0")
    assert _key(folder) != sampled


def test_small_files_are_read_whole_in_both_modes(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_fingerprint(path, full=True) == file_fingerprint(path, full=False)
    big = _big(tmp_path / "m")
    assert file_fingerprint(big, full=True) != file_fingerprint(big, full=False)

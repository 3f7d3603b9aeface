"""A model from the hub cache is identified by its repository and commit, not by hashing.

The tests build a hub cache by hand in the real layout (``models--owner--name/``
with ``blobs/`` named by content hash, ``snapshots/<commit>/`` linking to them and
``refs/main``), point ``HF_HUB_CACHE`` at it with ``HF_HUB_OFFLINE=1`` and resolve
the hub id through the real ``snapshot_download``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from diffeat.core.sources import extractor_cache_key
from diffeat.plugins import modelfiles
from diffeat.plugins.modelfiles import files_fingerprint, hub_origin
from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor
from diffeat.plugins.stable_diffusion.options import StableDiffusionOptions

COMMIT_A = "a" * 39 + "1"
COMMIT_B = "b" * 39 + "2"


def _snapshot(cache: Path, repo: str, commit: str, model: Path) -> Path:
    """``model``'s files as the hub cache holds them at ``commit``: blobs + links."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that ``snapshot_download`` reads, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path, full: bool | None = None) -> str:
        raise AssertionError(f"read {path} to fingerprint it")

    monkeypatch.setattr(modelfiles, "file_fingerprint", refuse)
    monkeypatch.setattr("diffeat.plugins.stable_diffusion.loading.file_fingerprint", refuse)


def _key(model: str) -> tuple[dict, str]:
    options = StableDiffusionOptions(model=model, device="cpu", ensemble_size=1)
    identity = StableDiffusionExtractor(options).model_identity()
    return identity, extractor_cache_key("stable-diffusion", options, identity)


def test_hub_origin_reads_the_repository_and_commit(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--some-name"
    for name in ("blobs", "refs"):
        (repo / name).mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT_A
    origin = hub_origin(snap / "unet" / "model.safetensors")
    assert origin is not None
    assert (origin.hub_id, origin.revision, origin.snapshot) == ("org/some-name", COMMIT_A, snap)
    assert origin.identity() == {
        "hub_id": "org/some-name",
        "revision": COMMIT_A,
        "subfolder": "unet/model.safetensors",
    }
    assert hub_origin(snap).identity() == {"hub_id": "org/some-name", "revision": COMMIT_A}
    # `..` is collapsed before the commit is read
    other = repo / "snapshots" / COMMIT_B
    assert hub_origin(snap / ".." / COMMIT_B).revision == COMMIT_B  # type: ignore[union-attr]
    assert hub_origin(other / ".." / ".." / ".." / "elsewhere") is None
    # no blobs/ and refs/: not a hub cache, whatever the folder names say
    assert hub_origin(tmp_path / "models--a--b" / "snapshots" / COMMIT_A) is None
    assert hub_origin(tmp_path / "models--org--name" / "snapshots" / "main") is None
    assert hub_origin(tmp_path / "datasets--org--name" / "snapshots" / COMMIT_A) is None
    assert hub_origin(tmp_path / "my-model" / "unet") is None


def test_hub_model_identity_is_the_commit_and_reads_no_weights(
    tiny_sd: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _snapshot(hub_cache, "x/y", COMMIT_A, tiny_sd)
    _no_reading(monkeypatch)
    identity, key = _key("x/y")
    assert identity["hub_id"] == "x/y"
    assert identity["revision"] == COMMIT_A
    assert "fingerprint" not in identity
    assert _key("x/y")[1] == key  # the same commit, the same key
    # the snapshot's folder given as a path is the same model
    assert _key(str(hub_cache / "models--x--y" / "snapshots" / COMMIT_A))[0] == identity


def test_two_commits_give_two_keys(
    tiny_sd: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _snapshot(hub_cache, "x/y", COMMIT_A, tiny_sd)
    first = _key("x/y")
    _snapshot(hub_cache, "x/y", COMMIT_B, tiny_sd)  # refs/main moves on; the same bytes
    _no_reading(monkeypatch)
    second = _key("x/y")
    assert second[0]["revision"] == COMMIT_B
    assert second[1] != first[1]
    # the old commit, given by its snapshot folder, keeps its identity
    old = _key(str(hub_cache / "models--x--y" / "snapshots" / COMMIT_A))[0]
    assert old == first[0]


def test_local_folder_keeps_the_sampled_fingerprint(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity, key = _key(str(tiny_sd))
    assert set(identity) >= {"model", "revision", "fingerprint"}
    assert "hub_id" not in identity
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd, copy)
    assert _key(str(copy))[0]["fingerprint"] == identity["fingerprint"]  # content, not place
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _key(str(copy))[0]["fingerprint"] != identity["fingerprint"]
    monkeypatch.setenv(modelfiles.FULL_HASH_ENV, "1")  # small files: the same either way
    assert _key(str(tiny_sd))[1] == key


def test_files_fingerprint_of_a_snapshot_is_its_commit_and_names(
    tiny_sd: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every extractor that fingerprints files (ViTs, ADM, DiT, the cross-attention
    matcher) gets the commit for files of a snapshot, without reading them."""
    snap_a = _snapshot(hub_cache, "x/y", COMMIT_A, tiny_sd)
    snap_b = _snapshot(hub_cache, "x/y", COMMIT_B, tiny_sd)
    _no_reading(monkeypatch)
    names = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    a = files_fingerprint([snap_a / n for n in names], snap_a)
    assert a == files_fingerprint([snap_a / n for n in reversed(names)], snap_a)
    assert a != files_fingerprint([snap_b / n for n in names], snap_b)
    assert a != files_fingerprint([snap_a / names[0]], snap_a)


def test_the_environment_points_a_fresh_process_at_the_cache(tiny_sd: Path, tmp_path: Path) -> None:
    """``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` as a user sets them, read by a new process."""
    import json
    import subprocess
    import sys

    cache = tmp_path / "hub"
    _snapshot(cache, "x/y", COMMIT_A, tiny_sd)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        "import json\n"
        "from diffeat.plugins.stable_diffusion.extractor import StableDiffusionExtractor as E\n"
        "from diffeat.plugins.stable_diffusion.options import StableDiffusionOptions as O\n"
        "print(json.dumps(E(O(model='x/y', device='cpu')).model_identity()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    identity = json.loads(done.stdout.strip().splitlines()[-1])
    assert identity["hub_id"] == "x/y" and identity["revision"] == COMMIT_A


def test_a_copied_or_edited_snapshot_is_fingerprinted_by_content(
    hub_cache: Path, tiny_sd: Path
) -> None:
    """Weights saved over a snapshot's links (or a snapshot copied with its links followed)
    are no longer the commit's files: the folder is hashed like any local folder."""
    snap = _snapshot(hub_cache, "org/tiny", COMMIT_A, tiny_sd)
    assert hub_origin(snap) is not None
    weights = next(snap.glob("unet/*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # a real file where the link was
    assert hub_origin(snap) is None
    identity, _ = _key(str(snap))
    assert "fingerprint" in identity and "hub_id" not in identity


def test_two_models_in_one_snapshot_get_different_identities(
    hub_cache: Path, tiny_sd: Path, tmp_path: Path
) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_sd, both / "v1")
    shutil.copytree(tiny_sd, both / "v2")
    snap = _snapshot(hub_cache, "org/multi", COMMIT_A, both)
    one, key_one = _key(str(snap / "v1"))
    two, key_two = _key(str(snap / "v2"))
    assert (one["subfolder"], two["subfolder"]) == ("v1", "v2") and key_one != key_two

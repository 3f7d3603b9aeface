"""Many workers, one store: ``--shard K/N`` partitions and Ray Data extraction.

The partition is checked against hand-computed answers (sha256 prefixes) and for
determinism across processes; the workers run as real ``diffeat extract``
processes (and a real local Ray cluster) on the tiny SD model, and every store
they fill is compared, array for array, with a single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import DIFFEAT, cli_env
from waiting import HANG_GUARD_S

from diffeat.core.datasets import ImageRef, LazyImages
from diffeat.core.errors import DiffeatError
from diffeat.core.images import as_input
from diffeat.core.pipeline import Pipeline
from diffeat.distributed import Shard, parse_shard, resolve_shard, select_shard, shard_of
from diffeat.store import FeatureStore
from diffeat.testing import smooth_texture

SCHEDULER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "JOB_COMPLETION_INDEX",
)


# -- the partition --------------------------------------------------------------------


def test_shard_of_known_answers():
    """sha256("a") = ca978112ca1bbdca..., sha256("b") = 3e23e8160039594a...: the shard is the
    first 8 bytes, big-endian, mod N."""
    assert shard_of("a", 4) == 0xCA978112CA1BBDCA % 4 == 2
    assert shard_of("a", 3) == 0xCA978112CA1BBDCA % 3 == 1
    assert shard_of("b", 7) == 0x3E23E8160039594A % 7
    # fixed content keys -> fixed shards, forever (a change here re-partitions every job)
    keys = ["a", "b", "c", "0123456789abcdef0123456789abcdef", "img-7"]
    assert [shard_of(k, 4) for k in keys] == [2, 2, 2, 2, 3]
    assert [shard_of(k, 3) for k in keys] == [1, 1, 2, 1, 1]
    assert all(shard_of(k, 1) == 0 for k in keys)


def test_shard_of_is_the_same_in_another_process():
    """Not Python's salted hash(): a process with another PYTHONHASHSEED agrees."""
    keys = [f"{i:032x}" for i in range(200)]
    code = (
        "import json, sys; from diffeat.distributed import shard_of; "
        "print(json.dumps([shard_of(k, 5) for k in json.load(sys.stdin)]))"
    )
    env = cli_env(PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(keys),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=HANG_GUARD_S,
    ).stdout
    assert json.loads(out) == [shard_of(k, 5) for k in keys]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_covering_and_balanced(count):
    keys = [f"{random.Random(i).getrandbits(128):032x}" for i in range(700)]
    owned = [{k for k in keys if Shard(i, count).owns(k)} for i in range(count)]
    assert set().union(*owned) == set(keys)
    assert sum(len(o) for o in owned) == len(keys)  # disjoint
    assert min(len(o) for o in owned) > 0.7 * len(keys) / count


def test_resolve_shard_from_flags_and_schedulers():
    assert resolve_shard(None, {}) is None
    assert resolve_shard("2/5", {}) == Shard(2, 5, "--shard")
    # torchrun: used even without --shard
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert resolve_shard(None, torchrun) == Shard(3, 4, "RANK/WORLD_SIZE")
    assert resolve_shard("auto", torchrun) == Shard(3, 4, "RANK/WORLD_SIZE")
    assert resolve_shard("1/2", torchrun) == Shard(1, 2)  # an explicit --shard wins
    # Slurm arrays, numbered from 0; a rerun of task 3 alone (count 1) needs auto/N
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert resolve_shard(None, slurm) is None  # only with --shard auto
    assert resolve_shard("auto", slurm) == Shard(5, 8, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    rerun = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "1"}
    assert resolve_shard("auto/8", rerun) == Shard(
        3, 8, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    )
    with pytest.raises(DiffeatError, match=r"number the array from 0 .*--shard auto/N"):
        resolve_shard("auto", rerun)
    # Kubernetes indexed jobs: the index from the environment, N from auto/N
    k8s = {"JOB_COMPLETION_INDEX": "6"}
    assert resolve_shard("auto/7", k8s) == Shard(6, 7, "JOB_COMPLETION_INDEX")
    with pytest.raises(DiffeatError, match=r"auto/N"):
        resolve_shard("auto", k8s)
    with pytest.raises(DiffeatError, match="disagrees"):
        resolve_shard("auto/3", torchrun)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3/3", "out of range"),
        ("-1/3", "out of range"),
        ("1/0", "out of range"),
        ("1-3", "write K/N"),
        ("a/3", "not a whole number"),
        ("auto", "found no scheduler variables"),
    ],
)
def test_bad_shard_specs_say_what_to_write(spec, message):
    with pytest.raises(DiffeatError, match=message):
        resolve_shard(spec, {})
    if spec != "auto":
        with pytest.raises(DiffeatError):
            parse_shard(spec)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Nine images: eight textures (one saved twice under another name) and an unreadable
    file."""
    d = tmp_path_factory.mktemp("photos")
    for i in range(7):
        smooth_texture((56 + 4 * i, 48), seed=10 + i).save(d / f"p{i}.png")
    shutil.copy(d / "p3.png", d / "same-as-p3.png")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def files_of(photos: Path) -> list[Path]:
    return sorted(photos.iterdir())


def test_select_shard_partitions_files_by_content(photos):
    files = files_of(photos)
    n = 3
    parts = [list(select_shard(files, Shard(k, n))) for k in range(n)]
    assert sorted(p for part in parts for p in part) == files  # disjoint and covering
    for k, part in enumerate(parts):
        for path in part:
            key = str(path) if path.name == "broken.png" else as_input(path).key
            assert shard_of(key, n) == k
    # the same pixels under two names go to one worker
    twin = [k for k, part in enumerate(parts) if photos / "p3.png" in part]
    assert [k for k, part in enumerate(parts) if photos / "same-as-p3.png" in part] == twin
    # the input order does not matter
    shuffled = files[::-1]
    assert [set(select_shard(shuffled, Shard(k, n))) for k in range(n)] == [set(p) for p in parts]
    # by path: the path string as given
    by_path = [list(select_shard(files, Shard(k, n), by="path")) for k in range(n)]
    assert sorted(p for part in by_path for p in part) == files
    assert all(shard_of(str(p), n) == k for k, part in enumerate(by_path) for p in part)
    # many inputs go through in bounded chunks, in input order
    names = [f"dir/{i:04d}.png" for i in range(300)]
    chunks = [list(select_shard(names, Shard(k, 4), by="path", threads=1)) for k in range(4)]
    assert sorted(x for c in chunks for x in c) == names
    assert all(c == sorted(c) and all(shard_of(x, 4) == k for x in c) for k, c in enumerate(chunks))


def test_select_shard_keeps_dataset_images_lazy(photos):
    refs = [ImageRef(p, "cat") for p in files_of(photos)]
    images = LazyImages(refs)
    part = select_shard(images, Shard(1, 2))

    def key(ref: ImageRef) -> str:
        return str(ref.path) if ref.path.name == "broken.png" else ref.load().key

    expected = [r for r in refs if shard_of(key(r), 2) == 1]
    assert [part.base.refs[i] for i in part.indices] == expected
    loaded = [part[i] for i in range(len(part))]
    assert all(getattr(x, "category", "cat") == "cat" for x in loaded)


def test_cli_rejects_bad_combinations(photos, tmp_path, capsys):
    from diffeat.cli.main import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[extractor]\nplugin = "stable-diffusion"\nmodel = "nowhere"\n')
    cases = [
        (["--shard", "1/2", "--ray"], "--shard and --ray both split the work"),
        ([f"--ray={photos}"], "write --ray=ADDRESS, or put --ray after INPUTS"),
        (["--ray-workers", "2"], "need --ray"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["extract", str(cfg), str(photos), "--store", str(tmp_path / "s"), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err


def test_ray_missing_is_a_clear_error(monkeypatch):
    from diffeat.distributed import ray_job

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(DiffeatError, match=r"pip install 'diffeat\[ray\]'"):
        ray_job.import_ray()


# -- real workers on the tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def config(tiny_sd, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    p.write_text(
        f'[extractor]\nplugin = "stable-diffusion"\nmodel = "{tiny_sd}"\n'
        'image_size = [64, 64]\nlayers = ["up_blocks.1", "up_blocks.2.resnets.0.conv2"]\n'
        "timesteps = [100, 300]\nensemble_size = 2\n"
    )
    return p


@pytest.fixture(scope="module")
def reference(config, photos, tmp_path_factory) -> tuple[Path, str]:
    """One process, every image: the store every distributed run must equal."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    pipe = Pipeline.from_file(config, store=path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): CPU kernels may round
    try:  # differently with another thread count, and the comparison is bit for bit
        report = pipe.extract(files_of(photos))
    finally:
        torch.set_num_threads(threads)
    assert report.failed and report.failed[0][0].endswith("broken.png")
    return path, pipe.cache_key


def assert_same_store(path: Path, reference: tuple[Path, str]) -> None:
    ref_path, key = reference
    ref, got = FeatureStore(ref_path, mode="r"), FeatureStore(path, mode="r")
    assert set(got.extractors()) == {key}
    entries = ref.entries(key)
    assert len(entries) == 7
    assert sorted(got.entries(key)) == sorted(entries)
    for image_key in entries:
        a, b = ref.get(key, image_key), got.get(key, image_key)
        assert a.layers.keys() == b.layers.keys()
        for name in a.layers:
            assert torch.equal(a.layers[name], b.layers[name]), (image_key, name)


def worker_env(**extra: str) -> dict[str, str]:
    env = cli_env(OMP_NUM_THREADS="1", **extra)
    for var in SCHEDULER_VARS:
        if var not in extra:
            env.pop(var, None)
    return env


@pytest.mark.slow
def test_sharded_cli_workers_fill_one_store(config, photos, reference, tmp_path, capsys):
    """Three real `diffeat extract` processes at once, each told its shard another way
    (--shard K/N, torchrun's RANK/WORLD_SIZE, a Kubernetes index with --shard auto/N),
    write disjoint entries that together equal one process's store; a rerun resumes."""
    store = tmp_path / "sharded.zarr"
    base = [DIFFEAT, "--quiet", "extract", str(config), str(photos), "--store", str(store)]
    runs = [
        (["--shard", "0/3"], worker_env()),
        ([], worker_env(RANK="1", WORLD_SIZE="3")),
        (["--shard", "auto/3"], worker_env(JOB_COMPLETION_INDEX="2")),
    ]
    procs = [
        subprocess.Popen(
            [*base, *extra, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for extra, env in runs
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode in (0, 2), err.decode()  # 2: the worker that owns broken.png
        reports.append(json.loads(out))
    assert [r["shard"]["index"] for r in reports] == [0, 1, 2]
    assert {r["shard"]["count"] for r in reports} == {3}
    # disjoint: no worker found another's entry; covering: every image once
    assert all(r["found"] == 0 for r in reports)
    assert sum(r["images"] for r in reports) == 9
    assert sum(r["computed"] + r["cached"] for r in reports) == 8
    failed = [f["image"] for r in reports for f in r["failed"]]
    assert [Path(f).name for f in failed] == ["broken.png"]
    assert_same_store(store, reference)

    # a rerun of one shard computes nothing (in this process: the CLI's code, no startup)
    from diffeat.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--quiet", "extract", str(config), str(photos), "--store", str(store)]
            + ["--shard", "1/3", "--json"]
        )
    assert exit_info.value.code in (0, 2)
    again = json.loads(capsys.readouterr().out)
    assert again["images"] == reports[1]["images"]
    assert again["computed"] == 0
    assert again["cached"] + len(again["failed"]) == again["images"]


# -- Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (starting one is slow): its address."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it
    address = os.environ.pop("RAY_ADDRESS", None)  # a cluster of our own, not one found
    try:
        context = ray.init(
            num_cpus=4,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
        yield context.address_info["address"]
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


@pytest.mark.slow
def test_ray_cli_equals_one_process(config, photos, reference, ray_cluster, tmp_path):
    """`diffeat extract --ray=ADDRESS` with two actors on a local cluster."""
    store = tmp_path / "ray.zarr"
    proc = subprocess.run(
        [
            DIFFEAT,
            "--quiet",
            "extract",
            str(config),
            str(photos),
            "--store",
            str(store),
            f"--ray={ray_cluster}",
            "--ray-workers",
            "2",
            "--ray-batch-size",
            "2",
            "--json",
        ],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 2, proc.stderr  # broken.png is reported, the rest extracted
    report = json.loads(proc.stdout)
    assert report["images"] == 9
    assert report["computed"] + report["cached"] + report["found"] == 8
    assert [Path(f["image"]).name for f in report["failed"]] == ["broken.png"]
    assert "not an image file" in report["failed"][0]["error"]
    assert_same_store(store, reference)


def crash_once_worker(marker: Path, pids: Path) -> type:
    """An ExtractWorker whose first batch anywhere stores one image, then kills its process.

    Defined in a function so that Ray pickles the class by value (workers cannot import
    this test module)."""
    from diffeat.distributed.ray_job import ExtractWorker

    class CrashOnce(ExtractWorker):
        def extract_batch(self, inputs):
            (pids / str(os.getpid())).touch()
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().extract_batch(inputs)
            os.close(fd)
            super().extract_batch(inputs[:1])
            os._exit(1)  # mid-batch: the rest of it is lost with the process

    return CrashOnce


@pytest.mark.slow
def test_ray_worker_killed_mid_job_still_fills_the_store(
    config, photos, reference, ray_cluster, tmp_path
):
    from diffeat.distributed import ray_extract

    marker, pids = tmp_path / "crashed", tmp_path / "pids"
    pids.mkdir()
    store = tmp_path / "killed.zarr"

    class Count:
        n = 0

        def update(self, n: int = 1) -> None:
            self.n += n

    progress = Count()
    report = ray_extract(
        config,
        files_of(photos),
        store,
        workers=2,
        batch_size=3,
        progress=progress,
        worker_class=crash_once_worker(marker, pids),
    )
    assert marker.exists()  # a worker did die
    # the crashed process's batch went on in another (the other actor, or its restart)
    assert len(list(pids.iterdir())) >= 2
    assert progress.n == 9
    assert report.total == 9
    assert [Path(f).name for f, _ in report.failed] == ["broken.png"]
    assert report.computed + report.cached + report.found == 8
    assert_same_store(store, reference)


def failing_worker() -> type:
    """An ExtractWorker whose batches fail with a user error (before any model runs)."""
    from diffeat.core.errors import StoreError
    from diffeat.distributed.ray_job import ExtractWorker

    class Failing(ExtractWorker):
        def extract_batch(self, inputs):
            raise StoreError("cannot write the store: check the store path on the workers")

    return Failing


@pytest.mark.slow
def test_ray_user_error_in_a_worker_reaches_the_caller(config, photos, ray_cluster, tmp_path):
    """A DiffeatError raised in an actor comes back as itself (the CLI prints its message)."""
    from diffeat.core.errors import StoreError
    from diffeat.distributed import ray_extract

    with pytest.raises(StoreError, match="check the store path on the workers") as info:
        ray_extract(
            config,
            files_of(photos)[:2],
            tmp_path / "s.zarr",
            workers=1,
            worker_class=failing_worker(),
        )
    assert "Traceback" not in str(info.value)


def test_torchrun_processes_take_their_own_gpu(monkeypatch):
    """LOCAL_RANK picks the current CUDA device (so device "auto" is this process's GPU)."""
    import diffeat.distributed.shard as shard_module

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert shard_module.bind_local_gpu({"LOCAL_RANK": "2"}) == 2
    assert shard_module.bind_local_gpu({"LOCAL_RANK": "6"}) == 2  # more processes than GPUs
    assert shard_module.bind_local_gpu({}) is None
    assert chosen == [2, 2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert shard_module.bind_local_gpu({"LOCAL_RANK": "0"}) is None


def test_ray_rows_carry_paths_categories_and_decoded_pixels(photos, monkeypatch):
    """What the Ray job's first two stages make of inputs (no cluster needed)."""
    from diffeat.distributed.ray_job import decode_row, image_items

    monkeypatch.chdir(photos.parent)
    relative = [Path(photos.name) / "p1.png", Path(photos.name) / "broken.png"]
    rows = image_items(relative)
    # "source" is what failures report, as given; the entry stores the absolute "path"
    assert [r["source"] for r in rows] == [str(p) for p in relative]
    assert [r["path"] for r in rows] == [str(photos / "p1.png"), str(photos / "broken.png")]
    refs = LazyImages([ImageRef(photos / "p2.png", "dog"), ImageRef(photos / "p0.png", "cat")])
    assert [(r["index"], r["category"]) for r in image_items(refs)] == [(0, "dog"), (1, "cat")]
    sub = select_shard(refs, Shard(0, 1))
    assert [r["category"] for r in image_items(sub)] == ["dog", "cat"]
    with pytest.raises(DiffeatError, match="pass its path"):
        image_items([smooth_texture((8, 8), seed=0)])

    good, bad = (decode_row(r) for r in rows)
    expected = as_input(photos / "p1.png")
    assert good["key"] == expected.key and good["error"] == ""
    assert good["pixels"] == expected.image.tobytes()
    assert (good["width"], good["height"]) == expected.image.size
    assert bad["key"] == "" and str(relative[1]) in bad["error"]
    assert str(photos) not in bad["error"]  # the message names the path as given

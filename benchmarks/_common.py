"""Helpers shared by the benchmark scripts: paths, memory and CPU measurement, timing, machine
facts, build markers of the random-weight models, synthetic inputs and output.

The scripts run as ``python benchmarks/bench_x.py``, so this folder is the first entry of
``sys.path`` and ``from _common import ...`` finds this module; ``benchmarks/`` is not a
package. Nothing here imports torch or diffeat at module level: ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the benchmarks folder, the repository's examples, and where builds and results go by default
ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT.parent / "examples"
OUT = ROOT / "out"
#: the file a finished model build writes last; a folder without it is rebuilt
MARKER = ".bench_complete.json"


# -- memory and CPU ------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _proc_meminfo_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """The resident set size of this process now (``VmRSS``, else psutil; None without both)."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """``VmHWM`` (resettable) where available, else ``ru_maxrss`` (whole process)."""
    kib = _proc_status_kib("VmHWM")
    return kib / 1024 if kib is not None else maxrss_mib()


def maxrss_mib() -> float:
    """The process-wide peak RSS (``ru_maxrss``), in MiB."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cuda_peaks(device: Any) -> dict[str, Any]:
    """``torch.cuda`` peak allocated / reserved MiB since the last reset and the GPU's name."""
    import torch

    return {
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "cuda_max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        "gpu": torch.cuda.get_device_name(device),
    }


# -- timing --------------------------------------------------------------------------------------


def device_sync(cuda: bool) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on CUDA (so a timing covers the device's work), else a no-op."""
    if cuda:
        import torch

        return torch.cuda.synchronize
    return lambda: None


def timed(fn: Callable[[], object]) -> float:
    """The wall seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Facts about the machine and the software a result was measured with."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_mib": _proc_meminfo_mib("MemTotal"),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
    }


# -- build markers of the random-weight models ---------------------------------------------------


def marker_complete(folder: Path, recipe: int) -> bool:
    """True when ``folder`` holds a finished build of recipe version ``recipe``."""
    try:
        return json.loads((folder / MARKER).read_text()).get("recipe") == recipe
    except (OSError, ValueError):
        return False


def fresh_folder(folder: Path) -> None:
    """An empty ``folder`` (a half-built one or an older recipe is removed first)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def write_marker(folder: Path, recipe: int, **facts: Any) -> None:
    """Mark ``folder`` as a finished build of ``recipe``, with ``facts`` (build_s, ...)."""
    marker = {"recipe": recipe, **facts}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def marker_facts(folder: Path) -> dict[str, Any]:
    """What the build of ``folder`` recorded in its marker (build_s, parameters, ...)."""
    return json.loads((folder / MARKER).read_text())


# -- inputs --------------------------------------------------------------------------------------


def synthetic_images(n: int, seed: int) -> list[Any]:
    """``n`` deterministic synthetic 640 x 480 images with seeds ``seed``, ``seed + 1``, ...
    (index 0 is the warm-up image)."""
    from diffeat.core.images import as_input
    from diffeat.testing import smooth_texture

    return [as_input(smooth_texture((640, 480), seed=seed + i, cells=12)) for i in range(n)]


# -- output --------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` for None."""
    return "-" if value is None else format(value, spec)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

"""Throughput of the ViT baselines at their preset resolutions, real-size architectures.

Each baseline runs its preset from ``examples/`` (extractor options as shipped: blocks, facet,
image size, resize rule) with the model swapped for the same architecture at full size with
*random* weights, built offline once into ``--model-dir`` (random weights cost the same FLOPs
as the real ones):

- ``dino-vitb8``: DINO ViT-B/8 (``ViTModel``, 86M parameters), 224 x 224 -> 28 x 28 tokens;
- ``dinov2-b14``: DINOv2 ViT-B/14 (``Dinov2Model``, 86M), 840 x 840 (pad) -> 60 x 60 tokens;
- ``openclip-vith14``: OpenCLIP ViT-H-14 (open_clip's own config; vision tower 632M, the whole
  CLIP 986M parameters stored as float16 to halve the file), 224 x 224 -> 16 x 16 tokens.

Per baseline: one untimed warm-up image, then ``--images`` timed ``extract`` calls on synthetic
640 x 480 images (preprocessing included), one image per call unless ``--batch-size``.
Reported: images/s, seconds per image, load time, the RSS after loading and the peak RSS of the
timed part (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; baselines run one after
the other in this process, so later peaks include what the allocator kept), the CPU
utilisation (CPU seconds / wall seconds) and the output layer's shape.

    python benchmarks/bench_baselines.py                      # CPU, fp32, 3 timed images each
    python benchmarks/bench_baselines.py --images 2 --only dino-vitb8 --json benchmarks/out/b.json
    python benchmarks/bench_baselines.py --device cuda --dtype float16 --images 50

A model folder is rebuilt when its ``.bench_complete.json`` marker is missing or stale.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_dift import cpu_seconds, peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402

EXAMPLES = ROOT.parent / "examples"
DEFAULT_MODEL_DIR = ROOT / "out" / "vit-random"
MARKER = ".bench_complete.json"
RECIPE_VERSION = 1
BASELINES = ("dino-vitb8", "dinov2-b14", "openclip-vith14")


# -- the models ----------------------------------------------------------------------------------


def dino_vitb8_config() -> dict[str, Any]:
    """``config.json`` of facebook/dino-vitb8 (ViT-B/8)."""
    return {
        "image_size": 224,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }


def dinov2_base_config() -> dict[str, Any]:
    """``config.json`` of facebook/dinov2-base (ViT-B/14, 518 px position grid)."""
    return {
        "image_size": 518,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "qkv_bias": True,
    }


def marker_complete(folder: Path, recipe: int = RECIPE_VERSION) -> bool:
    """True when ``folder`` holds a finished build of recipe version ``recipe``."""
    try:
        return json.loads((folder / MARKER).read_text()).get("recipe") == recipe
    except (OSError, ValueError):
        return False


def fresh_folder(folder: Path) -> None:
    """An empty ``folder`` (a half-built one is removed first)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def write_marker(folder: Path, recipe: int = RECIPE_VERSION, **facts: Any) -> None:
    """Mark ``folder`` as a finished build of ``recipe``, with ``facts`` (build_s, ...)."""
    marker = {"recipe": recipe, **facts}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def build_model(name: str, folder: Path) -> str:
    """Build ``name``'s architecture with random weights into ``folder`` (once); return the
    extractor's ``model`` value."""
    import torch

    if marker_complete(folder):
        return str(folder)
    start = time.perf_counter()
    fresh_folder(folder)
    torch.manual_seed(0)
    if name == "dino-vitb8":
        from transformers import ViTConfig, ViTModel

        model: Any = ViTModel(ViTConfig(**dino_vitb8_config()), add_pooling_layer=False)
        model.save_pretrained(folder, safe_serialization=True)
    elif name == "dinov2-b14":
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(**dinov2_base_config()))
        model.save_pretrained(folder, safe_serialization=True)
    elif name == "openclip-vith14":
        import open_clip
        from safetensors.torch import save_file

        cfg = open_clip.get_model_config("ViT-H-14")
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        local = {
            "model_cfg": cfg,
            "preprocess_cfg": {
                "mean": list(open_clip.OPENAI_DATASET_MEAN),
                "std": list(open_clip.OPENAI_DATASET_STD),
            },
        }
        (folder / "open_clip_config.json").write_text(json.dumps(local, indent=2) + "\n")
    else:
        raise ValueError(name)
    params = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    write_marker(folder, parameters=params, build_s=seconds)
    print(f"[{name}] built {params / 1e6:.0f}M parameters in {seconds:.0f} s", file=sys.stderr)
    return str(folder)


# -- measuring -----------------------------------------------------------------------------------


def bench_images(n: int) -> list[Any]:
    from diffeat.core.images import as_input
    from diffeat.testing import smooth_texture

    return [as_input(smooth_texture((640, 480), seed=2000 + i, cells=12)) for i in range(n)]


def run_baseline(name: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from diffeat.core.config import load_config

    overrides = [
        f"extractor.model={json.dumps(model)}",
        f"extractor.device={json.dumps(args.device)}",
        f"extractor.dtype={json.dumps(args.dtype)}",
        f"extractor.batch_size={args.batch_size}",
    ]
    cfg = load_config(EXAMPLES / f"{name}.toml", overrides)
    ex = cfg.extractor.build()
    cuda = ex.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    _ = ex.model
    load_s = time.perf_counter() - start
    gc.collect()
    rss_loaded = rss_mib()
    log(f"loaded in {load_s:.1f} s, RSS {rss_loaded or 0:.0f} MiB")
    b = args.batch_size
    images = bench_images(b * (args.images + 1))
    sync()
    t = time.perf_counter()
    ex.extract(images[:b])
    sync()
    warmup_s = time.perf_counter() - t
    log(f"warm-up: {warmup_s:.2f} s")
    gc.collect()
    peak_ok = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_call, shape = [], None
    cpu0 = cpu_seconds()
    for i in range(args.images):
        chunk = images[b * (i + 1) : b * (i + 2)]
        sync()
        t = time.perf_counter()
        fs = ex.extract(chunk)
        sync()
        per_call.append(time.perf_counter() - t)
        layer = next(iter(fs[0].layers.values()))
        shape = list(layer.shape)
        log(f"call {i + 1}/{args.images}: {per_call[-1]:.2f} s ({b} image(s)), {shape}")
    total = sum(per_call)
    n_images = b * len(per_call)
    result: dict[str, Any] = {
        "baseline": name,
        "options": {k: v for k, v in cfg.extractor.resolved().items() if k != "model"},
        "device": str(ex.device),
        "torch_threads": torch.get_num_threads(),
        "images": n_images,
        "images_per_s": n_images / total,
        "seconds_per_image": total / n_images,
        "seconds_per_call": per_call,
        "warmup_s": warmup_s,
        "load_s": load_s,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_timed_mib": peak_rss_mib() if peak_ok else None,
        "cpu_busy": (cpu_seconds() - cpu0) / total,
        "layer": [i.to_dict() for i in ex.layers()],
        "layer_shape": shape,
    }
    if cuda:
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        result["gpu"] = torch.cuda.get_device_name(ex.device)
    del ex
    gc.collect()
    return result


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="timed extract calls per baseline")
    p.add_argument("--batch-size", type=int, default=1, help="images per extract call")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--only", nargs="+", choices=BASELINES, default=list(BASELINES))
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffeat.plugins.modelfiles import quiet_transformers

    quiet_transformers()
    results = {}
    for name in args.only:
        model = build_model(name, args.model_dir / name)
        results[name] = run_baseline(name, model, args)

    cuda = any("cuda_max_allocated_mib" in r for r in results.values())
    print(
        f"{'baseline':<17}{'input':>10}{'grid':>9}{'channels':>9}{'images':>7}{'s/image':>9}"
        f"{'images/s':>10}{'load s':>8}{'peak RSS':>11}{'CPU busy':>9}"
        + (f"{'CUDA peak':>12}" if cuda else "")
    )
    for name, r in results.items():
        w, h = r["options"]["image_size"]
        _, c, gh, gw = r["layer_shape"]
        peak = r["peak_rss_timed_mib"]
        print(
            f"{name:<17}{f'{w}x{h}':>10}{f'{gw}x{gh}':>9}{c:>9}{r['images']:>7}"
            f"{r['seconds_per_image']:>9.{4 if cuda else 2}f}{r['images_per_s']:>10.3f}{r['load_s']:>8.1f}"
            f"{'-' if peak is None else f'{peak:.0f} MiB':>11}{r['cpu_busy']:>9.2f}"
            + (f"{r.get('cuda_max_allocated_mib', 0):>8.0f} MiB" if cuda else "")
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"machine": machine(), "args": {**vars(args), "model_dir": str(args.model_dir)}}
        out["args"]["json"] = str(args.json)
        out["results"] = results
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

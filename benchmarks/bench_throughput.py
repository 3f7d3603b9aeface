"""Images/s of one device: the bare batched extractor, ``diffeat extract``'s path, and one
image per call, with FLOPs per image and the ratio to the card's arithmetic peak.

Models (random weights, built offline once; random weights cost the FLOPs of real ones):

- ``dift``: the DIFT SD 1.5 semantic preset (``examples/dift-sd15.toml``: ``up_blocks.1``,
  t = 261, ensemble 8) at 512 px. ``--size real``: SD 1.5 at full size
  (``benchmarks/out/sd15-random``, shared with ``bench_dift.py``); ``--size reduced``: the same
  block structure at a quarter of the channels, a small text encoder, 128 px
  (``benchmarks/out/sd15-quarter``), for CPU ratios;
- ``dinov2``: DINOv2 ViT-B/14 (``examples/dinov2-b14.toml``) at 840 px padded (``real``) or
  224 px (``reduced``), the full-size architecture (``benchmarks/out/vit-random/dinov2-b14``).

Variants, each timed over ``--images`` new synthetic images (640 x 480, written as PNG files for
the two store variants) after one untimed warm-up batch:

- ``per-image``: ``extractor.extract([image])``, one image per call (the figure ``bench_dift.py``
  and ``bench_baselines.py`` report: 26.6 images/s for DIFT fp16 and 46.7 for DINOv2 fp16 on an
  H200);
- ``store-per-image``: ``Pipeline.extract`` of image files into a feature store as before
  batching: one image per call, decoding in the main process, each entry written before the
  next image (``ExtractSettings(batch_size=1, workers=0, write_queue_mb=0)``);
- ``bare-batched``: ``extractor.extract_preprocessed`` on ``--batch-size`` images whose pixels
  are already on the device: the model alone, the upper bound;
- ``extract``: ``diffeat extract``'s path (``Pipeline.extract`` of image files with
  ``ExtractSettings(--batch-size, --workers)``: decoding and preprocessing in worker
  processes, pinned non-blocking copies, the background writer), into a feature store.

Goals of issue 14 (on a GPU): ``extract`` / ``per-image`` >= 2.5 (DIFT) and >= 4 (DINOv2);
``extract`` / ``bare-batched`` >= 0.9. FLOPs per image are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one batch of the bare extractor (convolutions,
matrix products and attention; elementwise work is not counted) and set against
``--peak-tflops`` (default on an H100/H200: 989 TFLOP/s, NVIDIA's dense fp16/bf16 tensor-core
figure for the H200 SXM; fp32 without TF32 is 67). ``--flops-only`` counts on the meta device
(no weights, no compute): the real-size figures on any machine in seconds.

    python benchmarks/bench_throughput.py                            # CPU: reduced sizes, ~2 min
    python benchmarks/bench_throughput.py --flops-only --size real   # FLOPs/image at real size
    python benchmarks/bench_throughput.py --device cuda --dtype float16 --size real \\
        --batch-size 8 --workers 6 --images 64 --json benchmarks/out/throughput_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    EXAMPLES,
    OUT,
    cuda_peaks,
    device_sync,
    fresh_folder,
    machine_info,
    marker_complete,
    write_json,
    write_marker,
)
from _models import SD15_DIR, VIT_DIR, build_sd15_random, build_vit, sd15_is_complete

#: NVIDIA's dense (no sparsity) tensor-core peak of the H100 / H200 SXM in TFLOP/s, by dtype
PEAK_TFLOPS_H200 = {"float16": 989.4, "bfloat16": 989.4, "float32": 66.9}
SD15_QUARTER_DIR = OUT / "sd15-quarter"
SD15_QUARTER_RECIPE = 1
MODELS = ("dift", "dinov2")
VARIANTS = ("per-image", "store-per-image", "bare-batched", "extract")
#: the seed of the first synthetic image; each variant takes new images (new store keys)
IMAGE_SEED = 5000


def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


# -- models ---------------------------------------------------------------------------------------


def build_sd15_quarter(folder: Path) -> Path:
    """SD 1.5's block structure at a quarter of the channels (UNet 80-160-320-320, VAE
    32-64-128-128), a 4-layer 256-wide text encoder; built once."""
    if marker_complete(folder, SD15_QUARTER_RECIPE):
        return folder
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffeat.testing.sd import (
        EOS_TOKEN,
        save_stable_diffusion,
        sd_unet_config,
        tiny_scheduler_config,
        write_clip_tokenizer,
    )

    fresh_folder(folder)
    tok = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(folder / "tokenizer", pad_token=EOS_TOKEN)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            **sd_unet_config(
                block_out_channels=(80, 160, 320, 320),
                norm_num_groups=16,
                cross_attention_dim=256,
                attention_head_dim=8,
                use_linear_projection=False,
                sample_size=32,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=256,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=256,
                intermediate_size=1024,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
    save_stable_diffusion(
        folder, unet, vae, text, tok, DDIMScheduler(**tiny_scheduler_config("epsilon"))
    )
    write_marker(folder, SD15_QUARTER_RECIPE)
    return folder


def sd15_configs(folder: Path) -> Path:
    """SD 1.5's component configs, tokenizer and scheduler without weights (``--flops-only``)."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    from diffeat.testing.sd import EOS_TOKEN, tiny_scheduler_config, write_clip_tokenizer

    from _models import sd15_text_config, sd15_unet_config, sd_vae_config

    fresh_folder(folder)
    tok = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(folder / "tokenizer", pad_token=EOS_TOKEN)
    )
    configs = {
        "unet": sd15_unet_config(),
        "vae": sd_vae_config(),
        "text_encoder": sd15_text_config(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
    }
    for sub, config in configs.items():
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
    DDIMScheduler(**tiny_scheduler_config("epsilon")).save_pretrained(folder / "scheduler")
    return folder


def model_config(name: str, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The preset file and overrides of ``name`` at ``args.size`` (building the model)."""
    real = args.size == "real"
    common = [
        f"extractor.device={json.dumps(args.device)}",
        f"extractor.dtype={json.dumps(args.dtype)}",
        f"extractor.compile={json.dumps(args.compile)}",
    ]
    if name == "dift":
        if real and args.flops_only and not sd15_is_complete(args.sd_dir):
            folder, size = sd15_configs(OUT / "sd15-configs"), 512
        elif real:
            if not sd15_is_complete(args.sd_dir):
                log(f"building SD 1.5 (random weights) into {args.sd_dir}")
                build_sd15_random(args.sd_dir)
            folder, size = args.sd_dir, 512
        else:
            folder, size = build_sd15_quarter(args.sd_quarter_dir), 128
        over = [
            f"extractor.model={json.dumps(str(folder))}",
            f"extractor.image_size=[{size}, {size}]",
            f"extractor.channels_last={json.dumps(args.channels_last)}",
        ]
        return EXAMPLES / "dift-sd15.toml", over + common
    folder = Path(build_vit("dinov2-b14", args.vit_dir / "dinov2-b14"))
    size = 840 if real else 224
    over = [f"extractor.model={json.dumps(str(folder))}", f"extractor.image_size=[{size}, {size}]"]
    return EXAMPLES / "dinov2-b14.toml", over + common


# -- FLOPs ----------------------------------------------------------------------------------------


def count_flops(ex: Any, images: list[Any], pixels: Any) -> int:
    """FLOPs of one ``extract_preprocessed`` call (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        ex.extract_preprocessed(images, pixels)
    return int(counter.get_total_flops())


def flops_on_meta(name: str, args: argparse.Namespace) -> float:
    """FLOPs per image of the preset at ``args.size`` counted on the meta device: the model is
    built from its config without weights and runs shapes only."""
    import torch

    from diffeat.core.config import load_config
    from diffeat.core.images import as_input
    from diffeat.testing import smooth_texture

    preset, over = model_config(name, args)
    over = [o for o in over if not o.startswith(("extractor.device", "extractor.compile"))]
    cfg = load_config(preset, [*over, 'extractor.device="cpu"'])
    ex = cfg.extractor.build()
    meta = torch.device("meta")
    if name == "dift":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from diffeat.plugins.stable_diffusion.loading import StableDiffusionParts

        folder = ex.folder
        with meta:
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        with meta:
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_pretrained(folder / "scheduler")
        # indexing the noise schedule by a meta timestep needs a value: keep the shapes only
        # (add_noise is elementwise, which the counter does not count anyway)
        sched.add_noise = lambda latents, noise, t: latents + noise
        ex._parts = StableDiffusionParts(unet.eval(), vae.eval(), text.eval(), tok, sched, folder)
        ex.dtype = getattr(torch, args.dtype)
    else:
        from transformers import Dinov2Config, Dinov2Model

        with meta:
            model = Dinov2Model(Dinov2Config.from_pretrained(ex.folder)).eval()
        ex._model = model
    ex.device = meta
    images = [as_input(smooth_texture((640, 480), seed=1))]
    pixels = torch.stack([ex.preprocessor()(im) for im in images])
    with torch.no_grad():
        return float(count_flops(ex, images, pixels.to(meta)))


# -- measuring ------------------------------------------------------------------------------------


def image_files(folder: Path, n: int, seed: int) -> list[Path]:
    from diffeat.testing import smooth_texture

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{seed + i}.png"
        smooth_texture((640, 480), seed=seed + i, cells=12).save(p)
        paths.append(p)
    return paths


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from diffeat.core.config import load_config
    from diffeat.core.images import as_input
    from diffeat.core.pipeline import ExtractSettings, Pipeline
    from diffeat.store import FeatureStore

    preset, over = model_config(name, args)
    cfg = load_config(preset, over)
    pipe = Pipeline(cfg, store=FeatureStore(work / f"{name}.zarr"))
    ex = pipe.extractor
    cuda = ex.device.type == "cuda"
    sync = device_sync(cuda)
    b, n = args.batch_size, args.images
    n = max(b, n // b * b)  # whole batches
    seed = IMAGE_SEED
    t = time.perf_counter()
    warm = [as_input(p) for p in image_files(work / f"{name}-warm", b, seed)]
    seed += b
    ex.extract(warm)  # loads the model; the first batch of the batch shape
    pixels = torch.stack([ex.preprocessor()(im) for im in warm]).to(ex.device)
    sync()
    flops = count_flops(ex, warm, pixels) / b
    log(f"{name}: loaded and warmed up in {time.perf_counter() - t:.1f} s")
    settings = {
        "store-per-image": ExtractSettings(batch_size=1, workers=0, write_queue_mb=0),
        "extract": ExtractSettings(batch_size=b, workers=args.workers),
    }
    results: dict[str, dict[str, Any]] = {v: {"seconds": 0.0, "images": 0} for v in args.variants}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for round_ in range(args.rounds):
        for variant in args.variants:
            files = image_files(work / f"{name}-{variant}-{round_}", n, seed)
            seed += n
            if variant in ("per-image", "bare-batched"):
                inputs = [as_input(p) for p in files]
            if variant == "bare-batched":
                batches = []
                for i in range(0, n, b):
                    chunk = inputs[i : i + b]
                    px = torch.stack([ex.preprocessor()(im) for im in chunk]).to(ex.device)
                    batches.append((chunk, px))
            gc.collect()
            sync()
            t = time.perf_counter()
            if variant == "per-image":
                for im in inputs:
                    ex.extract([im])
            elif variant == "bare-batched":
                for chunk, px in batches:
                    ex.extract_preprocessed(chunk, px)
            else:
                report = pipe.extract(files, settings=settings[variant])
                assert report.computed == n and not report.failed, report
            sync()
            dt = time.perf_counter() - t
            results[variant]["seconds"] += dt
            results[variant]["images"] += n
            results[variant].setdefault("images_per_s_rounds", []).append(n / dt)
            log(f"{name} {variant} round {round_ + 1}: {n / dt:.3f} images/s")
    for r in results.values():
        r["images_per_s_overall"] = r["images"] / r["seconds"]
        # the best round: on a shared machine the slow rounds measure the neighbours
        r["images_per_s"] = max(r["images_per_s_rounds"])
    out: dict[str, Any] = {
        "options": {k: v for k, v in cfg.extractor.resolved().items() if k != "model"},
        "device": str(ex.device),
        "batch_size": b,
        "workers": args.workers,
        "variants": results,
        "flops_per_image": flops,
    }
    rate = {v: r["images_per_s"] for v, r in results.items()}
    if "per-image" in rate:
        out["ratios_to_per_image"] = {v: rate[v] / rate["per-image"] for v in rate}
    if "bare-batched" in rate and "extract" in rate:
        out["extract_over_bare"] = rate["extract"] / rate["bare-batched"]
    peak = args.peak_tflops
    if peak:
        out["peak_tflops"] = peak
        out["share_of_peak"] = {v: rate[v] * flops / (peak * 1e12) for v in rate}
    if cuda:
        out.update(cuda_peaks(ex.device))
    del pipe, ex
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument(
        "--size",
        choices=["real", "reduced"],
        default=None,
        help="real: the presets' models and sizes; reduced: small (default on CPU)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: float16 on CUDA, float32 on the CPU",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CUDA, 4 on CPU")
    p.add_argument("--workers", type=int, default=None, help="default: 6 on CUDA, 1 on CPU")
    p.add_argument("--images", type=int, default=None, help="timed images per variant and round")
    p.add_argument("--rounds", type=int, default=1, help="rounds of all variants (interleaved)")
    p.add_argument("--compile", action="store_true", help="the extractors' compile option")
    p.add_argument("--channels-last", action="store_true", help="SD's channels_last option")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the card's peak TFLOP/s in --dtype (default: H100/H200 figures on those "
        "cards, none elsewhere)",
    )
    p.add_argument("--flops-only", action="store_true", help="count FLOPs/image on the meta device")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--sd-dir", type=Path, default=SD15_DIR)
    p.add_argument("--sd-quarter-dir", type=Path, default=SD15_QUARTER_DIR)
    p.add_argument("--vit-dir", type=Path, default=VIT_DIR)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from diffeat.plugins.modelfiles import quiet_transformers

    quiet_transformers()
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("real" if cuda else "reduced")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.workers = args.workers if args.workers is not None else (6 if cuda else 1)
    args.images = args.images or (64 if cuda else 8)
    info = machine_info()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_tflops is None and cuda:
        gpu = torch.cuda.get_device_name(0)
        if "H100" in gpu or "H200" in gpu:
            args.peak_tflops = PEAK_TFLOPS_H200[args.dtype]
    out: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.flops_only:
        out["flops_per_image"] = {m: flops_on_meta(m, args) for m in args.models}
        for m, f in out["flops_per_image"].items():
            line = f"{m}: {f / 1e12:.3f} TFLOP per image ({args.size} size)"
            if args.peak_tflops:
                line += f"; at most {args.peak_tflops * 1e12 / f:.0f} images/s at {args.peak_tflops} TFLOP/s"
            print(line)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
        try:
            out["results"] = {}
            for m in args.models:
                out["results"][m] = run_model(m, args, work)
                if args.json:  # after each model: a run cut short keeps what it measured
                    write_json(args.json, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"{'model':<8}{'variant':<17}{'images/s':>10}{'x per-image':>13}{'of peak':>9}")
        for m, r in out["results"].items():
            for v, res in r["variants"].items():
                ratio = r.get("ratios_to_per_image", {}).get(v)
                share = r.get("share_of_peak", {}).get(v)
                print(
                    f"{m:<8}{v:<17}{res['images_per_s']:>10.3f}"
                    f"{'-' if ratio is None else f'{ratio:.2f}':>13}"
                    f"{'-' if share is None else f'{share:.1%}':>9}"
                )
            print(
                f"{m:<8}FLOPs/image {r['flops_per_image'] / 1e9:.1f} GFLOP; extract / bare-batched "
                f"{r.get('extract_over_bare', float('nan')):.3f}"
            )
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

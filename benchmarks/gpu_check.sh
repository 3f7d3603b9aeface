#!/usr/bin/env bash
# One-shot GPU benchmark run on a bare machine (torch with CUDA present, no internet).
#
# Run from the repository root:   bash benchmarks/gpu_check.sh
#
# - installs the wheels in .whl/ that the machine lacks (diffusers, zarr, numcodecs,
#   open_clip_torch, timm, ... : `python3 -m pip download` them beforehand, see below)
#   into /tmp/site and puts /tmp/site and src/ on PYTHONPATH (diffeat is not installed);
# - builds the random-weight models (benchmarks/out/, git-ignored; reused when present);
# - runs, each under its own `timeout` and within an overall budget (GPU_CHECK_BUDGET,
#   default 540 s, counted from the start of this script):
#     dift16   bench_dift.py fp16           -> $OUT/dift_cuda_fp16.json
#     hyper    bench_hyperfeatures.py fp16  -> $OUT/hyperfeatures_cuda.json  (if the file exists)
#     base32   bench_baselines.py fp32      -> $OUT/baselines_cuda_fp32.json
#     base16   bench_baselines.py fp16      -> $OUT/baselines_cuda_fp16.json
#     dift32   bench_dift.py fp32           -> $OUT/dift_cuda_fp32.json
#     sddino   bench_sd_dino.py: the SD-DINO preset end to end (captioner on / off fp32,
#              captioner on fp16), s/pair, stages, CUDA peak -> $OUT/sd_dino_cuda.json
#              (builds a random CLIP ViT-L-14-336 + captioner into $GPU_CHECK_MODELS/sd-dino-random
#              and DINOv2-B/14 into vit-random/dinov2-b14 when base32 has not)
#     throughput bench_throughput.py: DIFT SD 1.5 512 px ensemble 8 and DINOv2 B/14 840 px, fp16:
#              one image per call vs the bare batched extractor vs `diffeat extract`'s path
#              (--batch-size, --workers), FLOPs/image and share of the peak
#              -> $OUT/throughput_cuda_fp16.json
#     hedlin   bench_hedlin.py: the cross-attention matcher (Hedlin et al.) on SD 1.5 at 512 px,
#              batched vs one (point, restart, crop) per UNet call, same seed, 2 points,
#              HEDLIN_STEPS (32) of the official 129 steps (the ratio does not depend on them)
#              -> $OUT/hedlin_cuda.json
#     hedlinvar bench_hedlin_variants.py: the matcher's result-changing speed-ups (restarts 2 / 1,
#              crops 8 / 4, float16, bfloat16, a crop bank, all combined) against the official
#              recipe on SD 1.5 at 512 px, 2 synthetic pairs x 1 point, HEDLIN_STEPS (32) steps:
#              s/point and agreement with the official points -> $OUT/hedlin_variants_cuda.json
#   all output goes to $OUT/gpu_log.txt too; a summary of the JSON files ends the log.
#
# Environment (all optional): OUT (default benchmarks/out/gpu), PYTHON (python3),
# GPU_CHECK_DEVICE (cuda), GPU_CHECK_BUDGET (540), GPU_CHECK_STEPS (the step order above),
# DIFT16_IMAGES (30), DIFT32_IMAGES (15), BASE_IMAGES (30), TP_IMAGES (64), TP_BATCH (8),
# TP_WORKERS (6), TP_EXTRA (e.g. "--channels-last", or "--compile --variants bare-batched extract"), HYPER_DTYPE (float16), SDDINO_PAIRS (10),
# DIFT_EXTRA / BASE_EXTRA / HYPER_EXTRA / SDDINO_EXTRA (extra arguments), GPU_CHECK_SITE (/tmp/site),
# GPU_CHECK_MODELS (benchmarks/out).
#
# The wheels (x86-64, CPython 3.12), fetched where the index is reachable:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl NAME==VERSION ...
set -uo pipefail

START=$SECONDS
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-540}
STEPS=${GPU_CHECK_STEPS:-"throughput dift16 hedlin hyper base32 base16 dift32 sddino hedlinvar"}
SITE=${GPU_CHECK_SITE:-/tmp/site}
MODELS=${GPU_CHECK_MODELS:-benchmarks/out}
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
: >"$LOG"

log() { echo "$@" | tee -a "$LOG"; }
elapsed() { echo $((SECONDS - START)); }

# run_step NAME CAP_S COMMAND...: run under `timeout`, at most CAP_S and what the budget leaves
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 5))
    if ((left < 30)); then
        log "=== [$name] SKIPPED: only ${left} s of the ${BUDGET} s budget left"
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    log ""
    log "=== [$name] start at $(elapsed) s, limit ${limit} s: $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status="ok"
    if ((rc == 124 || rc == 137)); then status="TIMED OUT"; elif ((rc != 0)); then status="FAILED"; fi
    log "=== [$name] $status (rc $rc) after $((SECONDS - t0)) s; total $(elapsed) s"
    return 0
}

log "=== gpu_check.sh: $(date -u +%FT%TZ); repo $(pwd); OUT=$OUT; budget ${BUDGET} s; steps: $STEPS"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/git HEAD /' | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"
log "--- CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); $(grep MemTotal /proc/meminfo)"
df -h /tmp . 2>&1 | tee -a "$LOG"

# -- wheels: install only the distributions the machine does not have ---------------------
export PIP_DISABLE_PIP_VERSION_CHECK=1
if compgen -G ".whl/*.whl" >/dev/null; then
    mapfile -t NEED < <("$PY" - .whl/*.whl 2>>"$LOG" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path
for whl in sys.argv[1:]:
    dist, version = Path(whl).name.split("-")[:2]
    try:
        have = metadata.version(dist)
        print(f"have {dist} {have} (wheel {version} not installed)", file=sys.stderr)
    except metadata.PackageNotFoundError:
        print(whl)
EOF
    )
    log "--- installing ${#NEED[@]} wheel(s) into $SITE: ${NEED[*]:-none}"
    if ((${#NEED[@]})); then
        mkdir -p "$SITE"
        if ! timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${NEED[@]}" 2>&1 | tee -a "$LOG"; then
            log "--- pip failed; unpacking the wheels instead"
            for w in "${NEED[@]}"; do "$PY" -m zipfile -e "$w" "$SITE" 2>&1 | tee -a "$LOG"; done
        fi
    fi
else
    log "--- no .whl/ folder: using the installed packages only"
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

timeout 180 "$PY" - 2>&1 <<'EOF' | tee -a "$LOG"
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cudnn", torch.backends.cudnn.version(),
      "tf32 matmul/cudnn", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"cc {p.major}.{p.minor}")
for mod in ("torchvision", "transformers", "huggingface_hub", "diffusers", "safetensors", "numpy",
            "zarr", "numcodecs", "open_clip", "timm", "PIL"):
    try:
        m = __import__(mod)
        print(f"{mod:16} {getattr(m, '__version__', '?'):12} {m.__file__}")
    except Exception as exc:
        print(f"{mod:16} IMPORT FAILED: {type(exc).__name__}: {exc}")
import diffeat.cli.main  # noqa: F401
import diffeat
print("diffeat", diffeat.__file__)
EOF

# -- models (random weights of the real sizes; reused when complete) ----------------------
SD15="$MODELS/sd15-random"
if [ -f "$SD15/.bench_complete.json" ]; then
    log "--- $SD15: built already"
else
    run_step build-sd15 180 "$PY" benchmarks/bench_dift.py --model-dir "$SD15" --build-only
fi

# -- the benchmarks ---------------------------------------------------------------------
for step in $STEPS; do
    case $step in
    dift16)
        run_step dift16 170 "$PY" benchmarks/bench_dift.py --model-dir "$SD15" --device "$DEVICE" \
            --dtype float16 --images "${DIFT16_IMAGES:-30}" ${DIFT_EXTRA:-} \
            --json "$OUT/dift_${DEVICE%%:*}_fp16.json" ;;
    dift32)
        run_step dift32 180 "$PY" benchmarks/bench_dift.py --model-dir "$SD15" --device "$DEVICE" \
            --dtype float32 --images "${DIFT32_IMAGES:-15}" ${DIFT_EXTRA:-} \
            --json "$OUT/dift_${DEVICE%%:*}_fp32.json" ;;
    base32)
        run_step base32 170 "$PY" benchmarks/bench_baselines.py --model-dir "$MODELS/vit-random" \
            --device "$DEVICE" --dtype float32 --images "${BASE_IMAGES:-30}" ${BASE_EXTRA:-} \
            --json "$OUT/baselines_${DEVICE%%:*}_fp32.json" ;;
    base16)
        run_step base16 120 "$PY" benchmarks/bench_baselines.py --model-dir "$MODELS/vit-random" \
            --device "$DEVICE" --dtype float16 --images "${BASE_IMAGES:-30}" ${BASE_EXTRA:-} \
            --json "$OUT/baselines_${DEVICE%%:*}_fp16.json" ;;
    hyper)
        if [ -f benchmarks/bench_hyperfeatures.py ]; then
            HYPER_MODEL=()  # the SD 1.5 folder bench_dift.py built, where the script takes one
            grep -q -- '--model-dir' benchmarks/bench_hyperfeatures.py && HYPER_MODEL=(--model-dir "$SD15")
            run_step hyper 180 "$PY" benchmarks/bench_hyperfeatures.py "${HYPER_MODEL[@]}" \
                --device "$DEVICE" --dtype "${HYPER_DTYPE:-float16}" ${HYPER_EXTRA:-} \
                --json "$OUT/hyperfeatures_${DEVICE%%:*}.json"
        else
            log "=== [hyper] skipped: benchmarks/bench_hyperfeatures.py does not exist"
        fi ;;
    sddino)
        run_step sddino 240 "$PY" benchmarks/bench_sd_dino.py --device "$DEVICE" \
            --sd-dir "$SD15" --dino-dir "$MODELS/vit-random/dinov2-b14" \
            --model-dir "$MODELS/sd-dino-random" --pairs "${SDDINO_PAIRS:-10}" ${SDDINO_EXTRA:-} \
            --json "$OUT/sd_dino_${DEVICE%%:*}.json" ;;
    throughput)
        run_step throughput 300 "$PY" benchmarks/bench_throughput.py --device "$DEVICE" \
            --dtype float16 --size real --sd-dir "$SD15" --vit-dir "$MODELS/vit-random" \
            --batch-size "${TP_BATCH:-8}" --workers "${TP_WORKERS:-6}" --images "${TP_IMAGES:-64}" \
            ${TP_EXTRA:-} --json "$OUT/throughput_${DEVICE%%:*}_fp16.json" ;;
    hedlin)
        run_step hedlin 240 "$PY" benchmarks/bench_hedlin.py --device "$DEVICE" --sd-dir "$SD15" \
            --points 2 --steps "${HEDLIN_STEPS:-32}" --json "$OUT/hedlin_${DEVICE%%:*}.json" ;;
    hedlinvar)
        run_step hedlinvar 240 "$PY" benchmarks/bench_hedlin_variants.py --model sd15 \
            --sd-dir "$SD15" --device "$DEVICE" --pairs 2 --points 1 --steps "${HEDLIN_STEPS:-32}" \
            --json "$OUT/hedlin_variants_${DEVICE%%:*}.json" ;;
    *) log "=== unknown step $step (known: throughput dift16 hedlin hedlinvar dift32 base32 base16 hyper sddino)" ;;
    esac
done

# -- summary ------------------------------------------------------------------------------
log ""
log "=== summary (total $(elapsed) s)"
timeout 60 "$PY" - "$OUT" 2>&1 <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path

def mib(v):
    return "-" if v is None else f"{v:.0f} MiB"

for f in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        d = json.loads(f.read_text())
    except ValueError as exc:
        print(f"{f.name}: unreadable ({exc})")
        continue
    res = d.get("results")
    print(f"{f.name}:")
    if isinstance(res, dict) and f.name.startswith("throughput"):
        for model, r in res.items():
            share = r.get("share_of_peak", {})
            for v, x in r["variants"].items():
                s = share.get(v)
                print(f"  {model:7} {v:16} {x['images_per_s']:9.2f} images/s"
                      + ("" if s is None else f", {100 * s:.1f}% of peak"))
            print(f"  {model:7} x per-image {r.get('ratios_to_per_image')}; extract/bare "
                  f"{r.get('extract_over_bare')}; {r['flops_per_image'] / 1e12:.3f} TFLOP/image")
    elif isinstance(res, dict) and f.name.startswith("dift"):
        for name, r in res.items():
            print(f"  {name:8} {1 / r['images_per_s']:.4f} s/image ({r['images']} images), "
                  f"CUDA peak {mib(r.get('cuda_max_allocated_mib'))} "
                  f"(reserved {mib(r.get('cuda_max_reserved_mib'))}), finite {r.get('all_finite')}")
        if "ratio" in d:
            c = d.get("features", {})
            print(f"  ratio dift/naive {d['ratio']:.2f}x; cosine mean {c.get('cosine_mean')}, "
                  f"min {c.get('cosine_min')}")
    elif isinstance(res, dict) and f.name.startswith("sd_dino"):
        for name, r in res.items():
            st = r.get("stages_s_per_pair", {})
            print(f"  {name:18} {r['seconds_per_pair']:.4f} s/pair ({r['pairs']} pairs), "
                  f"sd {st.get('sd', 0):.4f} (captioner {st.get('sd.captioner', 0):.4f}), "
                  f"dino {st.get('dino', 0):.4f}, fuse {st.get('fuse', 0):.4f}; CUDA peak "
                  f"{mib(r.get('cuda_max_allocated_mib'))}, finite {r['descriptors']['finite']}")
        for key in ("captioner_cost_ratio", "fp32_over_fp16"):
            if key in d:
                print(f"  {key} {d[key]:.3f}")
    elif isinstance(d.get("runs"), dict) and f.name.startswith("hedlin_variants"):
        off = d["runs"].get("official", {})
        for name, r in d["runs"].items():
            a = r.get("agreement", {})
            print(f"  {name:11} {r['s_per_point']:.3f} s/point "
                  f"(x{off.get('s_per_point', 0) / r['s_per_point']:.2f}), PCK@0.1 "
                  f"{r['pck'].get('0.1')}, to official mean {a.get('mean_px', 0):.1f} px, "
                  f"map r {a.get('map_correlation', 0):.3f}")
    elif "inversion" in d or "training" in d:
        inv, tr = d.get("inversion") or {}, d.get("training") or {}
        if inv:
            print(f"  inversion ({inv.get('steps')} steps): s/image {inv.get('s_per_image')}; "
                  f"collect/bare {inv.get('collect_over_bare', 0):.3f}, store/bare "
                  f"{inv.get('store_over_bare', 0):.3f}; stored "
                  f"{inv.get('entry_stored_bytes', 0) / 2**20:.1f} MiB/image; "
                  f"CUDA peak {mib(inv.get('cuda_max_allocated_mib'))}")
        if tr:
            print(f"  training steps/s {tr.get('steps_per_s')}; store/memory "
                  f"{tr.get('store_over_memory', 0):.3f}")
    elif isinstance(res, dict):
        for name, r in res.items():
            if isinstance(r, dict) and "seconds_per_image" in r:
                print(f"  {name:17} {r['seconds_per_image']:.4f} s/image ({r.get('images')} images), "
                      f"CUDA peak {mib(r.get('cuda_max_allocated_mib'))}")
            else:
                print(f"  {name}: {json.dumps(r)[:300]}")
    else:
        print("  " + json.dumps(d)[:600])
EOF
log "=== files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
exit 0

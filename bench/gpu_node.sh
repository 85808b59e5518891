#!/usr/bin/env bash
# A GPU node, end to end, in one command: the segment pipeline against the predictor alone.
#
#   bash bench/gpu_node.sh prepare      # here, with the package registry: wheels/ (<= 64 MiB)
#   bash bench/gpu_node.sh run [IMAGES] # there (device `run`, carry ["wheels"]): no network
#   DEVICE=cpu bash bench/gpu_node.sh run 8   # a dry run of every step on a CPU (fp32, no
#                                             # nvidia-smi): proves the script, measures nothing
#
# `prepare` downloads the wheels a bare GPU machine lacks (Ray without its Java jars, trimmed
# by ../shared/tools/trim_ray_wheel.py; pycocotools; Ray's own small dependencies) for
# CPython 3.12 on manylinux x86_64 into wheels/ (git-ignored).
# `run` installs them into .gpu-site/ (no network: --no-index), generates IMAGES (default 2000)
# 1333x800 JPEGs (crops of scikit-image's photos, or noise when it is absent), then in the
# same call:
#   1. `segpipe segment` end to end with the recipes' settings (conf/kuberay-rayjob.yaml: one
#      actor per GPU, batch 16, fp16; random weights: no network) while nvidia-smi samples GPU
#      utilisation every 0.5 s;
#   2. the same run with `--decode predictor` (JPEG bytes to the predictor, nvJPEG there), and
#      again with 3 predictor threads;
#   3. bench/gpu_smoke.py: the predictor alone at the same batch and precision, with the batched
#      post-processing (what the pipeline's predictor runs on GPUs) and with torchvision's;
#   4. bench/gpu_decode.py: nvJPEG's pixels against Pillow's on 64 of the images, and both
#      decoders' images/s;
# and prints one JSON: pipeline images/s (each decode) beside predictor-only images/s, their
# ratio, GPU utilisation (mean and p50 while each pipeline ran), the stage that limits (the one
# Ray Data saw active longest: run.json's cluster.operators), and the decoders' figures. Record its
# figures in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
IMAGES=${2:-2000}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    GPUS=1 PRECISION=fp16 SMOKE_IMAGES=64
else
    GPUS=0 PRECISION=fp32 SMOKE_IMAGES=4
fi

if [ "$MODE" = prepare ]; then
    # --no-deps: the machine has numpy, torch and pyarrow; a wheel of them here would shadow
    # its own (and numpy alone is 16 MB of the 64 MiB that can be carried)
    rm -rf wheels && mkdir -p wheels/raw
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d wheels/raw \
        "ray==$($PY -c 'import ray; print(ray.__version__)')" pycocotools msgpack click \
        filelock jsonschema referencing rpds-py jsonschema-specifications attrs protobuf \
        pyyaml requests idna certifi charset-normalizer urllib3 packaging fsspec pandas \
        python-dateutil six pytz tzdata tqdm
    $PY ../shared/tools/trim_ray_wheel.py wheels/raw/ray-*.whl wheels
    find wheels/raw -name '*.whl' ! -name 'ray-*' -exec mv {} wheels/ \;
    rm -rf wheels/raw
    du -sh wheels
    [ "$(du -sk wheels | cut -f1)" -le 65536 ] || { echo "wheels/ is over 64 MiB"; exit 1; }
    exit 0
fi

SITE=$PWD/.gpu-site
mkdir -p "$SITE"
# only what the machine lacks: a wheel of a package it has would shadow its own
MISSING=$($PY - $(ls wheels/*.whl 2>/dev/null) <<'EOF'
import importlib.metadata as md
import re
import sys

for wheel in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", wheel.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
[ -z "$MISSING" ] || $PY -m pip install --quiet --no-index --no-deps --target "$SITE" $MISSING
export PYTHONPATH=$SITE:$PWD
WORK=$(mktemp -d /tmp/segpipe-gpu-node-XXXX)
$PY - "$WORK/images" "$IMAGES" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder, count = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
try:
    from skimage import data
    photos = [np.asarray(Image.fromarray(getattr(data, n)()).resize((1333, 800)))
              for n in ("astronaut", "chelsea", "coffee", "rocket")]
except ImportError:
    photos = [rng.integers(0, 255, (800, 1333, 3), dtype=np.uint8) for _ in range(4)]
for i in range(count):
    image = np.roll(photos[i % 4], int(rng.integers(0, 1333)), axis=1)
    Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)
EOF

# decode-predictor threads of each run: the two decodes at one thread (against the predictor
# alone at one), then the best guess of the recipes (3 threads) with the predictor decoding
RUNS="cpu-1 predictor-1 predictor-3"
for RUN in $RUNS; do
    DECODE=${RUN%-*} THREADS=${RUN#*-}
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$WORK/utilisation-$RUN.txt" 2>/dev/null &
    SAMPLER=$!
    $PY -m segpipe.cli segment "$WORK/images" "$WORK/out-$RUN" --weights random \
        --num-gpus $GPUS --actors 1 --batch-size 16 --precision $PRECISION --decode $DECODE \
        --predictor-threads $THREADS --no-progress > "$WORK/segment-$RUN.txt" 2>&1 \
        || { tail -50 "$WORK/segment-$RUN.txt"; kill $SAMPLER; exit 1; }
    kill $SAMPLER 2>/dev/null || true
done
$PY bench/gpu_smoke.py --device $DEVICE --only speed --precisions $PRECISION --batch-sizes 16 \
    --threads 1,3 --images $SMOKE_IMAGES --postprocess both --json "$WORK/smoke.json" \
    > "$WORK/smoke.txt" 2>&1 || tail -30 "$WORK/smoke.txt"
$PY bench/gpu_decode.py "$WORK/images" --device $DEVICE --images $SMOKE_IMAGES --batch 16 \
    --json "$WORK/decode.json" > "$WORK/decode.txt" 2>&1 || tail -30 "$WORK/decode.txt"

$PY - "$WORK" "$PRECISION" $RUNS <<'EOF'
import json
import statistics
import sys
from pathlib import Path

work, precision, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
smoke = json.loads((work / "smoke.json").read_text()) if (work / "smoke.json").exists() else {}
speeds = [s for s in smoke.get("speed", [])
          if s.get("batch") == 16 and s.get("precision") == precision]
predictor = max((s.get("images_per_s", 0) for s in speeds if s.get("postprocess") == "batched"),
                default=None)
per_image = max((s.get("images_per_s", 0) for s in speeds if s.get("postprocess") == "per-image"),
                default=None)
threaded = {s["threads"]: s["images_per_s"] for s in speeds if "threads" in s}


def pipeline(run_name: str) -> dict:
    threads = int(run_name.rsplit("-", 1)[1])
    alone = predictor if threads == 1 else threaded.get(threads)   # the predictor alone
    run = json.loads((work / f"out-{run_name}" / "run.json").read_text())
    busy = [float(v) for v in (work / f"utilisation-{run_name}.txt").read_text().split()
            if v.strip()]
    rate = run["images_per_s"]["pipeline"]
    stages = run["cluster"].get("operators", {})   # Ray Data's figures of each stage
    active = {name: figures["active_s"] for name, figures in stages.items()}
    return {"images": run["counts"]["images"], "ok": run["counts"]["ok"],
            "pipeline_images_per_s": rate, "predictor_only_images_per_s": alone,
            "pipeline_over_predictor": round(rate / alone, 3) if alone else None,
            "gpu_utilisation_mean": round(statistics.mean(busy), 1) if busy else None,
            "gpu_utilisation_p50": statistics.median(busy) if busy else None,
            "limiting_stage": max(active, key=active.get) if active else None,
            "stages": stages, "timings_s": run["timings_s"]}


decoded = work / "decode.json"
print(json.dumps({
    "predictor_only_images_per_s": predictor,
    "predictor_only_per_image_postprocess_images_per_s": per_image,
    "predictor_only_by_threads": threaded,
    "runs (decode-predictor threads)": {name: pipeline(name) for name in runs},
    "device_decoder": json.loads(decoded.read_text()) if decoded.exists() else None,
}, indent=1))
EOF

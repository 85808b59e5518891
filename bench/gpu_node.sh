#!/usr/bin/env bash
# A GPU node, end to end, in one command: the segment pipeline against the predictor alone.
#
#   bash bench/gpu_node.sh prepare      # here, with the package registry: wheels/ (<= 64 MiB)
#   bash bench/gpu_node.sh run [IMAGES] # there (device `run`, carry ["wheels"]): no network
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
#   2. bench/gpu_smoke.py: the predictor alone at the same batch and precision, with the batched
#      post-processing (what the pipeline's predictor runs on GPUs) and with torchvision's;
# and prints one JSON: pipeline images/s beside predictor-only images/s, their ratio, GPU
# utilisation (mean and p50 while the pipeline ran), and the stage that limits (Ray Data's
# per-operator wall times from the run's log). Record its figures in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
IMAGES=${2:-2000}
PY=${PYTHON:-python3}

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
MISSING=$($PY - wheels/*.whl <<'EOF'
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

nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
    > "$WORK/utilisation.txt" 2>/dev/null &
SAMPLER=$!
START=$(date +%s.%N)
$PY -m segpipe.cli segment "$WORK/images" "$WORK/out" --weights random --num-gpus 1 \
    --actors 1 --batch-size 16 --precision fp16 --no-progress > "$WORK/segment.txt" 2>&1 \
    || { tail -50 "$WORK/segment.txt"; kill $SAMPLER; exit 1; }
END=$(date +%s.%N)
kill $SAMPLER 2>/dev/null || true
$PY bench/gpu_smoke.py --device cuda --only speed --precisions fp16 --batch-sizes 16 --images 64 \
    --json "$WORK/smoke.json" > "$WORK/smoke.txt" 2>&1 || tail -30 "$WORK/smoke.txt"

$PY - "$WORK" "$START" "$END" <<'EOF'
import json
import re
import statistics
import sys
from pathlib import Path

work, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
run = json.loads((work / "out" / "run.json").read_text())
smoke = json.loads((work / "smoke.json").read_text()) if (work / "smoke.json").exists() else {}
speeds = [s for s in smoke.get("speed", []) if s.get("batch") == 16 and s.get("precision") == "fp16"]
predictor = max((s.get("images_per_s", 0) for s in speeds if s.get("postprocess") == "batched"),
                default=None)
per_image = max((s.get("images_per_s", 0) for s in speeds if s.get("postprocess") == "per-image"),
                default=None)
busy = [float(v) for v in (work / "utilisation.txt").read_text().split() if v.strip()]
pipeline = run["images_per_second"]["pipeline"]
stages = {}
for log in (work / "out" / "logs").glob("*.log"):
    for name, seconds in re.findall(r"Operator \d+ ([^:]+): .*?(\d+\.\d+)s", log.read_text()):
        stages[name] = max(stages.get(name, 0.0), float(seconds))
print(json.dumps({
    "images": run["counts"]["images"], "pipeline_images_per_s": pipeline,
    "predictor_only_images_per_s": predictor,
    "predictor_only_per_image_postprocess_images_per_s": per_image,
    "pipeline_over_predictor": round(pipeline / predictor, 3) if predictor else None,
    "gpu_utilisation_mean": round(statistics.mean(busy), 1) if busy else None,
    "gpu_utilisation_p50": statistics.median(busy) if busy else None,
    "limiting_stage": max(stages, key=stages.get) if stages else None,
    "stage_seconds": stages, "timings_s": run["timings_s"], "wall_s": round(end - start, 1),
}, indent=1))
EOF

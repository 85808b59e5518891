#!/usr/bin/env bash
# Segment the bundled samples/ into out/sample on a local Ray (CPU). Uses torchvision's
# pretrained weights when they are in the cache (`segpipe weights` says where), otherwise
# seeded random weights, loudly, so that the pipeline can still be seen working end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
weights=pretrained
if ! where=$(.venv/bin/segpipe weights); then
  weights=random
  echo "segpipe sample: pretrained weights not cached: $where"
  echo "segpipe sample: running with --weights random (masks are meaningless); put the file there for real masks"
fi
.venv/bin/segpipe segment samples out/sample --config conf/sample.yaml --weights "$weights" --overwrite
echo "segpipe sample: outputs in out/sample (coco/instances.json, coco/results.json, predictions/, run.json)"

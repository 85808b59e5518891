#!/usr/bin/env bash
# Segment the bundled samples/ into out/sample on a local Ray (CPU). Uses torchvision's
# pretrained weights, downloading them into torch's cache if they are not there yet (`segpipe
# weights` says where); without internet access it runs with seeded random weights, loudly,
# so that the pipeline can still be seen working end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
weights=pretrained
if ! .venv/bin/segpipe weights --download; then
  weights=random
  echo "segpipe sample: no pretrained weights (see above); running with --weights random, whose masks are meaningless"
fi
.venv/bin/segpipe segment samples out/sample --config conf/sample.yaml --weights "$weights" --overwrite
echo "segpipe sample: outputs in out/sample (coco/instances.json, coco/results.json, predictions/, run.json)"

"""Peak memory of decoding one huge image through the decode stage, as with ``--tile``.

    python bench/decode_memory.py [--width 12000 --height 10000]

Writes a JPEG of the astronaut photo tiled to ``--width × --height`` into a temporary
folder, then decodes it with ``decode.decode_batch`` (one image per call) in a fresh process
and prints the RSS before, after, and at its peak (``VmHWM``: ``ru_maxrss`` would carry the
parent's peak across the fork and exec) against the image's RGB bytes.
Figures are in docs/benchmarks.md ("decode memory of a huge image").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = """
import json, os, sys
sys.path.insert(0, {root!r})
import pyarrow as pa
from segpipe.io.decode import DecodeLimits, decode_batch

def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))

path = {path!r}
before = status_mb("VmRSS")
batch = pa.table({{"image_id": pa.array([1], pa.int64()), "file_name": ["big.jpg"],
                   "path": [path], "size": pa.array([os.path.getsize(path)], pa.int64())}})
out = decode_batch(batch, os.path.dirname(path), DecodeLimits(2**31 - 1, 1 << 31))
width, height = out.column("width")[0].as_py(), out.column("height")[0].as_py()
peak = status_mb("VmHWM")
print(json.dumps({{"status": out.column("status")[0].as_py(), "megapixels": width * height / 1e6,
                   "rgb_mb": round(width * height * 3 / 2**20), "rss_before_mb": round(before),
                   "rss_after_mb": round(status_mb("VmRSS")), "peak_rss_mb": round(peak),
                   "peak_over_start_x_rgb": round((peak - before) / (width * height * 3 / 2**20),
                                                  2)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=12000)
    parser.add_argument("--height", type=int, default=10000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    from PIL import Image

    from images import photo

    base = photo("astronaut", 1.0)
    reps = (-(-args.height // base.shape[0]), -(-args.width // base.shape[1]), 1)
    big = np.tile(base, reps)[:args.height, :args.width]
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "big.jpg")
        Image.fromarray(big).save(path, quality=90)
        del big
        code = MEASURE.format(root=str(ROOT), path=path)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True)
    print(json.dumps(json.loads(result.stdout), indent=1))


if __name__ == "__main__":
    main()

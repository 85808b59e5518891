"""Entry point for ``ray job submit --working-dir . -- python jobs/segment.py INPUT OUTPUT ...``.

Takes the same arguments as ``segpipe segment``. Under ``ray job submit`` RAY_ADDRESS is set,
so the job joins that cluster; run by hand without it, it starts a local Ray.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segpipe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))

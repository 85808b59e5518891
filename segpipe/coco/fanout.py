"""The COCO entries of a run's prediction files made in Ray tasks, one task per file, in file order."""

from __future__ import annotations

from typing import Iterator

from segpipe import schema
from segpipe.coco.selection import ExportOptions
from segpipe.coco.writer import ExportPart, file_part
from segpipe.io.run_folder import (
    prediction_files,
)


def file_parts_on_ray(predictions_dir: str, options: ExportOptions,
                      settings: schema.RunSettings) -> Iterator[ExportPart]:
    """``file_part`` of every prediction file in Ray tasks (one CPU each), yielded in file
    order; at most two tasks per CPU of the cluster are running or waiting to be written, so
    the driver holds a bounded number of parts."""
    import ray

    task = ray.remote(num_cpus=1)(file_part)
    paths = prediction_files(predictions_dir)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = [task.remote(predictions_dir, path, options, settings) for path in paths[:window]]
    for following in paths[window:] + [None] * min(window, len(paths)):
        part = ray.get(pending.pop(0))
        if following is not None:
            pending.append(task.remote(predictions_dir, following, options, settings))
        yield part

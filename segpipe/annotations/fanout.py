"""Run the parts of an export (COCO shards, Label Studio task files, YOLO label chunks) in
this process or in Ray tasks, one per part, and hand back their results in order."""

from __future__ import annotations

from typing import Any, Callable, Iterator


def run_calls(function: Callable, calls: list[tuple], parallel: bool) -> Iterator[Any]:
    """``function(*call)`` for each call, in order: in Ray tasks when ``parallel`` (Ray
    initialised), else in this process one after the other."""
    if parallel:
        return ordered_on_ray(function, calls)
    return (function(*call) for call in calls)


def ordered_on_ray(function: Callable, calls: list[tuple]) -> Iterator[Any]:
    """``function(*call)`` for each call in a Ray task of one CPU, all submitted at once;
    the results are yielded in the calls' order. A list argument that every call shares
    (the prediction files) is put in Ray's object store once."""
    import ray

    task = ray.remote(num_cpus=1)(function)
    shared: dict[int, Any] = {}

    def once(value: Any) -> Any:
        if isinstance(value, list):
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]
        return value

    pending = [task.remote(*(once(a) for a in call)) for call in calls]
    for ref in pending:
        yield ray.get(ref)

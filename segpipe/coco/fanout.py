"""Run the steps of a COCO export in Ray tasks, one task per shard, and hand back their results in order."""

from __future__ import annotations

from typing import Any, Callable, Iterator


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

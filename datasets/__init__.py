from __future__ import annotations

from harness.datasets import reasonseg, refer, shapes, toy  # noqa: F401  (register the loaders)
from harness.datasets.base import DATASETS, Sample


def load_dataset(name: str, split: str = "val", root: str | None = None, limit: int | None = None) -> list[Sample]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    samples = DATASETS.get(name)(split=split, root=root, limit=limit)
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(f"{name}:{split} has two samples with id {s.id!r}; ids must be unique to resume runs")
        seen.add(s.id)
    return samples


__all__ = ["DATASETS", "Sample", "load_dataset"]

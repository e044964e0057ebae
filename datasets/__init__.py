"""Dataset loaders. `load_dataset(name, split, root, limit)` -> list of `Sample`."""

from __future__ import annotations

from harness.datasets import toy  # noqa: F401  (registers the loader)
from harness.datasets.base import DATASETS, Sample


def load_dataset(name: str, split: str = "val", root: str | None = None, limit: int | None = None) -> list[Sample]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    return DATASETS.get(name)(split=split, root=root, limit=limit)


__all__ = ["DATASETS", "Sample", "load_dataset"]

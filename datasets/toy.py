"""`toy`: a tiny in-memory referring-segmentation set (a few coloured shapes per image, "the red circle").

Deterministic given the split, built in memory in milliseconds; meant for smoke tests of code paths (`segprune
doctor`, the runner tests). Benchmarks use `shapes-ref` or the real datasets.
"""

from __future__ import annotations

import numpy as np

from harness.datasets.base import DATASETS, Sample

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _draw(shape: str, size: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)


@DATASETS.register("toy")
def load_toy(split: str = "val", root: str | None = None, limit: int | None = None, size: int = 160) -> list[Sample]:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"toy has splits {', '.join(SPLIT_SEEDS)}; got {split!r}")
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    n = 32 if limit is None else limit
    samples = []
    for k in range(n):
        img = np.full((size, size, 3), 245, np.uint8)
        kinds = rng.permutation([(c, s) for c in COLOURS for s in SHAPES])[:3]
        masks = []
        for j, (colour, shape) in enumerate(kinds):
            cx = int(size * (j + 0.5) / 3)
            cy = int(rng.integers(size // 4, 3 * size // 4))
            m = _draw(shape, size, cy, cx, int(rng.integers(size // 12, size // 7)))
            img[m] = COLOURS[colour]
            masks.append(m)
        target = int(rng.integers(0, 3))
        colour, shape = kinds[target]
        samples.append(Sample(id=f"toy-{split}-{k}", image_id=f"toy-{split}-{k}", image=img,
                              query=f"the {colour} {shape}", mask=masks[target].astype(np.uint8)))
    return samples

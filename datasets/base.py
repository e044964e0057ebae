"""The sample type every loader yields, and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.registry import Registry


@dataclass
class Sample:
    """One referring-segmentation query.

    Attributes:
        id: unique within the split (stable across runs: used to resume).
        image_id: shared by the queries of one image (per-image work is cached on it).
        image: a path or an (H, W, 3) uint8 array.
        query: the referring expression or reasoning question.
        mask: (H, W) uint8 ground truth, 1 = target, 0 = background, 255 = ignore; or a zero-argument callable
            that decodes it (large datasets decode masks when they are scored, not when they are listed).
        is_sentence: ReasonSeg-style full-sentence query (LISA uses a different template for those).
        instances: zero-argument callable giving every annotated instance of the image as a (K, H, W) bool array
            (refer-format datasets), or None where the dataset has no instance annotations (ReasonSeg).
    """

    id: str
    image_id: str
    image: str | Path | np.ndarray
    query: str
    mask: np.ndarray | Callable[[], np.ndarray]
    is_sentence: bool = False
    instances: Callable[[], np.ndarray] | None = None

    def gt_mask(self) -> np.ndarray:
        return self.mask() if callable(self.mask) else self.mask


Loader = Callable[..., list[Sample]]
DATASETS: Registry[Loader] = Registry("dataset")

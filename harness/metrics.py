"""Per-sample intersection and union; gIoU, cIoU and precision@IoU are aggregations over stored records.

Rules follow LISA's evaluation (reference A7): pixels marked 255 in the ground truth are ignored; gIoU is the mean
per-sample IoU where an empty ground truth with an empty prediction (union 0) counts as 1; cIoU is sum(I) / sum(U).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE = 255
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union of a boolean prediction with a 0/1/255 ground truth (255 ignored)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = gt != IGNORE
    p = pred.astype(bool) & valid
    g = (gt == 1) & valid
    return int((p & g).sum()), int((p | g).sum())


def sample_iou(intersection: int, union: int) -> float:
    return 1.0 if union == 0 else intersection / union


def aggregate(pairs: Iterable[tuple[int, int]]) -> dict[str, float]:
    """gIoU, cIoU, precision@{0.5..0.9} and the sample count from (intersection, union) pairs."""
    pairs = list(pairs)
    if not pairs:
        return {"n": 0, "giou": float("nan"), "ciou": float("nan"),
                **{f"prec@{t}": float("nan") for t in PRECISION_THRESHOLDS}}
    inter = np.array([p[0] for p in pairs], dtype=np.float64)
    union = np.array([p[1] for p in pairs], dtype=np.float64)
    ious = np.array([sample_iou(i, u) for i, u in pairs])
    out = {"n": len(pairs), "giou": float(ious.mean()),
           "ciou": float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0}
    for t in PRECISION_THRESHOLDS:
        out[f"prec@{t}"] = float((ious >= t).mean())
    return out

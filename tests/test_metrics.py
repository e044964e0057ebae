from __future__ import annotations

import numpy as np
import pytest

from harness.metrics import aggregate, intersection_union, sample_iou


def test_ignore_pixels_do_not_count():
    gt = np.array([[1, 1, 255, 0]], dtype=np.uint8)
    pred = np.array([[1, 0, 1, 1]], dtype=bool)
    assert intersection_union(pred, gt) == (1, 3)


def test_empty_gt_and_empty_prediction_count_as_one_but_nonempty_prediction_is_zero():
    gt = np.zeros((4, 4), dtype=np.uint8)
    assert sample_iou(*intersection_union(np.zeros((4, 4), bool), gt)) == 1.0
    pred = np.zeros((4, 4), bool)
    pred[0, 0] = True
    assert sample_iou(*intersection_union(pred, gt)) == 0.0


def test_giou_ciou_and_precision_by_hand():
    pairs = [(50, 100), (0, 0), (30, 40), (0, 10)]  # IoUs 0.5, 1.0, 0.75, 0.0
    out = aggregate(pairs)
    assert out["giou"] == pytest.approx((0.5 + 1.0 + 0.75 + 0.0) / 4)
    assert out["ciou"] == pytest.approx(80 / 150)
    assert out["prec@0.5"] == pytest.approx(3 / 4) and out["prec@0.8"] == pytest.approx(1 / 4)
    assert out["n"] == 4


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in size"):
        intersection_union(np.zeros((2, 2), bool), np.zeros((3, 2), np.uint8))

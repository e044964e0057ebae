"""`select_masks` (the SAM mask selection of the superpixel projector) against an independent reference.

The reference below is written from reference/methods.md section 7.2 (FMA-WSSS pattern `l2_nmsf_s1_rsw3`, steps 2-4,
on one crop layer) and from stock segment-anything: `SamAutomaticMaskGenerator._process_batch` (IoU filter `>`,
stability `>=` with `calculate_stability_score` at mask threshold 0 and offset 1.0, boxes by `batched_mask_to_box`),
`_process_crop` (box NMS, here scored with FMA-WSSS's level offsets) and `postprocess_small_regions` /
`remove_small_regions` (holes then islands, 8-connected, box NMS preferring unchanged masks), with torchvision's greedy
`nms` and `box_iou` rewritten as plain loops. It is plain numpy and scipy, shares no code with the method, and checks
its own data: no NMS decision may rest on tied scores and no value may sit within float noise of a threshold.

The hand-made data pin: levels from the mean area over all prompts (not the output index, not per batch, ties by
index), the +0.1 whole-level IoU offset, strict `>` on IoU, `>=` on stability with the +-1.0 offsets, the +1.0
whole-level NMS offset, hole filling and island removal below `min_area` (strict `<`, 8-connected, keep the largest
island), the changed/unchanged preference of the second NMS, and invariance to how the prompts are batched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from harness.methods import superpixel as sp

LEVEL_IOU_OFFSET = (0.0, 0.0, 0.1)  # FMA-WSSS score_thresh_offset: sub-part, part, whole
LEVEL_NMS_OFFSET = (0.0, 0.0, 1.0)  # FMA-WSSS score_nms_offset
EIGHT = np.ones((3, 3), dtype=bool)  # cv2.connectedComponentsWithStats(..., 8) as in SAM's remove_small_regions
FOUR = ndimage.generate_binary_structure(2, 1)  # only for the sensitivity check
NOISE = 1e-6  # float32 (method) against float64 (reference): nothing may be decided inside this margin

POS, NEG = 4.0, -4.0  # inside / outside, stable
SOFT_IN, SOFT_OUT = 0.5, -0.5  # in the mask (logit > 0) but not in `> +1`; out of the mask but in `> -1`


# ------------------------------------------------------------------------------------------------ reference


def _box(mask):
    """Tight xyxy box with inclusive maxima, [0, 0, 0, 0] when empty (SAM batched_mask_to_box)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def _box_iou(a, b):
    """torchvision box_iou: areas (x2 - x1) * (y2 - y1), no +1."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    assert union > 0, "test data: two degenerate boxes meet in NMS"
    return inter / union


def _nms(boxes, scores, thresh):
    """Greedy NMS (torchvision nms): by score, descending; drop a box whose IoU with a kept one is > thresh."""
    n = len(boxes)
    for i in range(n):
        for j in range(i + 1, n):
            iou = _box_iou(boxes[i], boxes[j])
            assert abs(iou - thresh) > NOISE, "test data: a box IoU sits on the NMS threshold"
            if iou > thresh:
                assert abs(scores[i] - scores[j]) > 1e-4, "test data: overlapping boxes with tied NMS scores"
    keep = []
    for i in sorted(range(n), key=lambda i: -scores[i]):
        if all(_box_iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(i)
    return keep


def _remove_small_regions(mask, min_area, mode, structure):
    """SAM utils/amg.py remove_small_regions; returns (mask, changed)."""
    holes = mode == "holes"
    labels, n = ndimage.label(mask != holes, structure=structure)  # holes: components of the complement
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i in range(n) if sizes[i] < min_area]
    if not small:
        return mask, False
    fill = [0, *small]  # label 0 of the complement is the mask itself
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:  # every island is small: keep the largest
            assert (sizes == sizes.max()).sum() == 1, "test data: tied largest islands"
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, fill), True


def reference_select(logits, iou, cfg, iou_offset=LEVEL_IOU_OFFSET, nms_offset=LEVEL_NMS_OFFSET,
                     levels_by_index=False, structure=EIGHT, prefer_unchanged=True):
    """FMA-WSSS l2_nmsf_s1_rsw3 steps 2-4 on one crop layer; the keyword arguments exist for the sensitivity test.

    Args:
        logits: (P, 3, H, W) image-size mask logits.
        iou: (P, 3) predicted IoUs.
        cfg: object with iou_thresh, stability_thresh, nms_thresh, min_area.

    Returns:
        list of dicts with p, k, level, iou, mask (processed), changed.
    """
    n_prompts = logits.shape[0]
    area = (logits > 0).sum(axis=(2, 3)).mean(axis=0)  # (3,) mean over all prompts
    order = sorted(range(3), key=lambda k: (area[k], k))  # ascending, ties by output index
    level = list(range(3)) if levels_by_index else [order.index(k) for k in range(3)]

    cand = []
    for p in range(n_prompts):
        for k in range(3):
            x, lv, q = logits[p, k], level[k], float(iou[p, k])
            gap = q + iou_offset[lv] - cfg.iou_thresh
            assert gap == 0 or abs(gap) > NOISE, "test data: an IoU sits within float noise of the threshold"
            inter, union = int((x > 1.0).sum()), int((x > -1.0).sum())
            if union == 0:  # 0 / 0 = nan fails `>=`
                continue
            stab = inter / union
            assert stab == cfg.stability_thresh or abs(stab - cfg.stability_thresh) > NOISE, "test data: stability"
            if gap > 0 and stab >= cfg.stability_thresh:
                mask = x > 0
                cand.append(dict(p=p, k=k, level=lv, iou=q, mask=mask, box=_box(mask)))

    keep = _nms([c["box"] for c in cand], [c["iou"] + nms_offset[c["level"]] for c in cand], cfg.nms_thresh)
    cand = [cand[i] for i in keep]
    if not cand:
        return []
    for c in cand:
        mask, holes_changed = _remove_small_regions(c["mask"], cfg.min_area, "holes", structure)
        mask, islands_changed = _remove_small_regions(mask, cfg.min_area, "islands", structure)
        c["mask"], c["changed"] = mask, holes_changed or islands_changed
    score = [float(c["changed"] != prefer_unchanged) for c in cand]  # SAM: 1.0 unchanged, 0.0 changed
    keep = _nms([_box(c["mask"]) for c in cand], score, cfg.nms_thresh)
    return [cand[i] for i in keep]


def _key(masks, levels, confs):
    """Order-free comparable form of a selection."""
    return sorted((m.tobytes(), int(lv), round(float(q), 5)) for m, lv, q in zip(masks, levels, confs, strict=True))


def _ref_key(selected):
    return _key([c["mask"] for c in selected], [c["level"] for c in selected], [c["iou"] for c in selected])


# ------------------------------------------------------------------------------------------------ data


def _up_nearest(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _up_bilinear(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _prompt(size, outs, ious):
    """outs: three lists of (r0, r1, c0, c1, value) rectangles painted in order on a NEG canvas (low-res)."""
    low = np.full((3, size, size), NEG, dtype=np.float32)
    for k, rects in enumerate(outs):
        for r0, r1, c0, c1, v in rects:
            low[k, r0:r1, c0:c1] = v
    return low, np.array(ious, dtype=np.float32)


def hand_data():
    """32x32 low-res, nearest x2 to 64x64. Output 0 is the largest on average (whole, level 2); output 1 is smaller
    than output 2 on every prompt but P8, whose large (filtered) output 1 makes output 1 the part (level 1) and
    output 2 the sub-part (level 0). cfg: iou 0.875, stability 0.75, NMS 0.5, min_area 16 (image pixels)."""
    prompts = [
        # P0: whole 0.80 passes only by the +0.1 offset; part 0.875 fails (strict >); sub-part 0.85 fails.
        _prompt(32, [[(0, 8, 0, 8, POS)], [(2, 5, 2, 5, POS)], [(1, 7, 1, 7, POS)]], [0.80, 0.875, 0.85]),
        # P1: whole 0.76 fails (offset is 0.1, not more); part: 11 of 16 in the `> -1` union are `> +1`
        # (5 pixels at -0.5) -> 0.6875 fails; sub-part: 12 of 16 (4 pixels at +0.5) -> exactly 0.75 passes (>=).
        _prompt(32, [[(0, 8, 10, 18, POS)],
                     [(4, 8, 14, 18, POS), (4, 5, 14, 18, SOFT_OUT), (5, 6, 14, 15, SOFT_OUT)],
                     [(1, 5, 11, 15, POS), (1, 2, 11, 15, SOFT_IN)]], [0.76, 0.95, 0.95]),
        # P2: whole 0.80 (NMS score 1.80) suppresses the overlapping sub-part 0.97; the small part 0.96 survives.
        _prompt(32, [[(10, 20, 0, 10, POS)], [(11, 14, 1, 4, POS)], [(10, 19, 0, 9, POS)]], [0.80, 0.96, 0.97]),
        # P3: whole 0.90 suppresses the overlapping part 0.95; the empty sub-part (stability 0 / 0) is dropped.
        _prompt(32, [[(10, 20, 12, 22, POS)], [(10, 19, 12, 21, POS)], []], [0.90, 0.95, 0.99]),
        # P4: whole 0.90 with a 4-pixel island far away: its box meets the sub-part's (0.93) box with IoU 0.33, both
        # pass the first NMS; the island is removed (changed), the boxes now overlap (0.87) and the unchanged
        # sub-part wins the second NMS although the whole won on score.
        _prompt(32, [[(22, 30, 0, 8, POS), (31, 32, 15, 16, POS)], [(24, 27, 1, 4, POS)], [(23, 30, 0, 8, POS)]],
                [0.90, 0.50, 0.93]),
        # P5: part 0.90 with an 8-pixel hole (filled), a 16-pixel hole (kept: not < 16) and a 4-pixel hole touching
        # the outside only diagonally (kept under 8-connectivity, filled under 4).
        _prompt(32, [[(22, 32, 18, 32, POS)],
                     [(23, 31, 19, 27, POS), (25, 26, 22, 24, NEG), (27, 29, 23, 25, NEG), (23, 24, 19, 20, NEG),
                      (24, 25, 20, 21, NEG)],
                     [(24, 30, 20, 26, POS)]], [0.30, 0.90, 0.30]),
        # P6: sub-part 0.92 with a 16-pixel island made of two 8-pixel blocks touching diagonally (kept under
        # 8-connectivity) and a 4-pixel island (removed).
        _prompt(32, [[(12, 22, 23, 32, POS)], [(13, 15, 25, 27, POS)],
                     [(12, 18, 24, 30, POS), (19, 20, 24, 26, POS), (20, 21, 26, 28, POS), (21, 22, 31, 32, POS)]],
                [0.30, 0.30, 0.92]),
        # P7: part 0.92 is two islands of 4 and 8 pixels, both small: the 8-pixel one is kept. Sub-part 0.99 fails
        # stability on the `> +1` side (5 of 16 pixels at +0.5).
        _prompt(32, [[(0, 8, 19, 32, POS)], [(0, 1, 20, 21, POS), (0, 1, 22, 24, POS)],
                     [(2, 6, 20, 24, POS), (2, 3, 20, 24, SOFT_IN), (3, 4, 20, 21, SOFT_IN)]], [0.30, 0.92, 0.99]),
        # P8: every output fails; its large output 1 decides that output 1 is the part and output 2 the sub-part.
        _prompt(32, [[(0, 32, 0, 32, POS)], [(6, 26, 6, 26, POS)], [(0, 2, 0, 2, POS)]], [0.20, 0.20, 0.20]),
    ]
    cfg = sp.SuperpixelProjector(source="sam", iou_thresh=0.875, stability_thresh=0.75, nms_thresh=0.5, min_area=16)
    return *_stacked(prompts), _up_nearest, cfg


def _stacked(prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res logits (P, 3, h, w), IoUs (P, 3)) of hand-made prompts."""
    return torch.from_numpy(np.stack([p[0] for p in prompts])), torch.from_numpy(np.stack([p[1] for p in prompts]))


def tie_data():
    """Outputs 0 and 1 tie for the largest mean area: the tie goes by index, so output 1 is the whole (level 2) and
    output 0 the part. Whole-level IoU 0.80 passes only there (iou_thresh 0.86); output 0's 0.80 fails."""
    prompts = [
        _prompt(24, [[(0, 6, 0, 6, POS)], [(10, 14, 0, 9, POS)], [(2, 4, 2, 4, POS)]], [0.80, 0.80, 0.90]),
        _prompt(24, [[(0, 6, 10, 16, POS)], [(16, 20, 10, 19, POS)], [(17, 18, 12, 14, POS)]], [0.90, 0.81, 0.88]),
    ]
    cfg = sp.SuperpixelProjector(source="sam", iou_thresh=0.86, stability_thresh=0.9, nms_thresh=0.7, min_area=8)
    return *_stacked(prompts), _up_nearest, cfg


def random_data():
    """Noisy blobs, bilinear x2 (32 -> 64), 10 prompts: 9 masks kept, all levels, two changed by the small-region
    step; both level offsets change the selection."""
    g = np.random.default_rng(5)
    n, size = 10, 32
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    low = np.empty((n, 3, size, size), dtype=np.float32)
    for p in range(n):
        cy, cx = g.uniform(6, size - 6, 2)
        radii = g.permutation([3.0, 6.0, 10.0])  # the output order is not the size order
        for k in range(3):
            noise = ndimage.gaussian_filter(g.normal(size=(size, size)), 1.5) * 4.0
            low[p, k] = (radii[k] - np.hypot(yy - cy, xx - cx)) * 3.0 + noise
    iou = g.uniform(0.75, 1.0, (n, 3)).astype(np.float32)
    cfg = sp.SuperpixelProjector(source="sam", iou_thresh=0.86, stability_thresh=0.8, nms_thresh=0.7, min_area=30)
    return torch.from_numpy(low), torch.from_numpy(iou), _up_bilinear, cfg


DATA = {"hand": hand_data, "tie": tie_data, "random": random_data}


def _reference(low, iou, upsample, cfg, **kwargs):
    return reference_select(upsample(low).numpy(), iou.numpy(), cfg, **kwargs)


def _batches(low, iou, size):
    """A generator, as a prompt loop would give: consumed once."""
    return ((low[i:i + size], iou[i:i + size]) for i in range(0, len(low), size))


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(DATA))
def test_select_masks_matches_reference_for_any_batching(name):
    low, iou, upsample, cfg = DATA[name]()
    expected = _ref_key(_reference(low, iou, upsample, cfg))
    assert expected, "test data: the reference keeps nothing"
    h, w = upsample(low[:1]).shape[-2:]
    for size in (4, len(low), 1):
        masks, levels, confs = sp.select_masks(_batches(low, iou, size), upsample, cfg)
        assert masks.dtype == torch.bool and masks.shape == (len(levels), h, w) and len(confs) == len(levels)
        got = _key(masks.numpy(), levels, confs)
        assert got == expected, f"{name}, batch size {size}: {len(got)} masks, reference {len(expected)}"


def test_reference_keeps_the_hand_derived_selection():
    """The reference itself gives, on the hand data, what the comments in hand_data() derive."""
    low, iou, upsample, cfg = hand_data()
    sel = {(c["p"], c["k"]): c for c in _reference(low, iou, upsample, cfg)}
    assert {pk: (c["level"], c["changed"]) for pk, c in sel.items()} == {
        (0, 0): (2, False),  # whole 0.80 by the +0.1 offset
        (1, 2): (0, False),  # stability exactly at the threshold
        (2, 0): (2, False), (2, 1): (1, False),  # whole beat the sub-part 0.97 by the +1.0 NMS offset
        (3, 0): (2, False),
        (4, 2): (0, False),  # unchanged beat the changed whole in the second NMS
        (5, 1): (1, True), (6, 2): (0, True), (7, 1): (1, True),
    }
    up = upsample(low).numpy() > 0
    hole8, hole16, diagonal = np.s_[50:52, 44:48], np.s_[54:58, 46:50], np.s_[48:50, 40:42]
    m = sel[5, 1]["mask"]
    assert m[hole8].all() and not m[hole16].any() and not m[diagonal].any()
    assert (m ^ up[5, 1]).sum() == 8
    m = sel[6, 2]["mask"]
    assert m[38:42, 48:56].any() and not m[42:44, 62:64].any() and (up[6, 2] ^ m).sum() == 4
    assert sel[7, 1]["mask"].sum() == 8 and sel[7, 1]["mask"][0:2, 44:48].all()


@pytest.mark.parametrize("variant", [
    dict(iou_offset=(0.1, 0.0, 0.0)),
    dict(nms_offset=(1.0, 0.0, 0.0)),
    dict(iou_offset=(0.0, 0.0, 0.0)),
    dict(nms_offset=(0.0, 0.0, 0.0)),
    dict(levels_by_index=True),
    dict(structure=FOUR),
    dict(prefer_unchanged=False),
])
def test_hand_data_exercises_every_rule(variant):
    """A reference with one rule wrong gives another selection on the hand data, so the comparison would see it."""
    low, iou, upsample, cfg = hand_data()
    assert _ref_key(_reference(low, iou, upsample, cfg, **variant)) != _ref_key(_reference(low, iou, upsample, cfg))


def test_levels_come_from_all_prompts_not_one_batch():
    """Without P8 the levels of outputs 1 and 2 swap: one-prompt batches ranked alone would get them wrong."""
    low, iou, upsample, cfg = hand_data()
    with_p8 = {(c["p"], c["k"]): c["level"] for c in _reference(low, iou, upsample, cfg)}
    without = {(c["p"], c["k"]): c["level"] for c in _reference(low[:-1], iou[:-1], upsample, cfg)}
    assert with_p8[5, 1] == 1 and without[5, 1] == 0


@pytest.mark.parametrize("prompts, iou_thresh, stability_thresh", [
    (slice(None), 1.1, 0.75),  # every IoU fails, whole-level offset included
    ([1, 7], 0.94, 0.8),  # P1's and P7's 0.95 and 0.99 pass the IoU filter, every one of them fails stability
])
def test_nothing_survives(prompts, iou_thresh, stability_thresh):
    low, iou, upsample, _ = hand_data()
    low, iou = low[prompts], iou[prompts]
    cfg = sp.SuperpixelProjector(source="sam", iou_thresh=iou_thresh, stability_thresh=stability_thresh,
                                 nms_thresh=0.5, min_area=16)
    assert _reference(low, iou, upsample, cfg) == []
    masks, levels, confs = sp.select_masks(_batches(low, iou, 4), upsample, cfg)
    assert masks.dtype == torch.bool and masks.shape == (0, 64, 64) and levels == [] and confs == []

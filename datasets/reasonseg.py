"""ReasonSeg (LISA's reasoning-segmentation benchmark) in LISA's layout.

    <root>/reason_seg/ReasonSeg/{train,val,test}/<name>.jpg  with a same-name <name>.json:
        {"text": [query, ...], "is_sentence": bool, "shapes": [{"label": "target" | "ignore" | "flag",
                                                                 "points": [[x, y], ...]}, ...]}

As LISA evaluates it: the first text only; polygons sorted by area (largest first) and filled with a 1-px outline,
1 for targets, 255 (ignored by the metrics) for labels containing "ignore", "flag" shapes skipped.
"""

from __future__ import annotations

import json

import numpy as np

from harness.datasets.base import DATASETS, Sample
from harness.datasets.refer import data_root

REASONSEG_LAYOUT = """expected layout:
  <root>/reason_seg/ReasonSeg/{split}/<name>.jpg
  <root>/reason_seg/ReasonSeg/{split}/<name>.json   (text, is_sentence, shapes)
(set --data-root or SEGPRUNE_DATA to <root>)"""
SPLITS = ("train", "val", "test")


def _fill(mask: np.ndarray, points, value: int) -> None:
    import cv2

    poly = np.asarray([points], dtype=np.int32)
    cv2.polylines(mask, poly, True, value, 1)
    cv2.fillPoly(mask, poly, value)


def reasonseg_mask(shapes: list[dict], height: int, width: int) -> np.ndarray:
    valid = [s for s in shapes if s["label"].lower() != "flag"]
    areas = []
    for s in valid:
        m = np.zeros((height, width), np.uint8)
        _fill(m, s["points"], 1)
        areas.append(int(m.sum()))
    mask = np.zeros((height, width), np.uint8)
    for i in np.argsort(areas, kind="stable")[::-1]:
        _fill(mask, valid[i]["points"], 255 if "ignore" in valid[i]["label"].lower() else 1)
    return mask


@DATASETS.register("reasonseg", aliases=("ReasonSeg",))
def load_reasonseg(split: str = "val", root: str | None = None, limit: int | None = None) -> list[Sample]:
    if split not in SPLITS:
        raise ValueError(f"reasonseg has splits {', '.join(SPLITS)}; got {split!r}")
    base = data_root(root)
    for cand in (base / "reason_seg" / "ReasonSeg", base / "ReasonSeg", base):
        if (cand / split).is_dir():
            folder = cand / split
            break
    else:
        raise ValueError(f"no ReasonSeg {split} folder under {base}; {REASONSEG_LAYOUT.format(split=split)}")
    samples: list[Sample] = []
    for js in sorted(folder.glob("*.json")):
        try:
            raw = js.read_bytes()
            try:
                anno = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:  # some ReasonSeg files are cp1252; LISA falls back the same way
                anno = json.loads(raw.decode("cp1252"))
            text, shapes, is_sentence = anno["text"], anno["shapes"], bool(anno.get("is_sentence", True))
        except (ValueError, KeyError) as err:
            raise ValueError(f"{js} is not a ReasonSeg annotation ({type(err).__name__}: {err}); "
                             f"{REASONSEG_LAYOUT.format(split=split)}") from None
        image = next((js.with_suffix(ext) for ext in (".jpg", ".jpeg", ".png") if js.with_suffix(ext).is_file()), None)
        if image is None:
            raise ValueError(f"{js} has no image next to it ({js.stem}.jpg); {REASONSEG_LAYOUT.format(split=split)}")
        query = text[0] if isinstance(text, list) else text

        def mask(shapes=shapes, image=image) -> np.ndarray:
            from PIL import Image

            with Image.open(image) as im:  # header only
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by EXIF, as cv2.imread (LISA) shows it
                    w, h = h, w
            return reasonseg_mask(shapes, h, w)

        samples.append(Sample(id=js.stem, image_id=js.stem, image=image, query=query.strip(), mask=mask,
                              is_sentence=is_sentence))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise ValueError(f"{folder} holds no .json annotations; {REASONSEG_LAYOUT.format(split=split)}")
    return samples

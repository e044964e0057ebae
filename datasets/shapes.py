"""`shapes-ref`: a deterministic synthetic referring-segmentation dataset, written in the refer format.

Scenes of 3 to 8 flat shapes (six shapes, six colours, three size classes) on a light background, with partial
overlaps and distractors that share a colour or a shape. Every referring expression is checked to pick out exactly
one object. Query families, from easy to hard:

- attribute ("the small red triangle", "the blue shape"): split `testA`;
- relational and superlative ("the square left of the blue circle", "the largest green shape", "the leftmost
  star"): split `testB`;
- implicit, ReasonSeg-style questions ("which shape has no corners?", "which shape has the same colour as the
  triangle?", "which shape has the colour of the sky?"): split `reason`, loaded as sentence queries;
- `train` and `val` mix all three.

Each split is generated on first use into `<cache>/shapes-ref-v2/<split>/` as a RefCOCO-style folder
(`refs(unc).p`, `instances.json` with RLE masks, `images/*.png`) and read back through the same refer loader as
RefCOCO (implicit questions carry `is_sentence` in their ref); `labels/` holds YOLO-seg labels (class = shape)
for the same images, in the sibling layout ultralytics expects. The cache is
`$SEGPRUNE_CACHE` or `~/.cache/segprune`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness.datasets.base import DATASETS, Sample
from harness.files import usual_mode

VERSION = "shapes-ref-v2"  # v2: relations need the target mainly in that direction; sizes compare within a shape
IMAGE_SIZE = 256
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "purple": (140, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = {"small": (14, 17), "medium": (21, 25), "large": (30, 35)}  # radius ranges (px), separated by gaps
CORNERS = {"circle": "no corners", "triangle": "three corners", "hexagon": "six corners", "star": "five points"}
LIKE = {"blue": "the sky", "green": "grass", "yellow": "a banana", "red": "a tomato", "purple": "grapes",
        "orange": "a pumpkin"}
FAMILIES = {"train": ("attribute", "relational", "reason"), "val": ("attribute", "relational", "reason"),
            "testA": ("attribute",), "testB": ("relational",), "reason": ("reason",)}
SPLITS = {  # split -> (seed, number of images, referring expressions per image)
    "train": (0, 6000, 3), "val": (1, 200, 2), "testA": (2, 150, 2), "testB": (3, 150, 2), "reason": (4, 150, 2)}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    radius: float
    cy: float
    cx: float
    angle: float
    mask: np.ndarray | None = None  # visible pixels (later objects occlude earlier ones)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def _outline(o: Obj) -> list[tuple[float, float]] | None:
    """Polygon vertices (x, y) for polygonal shapes; None for the circle."""
    k = {"square": 4, "triangle": 3, "hexagon": 6, "diamond": 4, "star": 10}.get(o.shape)
    if k is None:
        return None
    a0 = {"square": np.pi / 4, "diamond": 0.0}.get(o.shape, o.angle)
    r = np.full(k, o.radius)
    if o.shape == "star":
        r[1::2] *= 0.45
    if o.shape == "diamond":
        r[1::2] *= 0.65  # a rhombus standing on a corner, so it is not a rotated square
    t = a0 - np.pi / 2 + np.arange(k) * 2 * np.pi / k
    return [(o.cx + ri * np.cos(ti), o.cy + ri * np.sin(ti)) for ri, ti in zip(r, t, strict=True)]


def _draw_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[Obj]]:
    n = int(rng.integers(3, 9))
    objs: list[Obj] = []
    for _ in range(200):
        if len(objs) == n:
            break
        size = str(rng.choice(list(SIZES)))
        r = float(rng.uniform(*SIZES[size]))
        cy, cx = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
        if any(np.hypot(cy - o.cy, cx - o.cx) < 0.85 * (r + o.radius) for o in objs):
            continue  # keep overlaps partial: every object stays mostly visible
        if objs and rng.random() < 0.5:  # distractor that shares the colour or the shape of an earlier object
            ref = objs[int(rng.integers(len(objs)))]
            colour, shape = (ref.colour, str(rng.choice(SHAPES))) if rng.random() < 0.5 else \
                (str(rng.choice(list(COLOURS))), ref.shape)
        else:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        objs.append(Obj(shape, colour, size, r, float(cy), float(cx), float(rng.uniform(0, 2 * np.pi))))
    bg = tuple(int(v) for v in rng.integers(225, 250, size=3))
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(canvas)
    ids = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw_ids = ImageDraw.Draw(ids)
    for i, o in enumerate(objs, start=1):
        pts = _outline(o)
        for d, fill in ((draw, COLOURS[o.colour]), (draw_ids, i)):
            if pts is None:
                d.ellipse([o.cx - o.radius, o.cy - o.radius, o.cx + o.radius, o.cy + o.radius], fill=fill)
            else:
                d.polygon(pts, fill=fill)
    img = np.asarray(canvas).copy()
    noise = rng.normal(0, 4, img.shape)  # mild sensor noise so flat colours are not trivially exact
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    id_map = np.asarray(ids)
    for i, o in enumerate(objs, start=1):
        o.mask = id_map == i
    return img, objs


# -- referring expressions --------------------------------------------------------------------------------------
def _unique(objs: list[Obj], pred) -> Obj | None:
    hits = [o for o in objs if pred(o)]
    return hits[0] if len(hits) == 1 else None


def _attribute(objs: list[Obj], t: Obj, rng: np.random.Generator) -> str | None:
    cands = [(f"the {t.shape}", lambda o: o.shape == t.shape),
             (f"the {t.colour} shape", lambda o: o.colour == t.colour),
             (f"the {t.colour} {t.shape}", lambda o: (o.colour, o.shape) == (t.colour, t.shape)),
             (f"the {t.size} {t.shape}", lambda o: (o.size, o.shape) == (t.size, t.shape)),
             (f"the {t.size} {t.colour} {t.shape}",
              lambda o: (o.size, o.colour, o.shape) == (t.size, t.colour, t.shape))]
    ok = [text for text, pred in cands if _unique(objs, pred) is t]
    return str(rng.choice(ok)) if ok else None


def _name(objs: list[Obj], a: Obj) -> str | None:
    """Shortest unique name of an anchor object."""
    for text, pred in ((f"the {a.shape}", lambda o: o.shape == a.shape),
                       (f"the {a.colour} shape", lambda o: o.colour == a.colour),
                       (f"the {a.colour} {a.shape}", lambda o: (o.colour, o.shape) == (a.colour, a.shape))):
        if _unique(objs, pred) is a:
            return text
    return None


def _relational(objs: list[Obj], t: Obj, rng: np.random.Generator) -> str | None:
    out = []
    margin = 6.0
    for noun, same in ((t.shape, lambda o: o.shape == t.shape), (f"{t.colour} shape", lambda o: o.colour == t.colour)):
        group = [o for o in objs if same(o)]
        if len(group) < 2:
            continue
        superlatives = [("leftmost", lambda o: o.cx), ("rightmost", lambda o: -o.cx),
                        ("topmost", lambda o: o.cy), ("bottommost", lambda o: -o.cy)]
        if noun == t.shape:  # sizes compare only within one shape: a large star covers less than a medium circle
            superlatives += [("largest", lambda o: -o.area), ("smallest", lambda o: o.area)]
        for word, key in superlatives:
            ranked = sorted(group, key=key)
            gap = abs(key(ranked[1]) - key(ranked[0]))
            need = 0.4 * ranked[0].area if word in ("largest", "smallest") else 2 * margin
            if ranked[0] is t and gap > need:
                out.append(f"the {word} {noun}")
        for a in objs:
            if a is t or same(a):
                continue
            name = _name(objs, a)
            if name is None:
                continue
            for word, d, across in (("left of", lambda o, a=a: a.cx - o.cx, lambda o, a=a: abs(o.cy - a.cy)),
                                    ("right of", lambda o, a=a: o.cx - a.cx, lambda o, a=a: abs(o.cy - a.cy)),
                                    ("above", lambda o, a=a: a.cy - o.cy, lambda o, a=a: abs(o.cx - a.cx)),
                                    ("below", lambda o, a=a: o.cy - a.cy, lambda o, a=a: abs(o.cx - a.cx))):
                # the target lies mainly in that direction; every other candidate clearly on the other side
                if d(t) > max(margin, across(t)) and all(d(o) < -margin for o in group if o is not t):
                    out.append(f"the {noun} {word} {name}")
    return str(rng.choice(out)) if out else None


def _reason(objs: list[Obj], t: Obj, rng: np.random.Generator) -> str | None:
    out = []
    corners = {"square": 4, "diamond": 4}
    if t.shape in CORNERS and _unique(objs, lambda o: o.shape == t.shape) is t:
        out.append(f"which shape has {CORNERS[t.shape]}?")
    if t.shape in corners and _unique(objs, lambda o: o.shape in corners) is t:
        out.append("which shape has four corners?")
    if _unique(objs, lambda o: o.colour == t.colour) is t:
        out.append(f"which shape has the colour of {LIKE[t.colour]}?")
    for a in objs:
        if a is t:
            continue
        if _unique(objs, lambda o, a=a: o.shape == a.shape) is a and \
                _unique([o for o in objs if o is not a], lambda o, a=a: o.colour == a.colour) is t:
            out.append(f"which shape has the same colour as the {a.shape}?")
        if _unique(objs, lambda o, a=a: o.colour == a.colour) is a and \
                _unique([o for o in objs if o is not a], lambda o, a=a: o.shape == a.shape) is t:
            out.append(f"which shape has the same shape as the {a.colour} one?")
    return str(rng.choice(out)) if out else None


EXPRESSIONS = {"attribute": _attribute, "relational": _relational, "reason": _reason}


def scene_refs(rng: np.random.Generator, families: tuple[str, ...], per_image: int):
    """One scene and up to `per_image` (target index, family, expression) triples with distinct targets."""
    img, objs = _draw_scene(rng)
    refs = []
    for i in rng.permutation(len(objs)):
        fams = list(rng.permutation(families))
        for fam in fams:
            text = EXPRESSIONS[fam](objs, objs[i], rng)
            if text is not None:
                refs.append((int(i), str(fam), text))
                break
        if len(refs) == per_image:
            break
    return img, objs, refs


# -- writing the refer-format folder ------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("SEGPRUNE_CACHE") or Path.home() / ".cache" / "segprune")


def generate(split: str, folder: str | os.PathLike, n_images: int | None = None, progress: bool = False) -> Path:
    """Write one split as a refer-format folder (+ YOLO-seg labels). Deterministic given the split."""
    from pycocotools import mask as mask_utils

    if split not in SPLITS:
        raise ValueError(f"shapes-ref has splits {', '.join(SPLITS)}; got {split!r}")
    seed, n, per_image = SPLITS[split]
    n = n if n_images is None else n_images
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)  # stage next to the target: rename() cannot cross filesystems
    _remove_orphans(folder.parent, split)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-{os.getpid()}-", dir=folder.parent))
    tmp.chmod(usual_mode(0o777))  # mkdtemp makes 0700: a cache shared by a group must stay readable to it
    (tmp / "images").mkdir()
    (tmp / "labels").mkdir()
    rng = np.random.default_rng([seed, 20261121])
    images, anns, refs = [], [], []
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"generating shapes-ref {split}", unit="img", leave=False)
    for k in it:
        img, objs, triples = scene_refs(rng, FAMILIES[split], per_image)
        image_id = k + 1
        name = f"{split}_{image_id:06d}.png"
        Image.fromarray(img).save(tmp / "images" / name, compress_level=1)
        images.append({"id": image_id, "file_name": name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        ann_ids, lines = [], []
        for o in objs:
            rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            ann_id = len(anns) + 1
            ys, xs = np.nonzero(o.mask)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": SHAPES.index(o.shape) + 1,
                         "segmentation": rle, "area": o.area, "iscrowd": 0,
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)],
                         "attributes": {"colour": o.colour, "size": o.size}})
            ann_ids.append(ann_id)
            lines.append(_yolo_line(o))
        (tmp / "labels" / name.replace(".png", ".txt")).write_text("".join(lines))
        for i, fam, text in triples:
            ref_id = len(refs) + 1
            refs.append({"ref_id": ref_id, "ann_id": ann_ids[i], "image_id": image_id, "split": split,
                         "category_id": SHAPES.index(objs[i].shape) + 1, "family": fam, "file_name": name,
                         "is_sentence": fam == "reason",
                         "sentences": [{"sent": text, "raw": text, "sent_id": ref_id, "tokens": text.split()}],
                         "sent_ids": [ref_id]})
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    (tmp / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                    "categories": categories}))
    with open(tmp / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    if folder.is_dir() and not (folder / "refs(unc).p").is_file():  # damaged (a file deleted by hand): replace it
        shutil.rmtree(folder)
    try:
        tmp.rename(folder)  # atomic: a concurrent or interrupted generation never leaves a half-written split
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "refs(unc).p").is_file():
            raise
    return folder


def _remove_orphans(parent: Path, split: str) -> None:
    """Staging folders of generations whose process is gone (killed mid-way): named `.{split}-{pid}-*`."""
    for stale in parent.glob(f".{split}-*-*"):
        try:
            os.kill(int(stale.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours, or a live process of another user
            continue


def _yolo_line(o: Obj) -> str:
    import cv2

    contours, _ = cv2.findContours(o.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = [c.reshape(-1) for c in contours]
    if len(parts) > 1:  # an object split by occlusion: one polygon joined the way ultralytics converts COCO
        from ultralytics.data.converter import merge_multi_segment

        parts = merge_multi_segment(parts)
    c = np.concatenate(parts).reshape(-1, 2) / IMAGE_SIZE
    return f"{SHAPES.index(o.shape)} " + " ".join(f"{v:.5f}" for v in c.reshape(-1)) + "\n"


def split_dir(split: str, progress: bool = True) -> Path:
    """The refer-format folder of a split, generated on first use."""
    folder = cache_dir() / VERSION / split
    if not (folder / "refs(unc).p").is_file():
        generate(split, folder, progress=progress)
    return folder


@DATASETS.register("shapes-ref", aliases=("shapes",))
def load_shapes_ref(split: str = "val", root: str | None = None, limit: int | None = None) -> list[Sample]:
    """shapes-ref through the RefCOCO loader: read from `root` when it holds a pre-generated `shapes-ref-v2/` split
    (`segprune data shapes-ref --data-root ROOT` writes one), else from the cache, generated there on first use.
    Nothing is written into a data root unasked (it is often RefCOCO's, or mistyped); the split is deterministic,
    so either place holds the same data."""
    from harness.datasets.refer import load_refer_folder

    if split not in SPLITS:
        raise ValueError(f"shapes-ref has splits {', '.join(SPLITS)}; got {split!r}")
    folder = Path(root) / VERSION / split if root else None
    if folder is None or not (folder / "refs(unc).p").is_file():
        folder = split_dir(split)
    return load_refer_folder(folder, folder / "images", "unc", split, limit=limit, lower=False, id_prefix="shapes-")

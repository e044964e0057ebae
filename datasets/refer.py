"""RefCOCO / RefCOCO+ / RefCOCOg in the refer format, with the folder layout LISA uses.

    <root>/refer_seg/refcoco/refs(unc).p           pickled list of refs (ref_id, ann_id, image_id, split, sentences)
    <root>/refer_seg/refcoco/instances.json        COCO images / annotations (polygons or RLE) / categories
    <root>/refer_seg/images/mscoco/images/train2014/COCO_train2014_*.jpg

`<root>` comes from `--data-root` or `$SEGPRUNE_DATA`; pointing it at the `refer_seg` folder itself also works
(LISA's evaluation script expects that). One sample per sentence, as LISA evaluates; sentences are stripped and
lower-cased as LISA does. Masks are decoded with pycocotools (polygon parts merged) when a sample is scored.
The pickle is read with a restricted unpickler: plain containers and scalars only.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np

from harness.datasets.base import DATASETS, Sample

REFER_LAYOUT = """expected layout:
  <root>/refer_seg/{ds}/refs({split_by}).p
  <root>/refer_seg/{ds}/instances.json
  <root>/refer_seg/images/mscoco/images/train2014/COCO_train2014_*.jpg
(set --data-root or SEGPRUNE_DATA to <root>)"""


class RefusedImport(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and scalars only: any pickle that asks to import a class or function is refused."""

    def find_class(self, module: str, name: str):
        raise RefusedImport(f"refusing to import {module}.{name}: refer pickles hold only lists, dicts, "
                                     f"strings and numbers; this file is not a plain refs pickle")


def _text(obj: object) -> object:
    """Python 2 `str` values arrive as bytes (encoding="bytes"): decode them as UTF-8, else Latin-1, everywhere."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin-1")
    if isinstance(obj, dict):
        return {_text(k): _text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_text(v) for v in obj)
    return obj


def safe_load_pickle(path: str | os.PathLike) -> object:
    """The refs pickle, restricted to plain data. The official refs files were written by Python 2, whose byte
    strings Python 3 would decode as ASCII (and fail on any accented sentence); they are read as bytes and decoded."""
    data = Path(path).read_bytes()
    try:
        return _text(RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load())
    except RefusedImport as err:
        raise ValueError(f"{path}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"{path} is not a readable refs pickle ({type(err).__name__}: {err})") from None


def data_root(root: str | os.PathLike | None) -> Path:
    root = root or os.environ.get("SEGPRUNE_DATA")
    if not root:
        raise ValueError("no data root: pass --data-root DIR or set SEGPRUNE_DATA (the folder that holds refer_seg/ "
                         "and reason_seg/)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(f"data root {path} is not a folder; pass --data-root DIR or set SEGPRUNE_DATA")
    return path


def _decode(segmentation, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one RLE per part, merged
        parts = [p for p in segmentation if len(p) >= 6]  # a 4-number part would be read as a box
        if not parts:
            return np.zeros((height, width), np.uint8)  # as LISA: an empty segmentation is an empty mask
        rles = mask_utils.frPyObjects(parts, height, width)
        m = mask_utils.decode(rles)
        return (m.reshape(height, width, -1).sum(axis=2) > 0).astype(np.uint8)
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    return (mask_utils.decode(segmentation) > 0).astype(np.uint8)


def _decode_ann(ann: dict, height: int, width: int, inst_path: Path) -> np.ndarray:
    """An annotation's mask; one that pycocotools cannot decode is an error naming it and its file."""
    try:
        return _decode(ann["segmentation"], height, width)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as err:
        raise ValueError(f"annotation {ann.get('id')} in {inst_path}: cannot decode its segmentation "
                         f"({type(err).__name__}: {err}); fix or remove that annotation") from None


def load_refer_folder(ds_dir: str | os.PathLike, image_dir: str | os.PathLike, split_by: str, split: str, *,
                      limit: int | None = None, lower: bool = True, is_sentence: bool = False,
                      id_prefix: str = "", layout: str = "") -> list[Sample]:
    """Samples of one split of a refer-format folder (one per sentence, in ref order)."""
    ds_dir, image_dir = Path(ds_dir), Path(image_dir)
    refs_path, inst_path = ds_dir / f"refs({split_by}).p", ds_dir / "instances.json"
    for p in (refs_path, inst_path):
        if not p.is_file():
            raise ValueError(f"missing {p}; {layout or 'a refer folder holds refs(<split_by>).p and instances.json'}")
    if not image_dir.is_dir():
        raise ValueError(f"missing image folder {image_dir}; {layout or 'images go next to instances.json'}")
    refs = safe_load_pickle(refs_path)
    if not isinstance(refs, list) or (refs and not isinstance(refs[0], dict)):
        raise ValueError(f"{refs_path} is not a list of refs" + (f"; {layout}" if layout else ""))
    try:
        inst = json.loads(inst_path.read_text())
        images = {im["id"]: im for im in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{inst_path} is not a COCO instances file ({type(err).__name__}: {err})") from None
    by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    splits = sorted({r.get("split") for r in refs} - {None})
    chosen = [r for r in refs if r.get("split") == split]
    if not chosen:
        raise ValueError(f"{refs_path} has no refs in split {split!r}; its splits are {', '.join(splits)}")
    samples: list[Sample] = []
    for ref in chosen:
        try:
            im, ann = images[ref["image_id"]], anns[ref["ann_id"]]
        except KeyError as err:
            raise ValueError(f"ref {ref.get('ref_id')} in {refs_path} names image {ref.get('image_id')} / annotation "
                             f"{ref.get('ann_id')}, but {err} is not in {inst_path}") from None
        path = image_dir / im["file_name"]

        def mask(a=ann, h=im["height"], w=im["width"]) -> np.ndarray:
            return _decode_ann(a, h, w, inst_path)

        def instances(image_id=ref["image_id"], h=im["height"], w=im["width"]) -> np.ndarray:
            image_anns = by_image.get(image_id, [])
            return np.stack([_decode_ann(a, h, w, inst_path) for a in image_anns]).astype(bool) \
                if image_anns else np.zeros((0, h, w), bool)

        for k, sent in enumerate(ref["sentences"]):
            text = sent["sent"].strip()
            samples.append(Sample(id=f"{id_prefix}{ref['ref_id']}-{sent.get('sent_id', k)}",
                                  image_id=str(ref["image_id"]), image=path, query=text.lower() if lower else text,
                                  mask=mask, is_sentence=bool(ref.get("is_sentence", is_sentence)),
                                  instances=instances))
            if limit is not None and len(samples) >= limit:
                return samples
    return samples


def _refer_loader(ds: str, split_by: str, splits: tuple[str, ...]):
    def load(split: str = "val", root: str | None = None, limit: int | None = None) -> list[Sample]:
        if split not in splits:
            raise ValueError(f"{ds} ({split_by}) has splits {', '.join(splits)}; got {split!r}")
        base = data_root(root)
        base = base if base.name == "refer_seg" else base / "refer_seg"
        layout = REFER_LAYOUT.format(ds=ds, split_by=split_by)
        return load_refer_folder(base / ds, base / "images" / "mscoco" / "images" / "train2014", split_by, split,
                                 limit=limit, layout=layout, id_prefix=f"{ds}-")

    load.__doc__ = f"{ds} with splitBy {split_by}: splits {', '.join(splits)}."
    return load


for _name, _by, _splits, _aliases in (
        ("refcoco", "unc", ("train", "val", "testA", "testB"), ()),
        ("refcoco+", "unc", ("train", "val", "testA", "testB"), ("refcocoplus",)),
        ("refcocog", "umd", ("train", "val", "test"), ("refcocog-umd",)),
        ("refcocog-google", "google", ("train", "val"), ())):
    DATASETS.register(_name, aliases=_aliases)(_refer_loader(_name.split("-")[0], _by, _splits))

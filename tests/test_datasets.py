"""Loaders (RefCOCO refer format, ReasonSeg, shapes-ref) on fixtures built on the fly."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from harness.datasets import load_dataset
from harness.datasets.refer import safe_load_pickle
from harness.datasets.shapes import COLOURS, SHAPES, SIZES, generate
from harness.model import BUNDLED, tiny_tokenizer

BUNDLED_GIOU_FLOOR = 0.5  # unpruned gIoU on the first 24 val queries: 0.68 bundled, ~0.16 with an untrained decoder


def _refer_root(tmp_path, rle: bool = True):
    from pycocotools import mask as mask_utils

    ds = tmp_path / "refer_seg" / "refcoco"
    imgs = tmp_path / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    ds.mkdir(parents=True)
    imgs.mkdir(parents=True)
    for i in (1, 2):
        Image.fromarray(np.full((40, 60, 3), 100 * i, np.uint8)).save(imgs / f"COCO_train2014_{i:012d}.jpg")
    square = np.zeros((40, 60), np.uint8)
    square[10:20, 30:50] = 1
    encoded = mask_utils.encode(np.asfortranarray(square))
    encoded["counts"] = encoded["counts"].decode()
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 25, 5, 25]]},
            {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": encoded},
            {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": []},
            {"id": 14, "image_id": 2, "category_id": 1, "iscrowd": 1,  # uncompressed RLE (crowd): 40 rows of x=1
             "segmentation": {"size": [40, 60], "counts": [40, 40, 2320]}}]
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 40, "width": 60} for i in (1, 2)]
    (ds / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    refs = [{"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "category_id": 1,
             "sentences": [{"sent": "  The LEFT thing ", "sent_id": 7}, {"sent": "box", "sent_id": 8}]},
            {"ref_id": 2, "ann_id": 12, "image_id": 2, "split": "testA", "category_id": 1,
             "sentences": [{"sent": "right box", "sent_id": 9}]},
            {"ref_id": 3, "ann_id": 13, "image_id": 2, "split": "testB", "sentences": [{"sent": "nothing"}]},
            {"ref_id": 4, "ann_id": 14, "image_id": 2, "split": "testB", "sentences": [{"sent": "crowd"}]}]
    with open(ds / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=0)  # the oldest protocol, as in the Python 2 era refer pickles
    return tmp_path


def test_refcoco_loader_polygons_rle_and_lisa_casing(tmp_path):
    root = _refer_root(tmp_path)
    val = load_dataset("refcoco", "val", root=str(root))
    assert [s.query for s in val] == ["the left thing", "box"]  # one sample per sentence, stripped + lower-cased
    assert len({s.id for s in val}) == 2 and val[0].image_id == val[1].image_id == "1"
    m = val[0].gt_mask()
    assert m.shape == (40, 60) and m[5:25, 5:15].all() and m.sum() == 200  # COCO rasterises [5, 15) x [5, 25)
    test_a = load_dataset("refcoco", "testA", root=str(root / "refer_seg"))  # pointing at refer_seg/ works too
    assert test_a[0].gt_mask().sum() == 200 and test_a[0].gt_mask()[10:20, 30:50].all()
    assert len(load_dataset("refcoco", "val", root=str(root), limit=1)) == 1
    empty, crowd = load_dataset("refcoco", "testB", root=str(root))
    assert empty.gt_mask().sum() == 0 and empty.gt_mask().shape == (40, 60)
    assert crowd.gt_mask().sum() == 40 and crowd.gt_mask()[:, 1].all()


def test_refcoco_errors_show_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("SEGPRUNE_DATA", raising=False)
    with pytest.raises(ValueError, match="SEGPRUNE_DATA"):
        load_dataset("refcoco", "val")
    with pytest.raises(ValueError, match=r"expected layout:\n  <root>/refer_seg/refcoco/refs\(unc\)\.p"):
        load_dataset("refcoco", "val", root=str(tmp_path))
    root = _refer_root(tmp_path)
    with pytest.raises(ValueError, match="splits are testA, testB, val"):
        load_dataset("refcoco", "train", root=str(root))
    with pytest.raises(ValueError, match="has splits"):
        load_dataset("refcoco", "test", root=str(root))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("refcocoo", "val", root=str(root))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_imports(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil()}]))
    with pytest.raises(ValueError, match="refusing to import"):
        safe_load_pickle(path)
    path.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": [{"sent": "a", "tokens": ["a"]}], "box": (1.0, 2)}]))
    assert safe_load_pickle(path)[0]["box"] == (1.0, 2)
    # a Python 2 pickle: protocol 2, a list holding the byte string "café" (UTF-8) and a Latin-1 "naïve"
    path.write_bytes(b"\x80\x02]q\x00(U\x05caf\xc3\xa9q\x01U\x05na\xefveq\x02e.")
    assert safe_load_pickle(path) == ["café", "naïve"]
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable refs pickle"):
        safe_load_pickle(path)


def test_reasonseg_loader_ignore_and_flag(tmp_path):
    folder = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "a.jpg")
    shapes = [{"label": "ignore", "points": [[12, 12], [16, 12], [16, 16], [12, 16]]},  # inside the target
              {"label": "target", "points": [[5, 5], [25, 5], [25, 25], [5, 25]]},
              {"label": "flag", "points": [[0, 0], [3, 0], [3, 3], [0, 3]]}]
    (folder / "a.json").write_bytes(json.dumps({"text": ["What holds the soup\u2019s bowl?", "other"],
                                                "is_sentence": True, "shapes": shapes},
                                               ensure_ascii=False).encode("cp1252"))  # LISA reads cp1252 too
    (s,) = load_dataset("reasonseg", "val", root=str(tmp_path))
    assert s.query == "What holds the soup\u2019s bowl?" and s.is_sentence
    m = s.gt_mask()
    assert m[14, 14] == 255 and m[6, 6] == 1 and m[1, 1] == 0  # largest first: the ignore region stays on top
    with pytest.raises(ValueError, match="expected layout"):
        load_dataset("reasonseg", "test", root=str(tmp_path))


def test_shapes_ref_is_deterministic_and_in_refer_format(tmp_path):
    a = generate("val", tmp_path / "a" / "shapes-ref-v1" / "val", n_images=6)
    b = generate("val", tmp_path / "b" / "shapes-ref-v1" / "val", n_images=6)
    assert (a / "refs(unc).p").read_bytes() == (b / "refs(unc).p").read_bytes()
    assert (a / "instances.json").read_text() == (b / "instances.json").read_text()
    assert (a / "images" / "val_000003.png").read_bytes() == (b / "images" / "val_000003.png").read_bytes()
    samples = load_dataset("shapes-ref", "val", root=str(tmp_path / "a"))
    assert len(samples) >= 6 and all(s.gt_mask().sum() > 50 for s in samples)
    labels = sorted((a / "labels").glob("*.txt"))
    assert len(labels) == 6
    for line in labels[0].read_text().splitlines():
        cls, *xy = line.split()
        assert 0 <= int(cls) < len(SHAPES) and len(xy) >= 6 and all(0 <= float(v) <= 1 for v in xy)


def test_shapes_ref_expressions_name_exactly_one_object(tmp_path):
    """Re-check attribute expressions against the stored annotations; every split's words are in the vocabulary."""
    inst, refs = {}, []
    for split in ("testA", "testB", "reason"):
        folder = generate(split, tmp_path / split, n_images=12)
        inst[split] = json.loads((folder / "instances.json").read_text())
        refs += [(split, r) for r in safe_load_pickle(folder / "refs(unc).p")]
    pattern = re.compile(rf"the (?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)}|shape)$")
    tok = tiny_tokenizer()
    checked = 0
    for split, ref in refs:
        sent = ref["sentences"][0]["sent"]
        assert tok.unk_token_id not in tok(sent, add_special_tokens=False).input_ids, sent
        assert ref["is_sentence"] == (split == "reason")
        if split != "testA":
            continue
        size, colour, shape = pattern.match(sent).groups()
        objs = [a for a in inst[split]["annotations"] if a["image_id"] == ref["image_id"]]
        hits = [a for a in objs if (size in (None, a["attributes"]["size"]))
                and (colour in (None, a["attributes"]["colour"]))
                and (shape == "shape" or SHAPES[a["category_id"] - 1] == shape)]
        assert [h["id"] for h in hits] == [ref["ann_id"]], sent
        checked += 1
    assert checked >= 12


def test_shapes_ref_unknown_split():
    with pytest.raises(ValueError, match="testA"):
        load_dataset("shapes-ref", "test")


def test_bundled_model_checksum(tmp_path, tiny):
    from harness.model import bundle_model, load_bundled

    tiny.save_pretrained(tmp_path / "trained")
    dest = bundle_model(tmp_path / "trained", tmp_path / "bundle")
    model = load_bundled(folder=dest)
    assert model.fingerprint() != tiny.fingerprint()  # fp16 storage rounds the weights
    name = next(iter(model.state_dict()))
    assert torch.allclose(model.state_dict()[name], tiny.state_dict()[name], atol=1e-2)
    weights = dest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_bundled(folder=dest)
    weights.unlink()
    with pytest.raises(ValueError, match="segprune train tiny --bundle"):
        load_bundled(folder=dest)


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="lisa-tiny-shapes weights missing")
def test_bundled_lisa_tiny_shapes_segments_shapes_ref(tmp_path, monkeypatch):
    """The bundled weights load (checksum), follow LISA's template and actually segment: the unpruned gIoU on the
    first val queries is far above random weights (~0.02) and an untrained decoder (~0.16); the full figures are in
    its train_log.json."""
    from harness.loading import load_model
    from harness.metrics import aggregate, intersection_union

    monkeypatch.setenv("SEGPRUNE_CACHE", str(tmp_path))
    model = load_model("lisa-tiny-shapes")
    pairs = []
    for s in load_dataset("shapes-ref", "val", limit=24):
        r = model.segment(s.image, s.query, None, is_sentence=s.is_sentence)
        pairs.append(intersection_union(r.mask, s.gt_mask()))
    assert aggregate(pairs)["giou"] > BUNDLED_GIOU_FLOOR


def test_shapes_ref_relations_hold_on_the_stored_masks(tmp_path):
    """Re-derive every testB expression from the stored masks: the anchor is unique, the target lies mainly in the
    named direction and is the only member of its group that does, superlatives pick the extreme member."""
    from harness.datasets.refer import _decode

    folder = generate("testB", tmp_path / "testB", n_images=25)
    inst = json.loads((folder / "instances.json").read_text())
    objs: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        ys, xs = np.nonzero(_decode(a["segmentation"], 256, 256))
        objs.setdefault(a["image_id"], []).append(dict(id=a["id"], shape=SHAPES[a["category_id"] - 1], x=xs.mean(),
                                                       y=ys.mean(), area=len(xs), **a["attributes"]))
    noun = rf"(?:({'|'.join(SHAPES)})|({'|'.join(COLOURS)}) shape)"
    rel = re.compile(rf"the {noun} (left of|right of|above|below) the (?:({'|'.join(COLOURS)}) )?(\w+)$")
    sup = re.compile(rf"the (leftmost|rightmost|topmost|bottommost|largest|smallest) {noun}$")

    def member(o, shape, colour):
        return o["shape"] == shape if shape else o["colour"] == colour

    refs = safe_load_pickle(folder / "refs(unc).p")
    assert len(refs) >= 25
    for ref in refs:
        sent, scene = ref["sentences"][0]["sent"], objs[ref["image_id"]]
        target = next(o for o in scene if o["id"] == ref["ann_id"])
        group = [o for o in scene if member(o, *(m.groups()[1:3] if (m := sup.match(sent)) else rel.match(sent)
                                                 .groups()[:2]))]
        assert target in group, sent
        if m := sup.match(sent):
            word = m.group(1)
            key = {"leftmost": lambda o: o["x"], "rightmost": lambda o: -o["x"], "topmost": lambda o: o["y"],
                   "bottommost": lambda o: -o["y"], "largest": lambda o: -o["area"], "smallest": lambda o: o["area"]}
            assert min(group, key=key[word]) is target, sent
            if word in ("largest", "smallest"):
                assert m.group(2), f"size superlatives compare one shape only: {sent}"
            continue
        _, _, word, a_colour, a_word = rel.match(sent).groups()
        anchors = [o for o in scene if (a_colour is None or o["colour"] == a_colour)
                   and (a_word == "shape" or o["shape"] == a_word) and (a_word != "shape" or a_colour)]
        if a_word in COLOURS:  # "the red shape": colour without a shape
            anchors = [o for o in scene if o["colour"] == a_word]
        assert len(anchors) == 1, sent
        a = anchors[0]
        axis, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[word]
        other = "y" if axis == "x" else "x"
        along = {id(o): sign * (o[axis] - a[axis]) for o in group}
        # stored masks are the visible pixels: allow a few pixels for occlusion and rasterisation
        assert along[id(target)] > abs(target[other] - a[other]) - 4 and along[id(target)] > 2, sent
        assert all(along[id(o)] < 0 for o in group if o is not target), sent


def test_yolo_label_keeps_every_part_of_an_occluded_object():
    import cv2

    from harness.datasets.shapes import IMAGE_SIZE, Obj, _yolo_line

    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    mask[20:60, 20:60] = mask[150:200, 120:180] = True  # one object cut in two by an occluder
    line = _yolo_line(Obj("square", "red", "large", 30.0, 40.0, 40.0, 0.0, mask))
    cls, *xy = line.split()
    assert int(cls) == SHAPES.index("square")
    poly = (np.array(xy, float).reshape(-1, 2) * IMAGE_SIZE).round().astype(np.int32)
    drawn = cv2.fillPoly(np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8), [poly], 1).astype(bool)
    assert (drawn & mask).sum() / (drawn | mask).sum() > 0.9  # both parts, joined by a thin line


def test_bundled_yolo_finds_the_shapes_and_its_checksum_is_checked(tmp_path):
    """The bundled YOLO-seg (LVLM_CSP's Seg-First source) loads through the same code as a user's checkpoint and
    finds shapes-ref's instances: most ground-truth objects of a few val images get a mask with IoU >= 0.5."""
    import shutil

    from harness.datasets.refer import _decode
    from harness.datasets.shapes import split_dir
    from harness.yolo import BUNDLED_YOLO, load_yolo

    assert BUNDLED_YOLO.is_file(), "the YOLO-seg weights must ship with the package (segprune train yolo --bundle)"
    yolo = load_yolo()
    folder = split_dir("val")
    threads = torch.get_num_threads()  # ultralytics' predict sets torch to one thread for the whole process
    inst = json.loads((folder / "instances.json").read_text())
    hits = total = 0
    for im in inst["images"][:4]:
        res = yolo.predict(str(folder / "images" / im["file_name"]), imgsz=160, verbose=False, retina_masks=True)[0]
        pred = res.masks.data.cpu().numpy() > 0.5 if res.masks is not None else np.zeros((0, 256, 256), bool)
        for a in (a for a in inst["annotations"] if a["image_id"] == im["id"]):
            gt = _decode(a["segmentation"], 256, 256).astype(bool)
            ious = [(p & gt).sum() / (p | gt).sum() for p in pred]
            hits += max(ious, default=0) >= 0.5
            total += 1
    torch.set_num_threads(threads)
    assert hits / total >= 0.7, f"{hits}/{total} objects found"
    copy = tmp_path / BUNDLED_YOLO.name
    shutil.copyfile(BUNDLED_YOLO, copy)
    shutil.copyfile(BUNDLED_YOLO.with_name(BUNDLED_YOLO.name + ".sha256"), tmp_path / (copy.name + ".sha256"))
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    from harness.model import verify_checksum

    with pytest.raises(ValueError, match="checksum"):
        verify_checksum(copy, "retrain")

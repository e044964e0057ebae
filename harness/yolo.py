"""The instance segmenter LVLM_CSP's Seg-First clustering needs: ultralytics YOLO-seg.

`segprune train yolo` trains the `yolo11n-seg` architecture from scratch on shapes-ref (offline: no pretrained
weights, no plots, no AMP check, which would all download) and can bundle the stripped weights as package data
with a checksum. `load_yolo()` loads the bundled model or a user's own checkpoint (e.g. `yolo11n-seg.pt`) through
the same code.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.model import verify_checksum, write_checksum

BUNDLED_YOLO = Path(__file__).parent / "assets" / "yolo11n-seg-shapes.pt"


def yolo_data_yaml(folder: str | os.PathLike, train_split: str = "train", val_split: str = "val") -> Path:
    """A data.yaml with absolute paths to the YOLO-seg labels the shapes-ref generator writes."""
    from harness.datasets.shapes import SHAPES, split_dir

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, val = (split_dir(s) / "images" for s in (train_split, val_split))
    text = f"train: {train}\nval: {val}\nnames:\n" + "".join(f"  {i}: {s}\n" for i, s in enumerate(SHAPES))
    path = folder / "shapes-ref.yaml"
    path.write_text(text)
    return path


def train_yolo(out: str | os.PathLike, *, epochs: int = 30, imgsz: int = 256, batch: int = 32, seed: int = 0,
               fraction: float = 1.0, device: str = "cpu", workers: int = 0) -> tuple[Path, float]:
    """Train yolo11n-seg from scratch on shapes-ref train; returns (stripped best weights, mask mAP50 on val)."""
    from ultralytics import YOLO

    out = Path(out).resolve()
    data = yolo_data_yaml(out)
    model = YOLO("yolo11n-seg.yaml", task="segment")  # architecture only: nothing is downloaded
    model.train(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, seed=seed, deterministic=True,
                fraction=fraction, device=device, workers=workers, plots=False, amp=False, project=str(out),
                name="train", exist_ok=True, verbose=False, val=True, pretrained=False)
    best = out / "train" / "weights" / "best.pt"
    return best, evaluate_yolo(best, data, imgsz=imgsz, device=device)


def evaluate_yolo(weights: str | os.PathLike, data: str | os.PathLike, *, imgsz: int = 256,
                  device: str = "cpu") -> float:
    """Mask mAP50 on the data's val split."""
    from ultralytics import YOLO

    metrics = YOLO(str(weights), task="segment").val(data=str(data), imgsz=imgsz, device=device, plots=False,
                                                     verbose=False, workers=0, batch=32)
    return float(metrics.seg.map50)


def bundle_yolo(weights: str | os.PathLike, dest: str | os.PathLike = BUNDLED_YOLO,
                record: dict | None = None) -> Path:
    """Copy the weights to the package asset with a checksum, and the training record (command, scores) beside."""
    import json

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, dest)
    write_checksum(dest)
    if record is not None:
        dest.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return dest


@dataclass
class Detections:
    """Instance masks of one image and what their FLOPs depend on."""

    masks: np.ndarray  # (K, H, W) bool at the image's size
    input_shape: tuple[int, ...]  # the letterboxed network input
    proto_shape: tuple[int, ...]  # the mask prototypes (1, C, h, w)


@contextmanager
def torch_threads():
    """Restore torch's thread count afterwards: ultralytics' device selection changes it."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_yolo(yolo, image, *, conf: float = 0.25, device: str | None = None) -> Detections:
    """Instance masks of a PIL image with a model from `load_yolo` (masks at the image's size, as LVLM_CSP uses)."""
    net = yolo.predictor.model.model  # the predictor's own (fused) copy of the network is what runs
    seen: dict[str, tuple] = {}
    hooks = [net.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", tuple(args[0].shape))),
             net.model[-1].proto.register_forward_hook(lambda m, a, out: seen.__setitem__("proto", tuple(out.shape)))]
    try:
        with torch_threads():
            result = yolo.predict(image, conf=conf, retina_masks=True, verbose=False, device=device)[0]
    finally:
        for h in hooks:
            h.remove()
    w, h = image.size
    masks = np.zeros((0, h, w), bool) if result.masks is None else result.masks.data.cpu().numpy() > 0.5
    return Detections(masks, seen["input"], seen["proto"])


_NETWORK_FLOPS: dict[tuple[int, tuple[int, ...]], int] = {}


def yolo_flops(yolo, det: Detections) -> int:
    """FLOPs of one `run_yolo` call (2 x MACs, like `harness.flops`): the network at its input shape, counted once
    per shape with torch's FLOP counter, plus the prototype matmul of each kept detection (ultralytics drops
    detections whose mask came out empty after computing it; those are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = yolo.predictor.model.model
    key = (id(net), det.input_shape)
    if key not in _NETWORK_FLOPS:
        p = next(net.parameters())
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(det.input_shape, dtype=p.dtype, device=p.device))
        _NETWORK_FLOPS[key] = int(counter.get_total_flops())
    _, channels, ph, pw = det.proto_shape
    return _NETWORK_FLOPS[key] + 2 * len(det.masks) * channels * ph * pw


def load_yolo(weights: str | os.PathLike | None = None, device: str | None = None):
    """The bundled shapes-ref YOLO-seg (checksum-checked), or a user's own YOLO-seg checkpoint, ready to predict."""
    from ultralytics import YOLO

    path = Path(weights) if weights else BUNDLED_YOLO
    if not path.is_file():
        hint = "train it with `segprune train yolo --bundle`" if weights is None else "check the path"
        raise ValueError(f"YOLO-seg weights not found at {path}; {hint}")
    if weights is None:
        verify_checksum(path, "reinstall segprune or retrain with `segprune train yolo --bundle`")
    yolo = YOLO(str(path), task="segment")
    if getattr(yolo.model.model[-1], "proto", None) is None:
        raise ValueError(f"{path} is not a YOLO-seg (instance segmentation) checkpoint; LVLM_CSP's Seg-First needs "
                         f"one, e.g. yolo11n-seg.pt")
    with torch_threads():  # set the predictor up now, so its one-off work is not timed with the first image
        yolo.predict(np.zeros((32, 32, 3), np.uint8), verbose=False, device=device)
    return yolo

"""Installation checks for `segprune doctor`."""

from __future__ import annotations

from collections.abc import Callable


def _check(fn: Callable[[], str]) -> tuple[bool, str]:
    try:
        return True, fn()
    except Exception as err:  # noqa: BLE001  (doctor reports every failure as a line, it never raises)
        return False, f"{type(err).__name__}: {err}"


def checks() -> list[tuple[str, bool, str]]:
    import numpy as np
    import torch

    def torch_ops() -> str:
        x = torch.randn(2, 3, 8, 8)
        torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3))
        cuda = f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA device"
        return f"torch {torch.__version__}{cuda}"

    def torchvision_ops() -> str:
        import torchvision
        from torchvision.ops import nms, roi_align

        boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
        keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
        roi_align(torch.randn(1, 1, 16, 16), [boxes[:1]], 2)
        assert keep.tolist() == [0, 2], keep
        return f"torchvision {torchvision.__version__} (nms, roi_align)"

    def transformers_parts() -> str:
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version("5.23"):
            raise RuntimeError(f"transformers {transformers.__version__} is older than 5.23; "
                               "pip install -U transformers")
        return f"transformers {transformers.__version__}"

    def ultralytics_import() -> str:
        import ultralytics

        return f"ultralytics {ultralytics.__version__}"

    def pycocotools_rle() -> str:
        from pycocotools import mask as m

        a = np.zeros((5, 7), np.uint8, order="F")
        a[1:3, 2:5] = 1
        assert (m.decode(m.encode(a)) == a).all()
        return "pycocotools RLE round trip"

    def assets() -> str:
        from harness.model import BUNDLED, load_bundled
        from harness.yolo import BUNDLED_YOLO, load_yolo

        if (BUNDLED / "model.safetensors").is_file():
            out = f"lisa-tiny-shapes {load_bundled().fingerprint()} (checksum ok)"
        else:
            out = "lisa-tiny-shapes weights missing (reinstall segprune; random:tiny is built in)"
        if BUNDLED_YOLO.is_file():
            load_yolo()
            out += f", {BUNDLED_YOLO.name} (checksum ok)"
        return out

    def lock() -> str:  # informational: an environment resolved afresh is allowed, but not the tested one
        from harness.lockfile import lock_provenance

        got = lock_provenance()
        if got["sha256"] is None:
            return "no uv.lock beside the package (a wheel install): versions as the installer resolved them"
        if got["locked"]:
            return f"uv.lock {got['sha256'][:12]}: every locked package installed at its locked version"
        return (f"uv.lock {got['sha256'][:12]}: not the locked environment ({len(got['differences'])} differ, e.g. "
                f"{got['differences'][0]}); `uv sync --locked` installs it")

    def tiny_forward() -> str:
        import harness

        model = harness.load_model("random:tiny")
        s = harness.load_dataset("toy", "val", limit=1)[0]
        r = model.segment(s.image, s.query, "random:k=2,ratio=0.5")
        return f"random:tiny forward ok, image tokens per layer {r.trace.image_tokens_per_layer}"

    return [(name, *_check(fn)) for name, fn in (
        ("torch", torch_ops), ("torchvision", torchvision_ops), ("transformers", transformers_parts),
        ("ultralytics", ultralytics_import), ("pycocotools", pycocotools_rle), ("bundled assets", assets),
        ("locked versions", lock), ("tiny model", tiny_forward))]

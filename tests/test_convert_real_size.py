"""Real-size conversion (off by default): a LISA-7B-shape checkpoint in the released layout, random bf16 weights.

    python -m pytest -m slow tests/test_convert_real_size.py -s      # about 18 GB written, then 17 GB converted
    python -m pytest -m "slow or gpu" tests/test_convert_real_size.py -s   # + load in bf16 on a GPU, every method

Set SEGPRUNE_SLOW_DIR to keep the checkpoint and the converted folder between runs (default: a pytest temp folder).
Fabrication and conversion run as child processes, so the peak resident memory reported is the conversion's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.convert.common import MAX_FILE_BYTES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def _child(code: str) -> tuple[float, int]:
    """Run python `code` in a child; (seconds, its peak resident set in bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {code}"
    return time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux reports KiB


@pytest.fixture(scope="module")
def lisa_7b(tmp_path_factory) -> dict:
    root = Path(os.environ.get("SEGPRUNE_SLOW_DIR") or tmp_path_factory.mktemp("lisa-7b"))
    src, clip, dst = root / "LISA-7B-v1", root / "clip-vit-large-patch14", root / "LISA-7B-v1-segprune"
    figures: dict = {}
    if not (src / "pytorch_model.bin.index.json").is_file():
        figures["fabricate_s"], _ = _child(
            "from tests.lisa_layouts import write_lisa, write_clip, LISA_7B\n"
            f"write_clip({str(clip)!r}, hidden=1024, layers=24, heads=16, intermediate=4096, image_size=224)\n"
            f"write_lisa({str(src)!r}, LISA_7B)")
    if not (dst / "segprune.json").is_file():
        figures["convert_s"], figures["convert_peak_rss"] = _child(
            "from harness.convert.lisa import convert_lisa\n"
            f"convert_lisa({str(src)!r}, {str(dst)!r}, clip={str(clip)!r})")
    figures["shards"] = {f.name: f.stat().st_size for f in sorted(src.glob("pytorch_model-*.bin"))}
    figures["output_bytes"] = sum(f.stat().st_size for f in dst.glob("model-*.safetensors"))
    print("\nLISA-7B-shape conversion:", json.dumps(figures, indent=1))
    return {"src": src, "dst": dst, "figures": figures}


def test_7b_converts_shard_by_shard(lisa_7b):
    figures, dst = lisa_7b["figures"], lisa_7b["dst"]
    cfg = json.loads((dst / "segprune.json").read_text())
    assert cfg["llm"]["num_hidden_layers"] == 32 and cfg["sam"]["vision"]["global_attn_indexes"] == [7, 15, 23, 31]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert all(f.stat().st_size <= MAX_FILE_BYTES + 2**20 for f in dst.glob("model-*.safetensors"))
    assert len(index["weight_map"]) == json.loads((dst / "convert.json").read_text())["tensors"]
    if "convert_peak_rss" in figures:  # near one source shard plus one output file, never the whole model twice
        assert figures["convert_peak_rss"] < max(figures["shards"].values()) + 3 * MAX_FILE_BYTES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_7b_loads_in_bf16_on_gpu_and_runs_every_method(lisa_7b):
    import numpy as np

    import harness

    model = harness.load_model(lisa_7b["dst"], device="cuda", dtype="bf16")
    assert model.info.n_image_tokens == 256 and torch.cuda.max_memory_allocated() < 20 * 1024**3
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    failed = {}
    for name in harness.METHODS.names():
        try:
            out = model.segment(image, "the dog on the left", name)
            assert out.logits.shape == (480, 640) and torch.isfinite(out.logits).all()
        except Exception as err:  # collect every method's failure, then report them together
            failed[name] = f"{type(err).__name__}: {err}"
    assert not failed, failed

"""GPU checks (off by default: `python -m pytest -m gpu` on a machine with CUDA)."""

from __future__ import annotations

import pytest
import torch

import harness
from harness.runner import expand_grid, read_records, run_grid
from tests.conftest import QUERY

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_cuda_tracks_fp32_cpu_and_pruning_keeps_counts(image):
    cpu = harness.load_model("random:tiny")
    gpu = harness.load_model("random:tiny", device="cuda", dtype="bf16")
    a = cpu.segment(image, QUERY, "random:k=2,ratio=0.75").seg_hidden
    r = gpu.segment(image, QUERY, "random:k=2,ratio=0.75")
    assert torch.nn.functional.cosine_similarity(a, r.seg_hidden.float().cpu()).item() > 0.98
    assert r.trace.image_tokens_per_layer == [256, 256] + [64] * 6
    assert set(r.latency) >= {"vision", "llm", "sam_encoder", "mask_decoder"}


def test_run_records_peak_memory_on_cuda(tmp_path):
    cells = expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=2, dtype="bf16")
    rows = run_grid(cells, tmp_path, device="cuda")
    recs = read_records(tmp_path / "cells" / f"{rows[0]['cell']}.jsonl")
    assert all(r["peak_mem_bytes"] > 0 for r in recs)

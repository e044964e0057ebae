"""Grids of cells, one flushed JSON line per sample, resume by skipping finished samples.

A run folder:
    config.json            the resolved grid (every cell with its resolved method parameters)
    environment.json       versions, git commit, device, dtype, attention backend, threads
    cells/<cell_id>.jsonl  one record per finished sample (complete lines only; a torn last line is dropped)
    cells/<cell_id>.json   the cell's resolved content
    summary.csv / .json    one row per cell, aggregated from the records

A cell's id is a hash of its resolved content and the harness version, so rerunning the same command finds the
same files and continues where it stopped; changing anything that affects results makes a new cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import harness
from harness.flops import Arch, compute_flops
from harness.latency import Stopwatch, peak_memory_bytes, reset_peak_memory
from harness.method import create_method
from harness.metrics import aggregate, intersection_union, sample_iou


@dataclass(frozen=True)
class Cell:
    model: str
    method: str  # resolved spec: name and every parameter
    dataset: str
    split: str
    decode: str = "template"
    limit: int | None = None
    dtype: str = "fp32"
    attn: str = "sdpa"

    @property
    def id(self) -> str:
        blob = json.dumps({**asdict(self), "harness": harness.__version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def method_name(self) -> str:
        return self.method.split(":", 1)[0]


def expand_grid(models: Iterable[str], methods: Iterable[str], datasets: Iterable[str], *, limit: int | None = None,
                dtype: str = "fp32", attn: str = "sdpa", decode: str = "template") -> list[Cell]:
    """Cells for every model x method x dataset ("name:split"); method specs are resolved and validated first."""
    if decode != "template":
        raise ValueError(f"decode mode {decode!r} is not available yet; use 'template' (LISA's evaluation)")
    resolved = [create_method(m).spec() for m in methods]
    cells = []
    for model in models:
        for ds in datasets:
            name, _, split = ds.partition(":")
            for spec in resolved:
                cells.append(Cell(model=str(model), method=spec, dataset=name, split=split or "val", decode=decode,
                                  limit=limit, dtype=dtype, attn=attn))
    return cells


def environment(model: Any = None) -> dict[str, Any]:
    """Provenance of every number in a run."""
    import transformers

    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain"], capture_output=True, text=True,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    env = {
        "harness": harness.__version__, "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if model is not None:
        env.update(device=str(model.device), dtype=str(model.dtype).replace("torch.", ""),
                   attention=model.attn_implementation, model_fingerprint=model.fingerprint())
    return env


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _segments(per_layer: list[list[int]]) -> list[list[Any]]:
    """Kept patches per layer as [first_layer, patches] segments (a new segment only when the set changes)."""
    out: list[list[Any]] = []
    for i, p in enumerate(per_layer):
        if not out or out[-1][1] != p:
            out.append([i, p])
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """Complete records of a cell file; a torn last line (killed mid-write) is dropped from the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # truncate a partial trailing line so appends stay valid JSONL
        with path.open("r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in raw[:end].decode().splitlines() if line.strip()]


class ImageCache:
    """Per-image preprocessing and SAM image embeddings, reused by every cell and query of a run (small LRU)."""

    def __init__(self, model: Any, size: int = 64):
        self.model, self.size = model, size
        self._items: dict[str, tuple[Any, Any]] = {}

    def get(self, image_id: str, image: Any) -> tuple[Any, Any, bool]:
        hit = image_id in self._items
        if not hit:
            prep = self.model.prepare(image)
            emb = None
            if self.model.sam is not None:
                with torch.inference_mode():
                    emb = self.model.sam_image_embeddings(prep.sam_pixels)
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[image_id] = (prep, emb)
        prep, emb = self._items[image_id]
        return prep, emb, hit


def run_cell(model: Any, cell: Cell, samples: list[Any], out_dir: Path, *, cache: ImageCache | None = None,
             progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Run the unfinished samples of one cell, appending one flushed JSON line per sample."""
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    (cells_dir / f"{cell.id}.json").write_text(json.dumps({**asdict(cell), "id": cell.id, "expected": len(samples)},
                                                          indent=2))
    path = cells_dir / f"{cell.id}.jsonl"
    records = read_records(path)
    done = {r["sample_id"] for r in records}
    method = create_method(cell.method)
    arch = Arch.from_model(model)
    cache = cache or ImageCache(model)
    watch = Stopwatch(model.device)
    with path.open("a") as f:
        for s in samples:
            if s.id in done:
                continue
            prep, emb, cached = cache.get(s.image_id, s.image)
            reset_peak_memory(model.device)
            r = model.segment(None, s.query, method, is_sentence=s.is_sentence, sample_key=s.id, prepared=prep,
                              image_embeddings=emb, stopwatch=watch)
            inter, union = intersection_union(r.mask, s.mask)
            latency = dict(r.latency)
            if cached:  # the SAM encoder did not run for this sample: do not report a fake zero
                latency.pop("sam_encoder", None)
            rec = {
                "sample_id": s.id, "image_id": s.image_id, "query": s.query, "intersection": inter, "union": union,
                "iou": sample_iou(inter, union), "n_avg": r.trace.n_avg,
                "image_tokens_per_layer": r.trace.image_tokens_per_layer,
                "tokens_per_layer": r.trace.tokens_per_layer, "kept_patches": _segments(r.trace.kept_patches),
                "flops": r.flops, "llm_flops": {c: compute_flops(arch, r.ledger, c)["llm"] for c in ("csp", "routing")},
                "latency_s": latency, "peak_mem_bytes": peak_memory_bytes(model.device), "mask_rle": _rle(r.mask),
            }
            f.write(json.dumps(rec) + "\n")  # one complete line per write, flushed: never a partial record
            f.flush()
            records.append(rec)
            if progress:
                progress(1)
    return records


def summarize_cell(cell: Cell, records: list[dict[str, Any]], expected: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"cell": cell.id, "model": cell.model, "method": cell.method_name, "spec": cell.method,
                           "dataset": cell.dataset, "split": cell.split}
    row.update(aggregate((r["intersection"], r["union"]) for r in records))
    row["complete"] = expected is None or len(records) >= expected
    if records:
        row["n_avg"] = float(np.mean([r["n_avg"] for r in records]))
        row["tflops"] = float(np.mean([r["flops"]["total"] for r in records])) / 1e12
        row["llm_tflops"] = float(np.mean([r["flops"]["llm"] for r in records])) / 1e12
        for conv in ("csp", "routing"):
            row[f"llm_tflops_{conv}"] = float(np.mean([r["llm_flops"][conv] for r in records])) / 1e12
        for stage in ("vision", "method", "llm", "sam_encoder", "mask_decoder"):
            vals = [r["latency_s"][stage] for r in records if stage in r["latency_s"]]
            row[f"{stage}_ms"] = float(np.median(vals)) * 1e3 if vals else float("nan")
    return row


def run_grid(cells: list[Cell], out_dir: str | Path, *, data_root: str | None = None, device: str | None = None,
             progress_factory: Callable[[int, str], Any] | None = None) -> list[dict[str, Any]]:
    """Run every cell (resuming finished samples) and write config, environment and summary into `out_dir`."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"cells": [{**asdict(c), "id": c.id} for c in cells],
                                                     "data_root": data_root}, indent=2))
    rows: list[dict[str, Any]] = []
    models: dict[tuple[str, str, str], Any] = {}
    datasets: dict[tuple[str, str, int | None], list[Any]] = {}
    caches: dict[tuple[str, str, str], ImageCache] = {}
    env_written = False
    try:
        for cell in cells:
            key = (cell.model, cell.dtype, cell.attn)
            if key not in models:
                models[key] = harness.load_model(cell.model, device=device, dtype=cell.dtype,
                                                 attn_implementation=cell.attn)
                caches[key] = ImageCache(models[key])
            model = models[key]
            if not env_written:
                (out_dir / "environment.json").write_text(json.dumps(environment(model), indent=2))
                env_written = True
            dkey = (cell.dataset, cell.split, cell.limit)
            if dkey not in datasets:
                datasets[dkey] = harness.load_dataset(cell.dataset, cell.split, root=data_root, limit=cell.limit)
            samples = datasets[dkey]
            bar = progress_factory(len(samples), f"{cell.method} {cell.dataset}:{cell.split}") \
                if progress_factory else None
            try:
                if bar is not None:
                    bar.update(len(read_records(out_dir / "cells" / f"{cell.id}.jsonl")))
                records = run_cell(model, cell, samples, out_dir, cache=caches[key],
                                   progress=bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            rows.append(summarize_cell(cell, records, len(samples)))
    finally:
        if rows:
            pd.DataFrame(rows).to_csv(out_dir / "summary.csv", index=False)
            (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """Summary rows of a run folder, recomputed from its records; cells without records are marked missing."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a segprune run folder (no config.json); run `segprune run` or "
                         f"`segprune grid` to make one")
    cfg = json.loads(cfg_path.read_text())
    rows = []
    for c in cfg["cells"]:
        c = {k: v for k, v in c.items() if k != "id"}
        cell = Cell(**c)
        records = read_records(run_dir / "cells" / f"{cell.id}.jsonl")
        meta = run_dir / "cells" / f"{cell.id}.json"
        expected = json.loads(meta.read_text()).get("expected") if meta.is_file() else cell.limit
        row = summarize_cell(cell, records, expected)
        row["missing"] = not records
        rows.append(row)
    return rows


def default_methods() -> list[str]:
    """The default grid: every registered built-in method at its default parameters."""
    from harness.method import METHODS

    return [name for name, cls in METHODS.items() if cls.__module__.startswith("harness.methods")]


def default_run_dir(base: str | Path = "runs") -> Path:
    stamp = os.environ.get("SEGPRUNE_RUN_NAME") or "default"
    return Path(base) / stamp

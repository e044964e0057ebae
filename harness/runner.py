"""Grids of cells, one flushed JSON line per sample, resume by skipping finished samples.

A run folder:
    config.json            the resolved grid (every cell with its resolved method parameters)
    environment.json       versions, git commit, device, dtype, attention backend, threads, uv.lock hash and
                           whether the installed packages are the locked ones (`harness.lockfile`)
    cells/<cell_id>.jsonl  one record per finished sample (complete lines only; a torn last line is dropped); shard k
                           of n writes cells/<cell_id>.<k>-of-<n>.jsonl, and `read_cell` merges them
    launches/<id>.json     a sharded launch (`harness.launch`)
    cells/<cell_id>.json   the cell's resolved content
    summary.csv / .json    one row per cell, aggregated from the records
    analysis.json / .csv   mask agreement with the unpruned model, ground-truth token recall per layer and its
                           correlation with the IoU drop (`harness.analysis`)

A cell's id is a hash of its resolved content and the harness version, so rerunning the same command finds the
same files and continues where it stopped; changing anything that affects results makes a new cell.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import platform
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import harness
from harness.engine import DECODE_MODES
from harness.files import Busy, exclusive, read_json, write_atomic, write_json
from harness.flops import Arch, llm_total_flops
from harness.latency import Stopwatch, peak_memory_bytes, reset_peak_memory
from harness.ledger import patch_shares
from harness.lockfile import lock_provenance
from harness.method import Method, budget_spec, create_method, split_budget
from harness.metrics import aggregate, intersection_union, sample_iou
from harness.shards import ENCODER_BATCH, Block, Shard, data_key, model_key, plan, shard_blocks

CONFIG_RECOVER = ("delete it and rerun the commands that made the run with the same --out "
                  "(finished samples in cells/ are kept)")
META_RECOVER = "delete it: the cell's records are kept, and the next run of the cell rewrites it"


@dataclass(frozen=True)
class Cell:
    model: str
    method: str  # resolved spec: name and every parameter
    dataset: str
    split: str
    decode: str = "template"
    limit: int | None = None  # not part of the id: a larger limit resumes the same cell
    dtype: str = "fp32"
    attn: str = "sdpa"
    data_root: str | None = None
    model_fingerprint: str = ""  # hash of the model's configuration and weights, filled in before running
    data_fingerprint: str = ""  # hash of the split's samples (ids, images, queries), filled in before running

    @property
    def id(self) -> str:
        """Hash of what the cell computes: with their fingerprints, a model is its weights and a split its samples,
        not how a path to them is spelled."""
        content = {k: v for k, v in asdict(self).items() if k != "limit"}
        if self.model_fingerprint:
            del content["model"]
        if self.data_fingerprint:
            del content["data_root"]
        else:
            del content["data_fingerprint"]  # ids made before data fingerprints existed stay as they were
        blob = json.dumps({**content, "harness": harness.__version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def method_name(self) -> str:
        """The registered name: "fastv" for "fastv:k=2" and for the budget spec "fastv@75%"."""
        return re.split("[:@]", self.method, maxsplit=1)[0]


def expand_grid(models: Iterable[str], methods: Iterable[str], datasets: Iterable[str], *, limit: int | None = None,
                dtype: str = "fp32", attn: str = "sdpa", decode: str = "template",
                data_root: str | None = None) -> list[Cell]:
    """Cells for every model x method x dataset ("name:split"); method specs are resolved and validated first."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)} (template is LISA's "
                         f"evaluation)")
    resolved = list(dict.fromkeys(canonical_spec(m) for m in methods))  # a method given twice is one row
    data_root = str(Path(data_root).expanduser().resolve()) if data_root else None
    cells = []
    for model in dict.fromkeys(models):
        for ds in dict.fromkeys(datasets):
            name, _, split = ds.partition(":")
            for spec in resolved:
                cells.append(Cell(model=str(model), method=spec, dataset=name, split=split or "val", decode=decode,
                                  limit=limit, dtype=dtype, attn=attn, data_root=data_root))
    return cells


def canonical_spec(spec: str) -> str:
    """A method spec with every parameter resolved; a budget spec ("fastv@75%") keeps its budget, which is resolved
    against each model when its cell runs (the resolved parameters are stored with the cell's records)."""
    return budget_spec(spec) if split_budget(spec)[1] is not None else create_method(spec).spec()


def environment(model: Any = None) -> dict[str, Any]:
    """Provenance of every number in a run."""
    import transformers

    src = Path(__file__).resolve().parent
    commit, dirty = "unknown (not a source checkout)", False

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=5).stdout.strip()

    try:  # only trust git when the package is the checkout's own harness/ (not an unrelated enclosing repo)
        if git("rev-parse", "--show-toplevel") and Path(git("rev-parse", "--show-toplevel")).resolve() == src.parent:
            commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        pass
    env = {
        "harness": harness.__version__, "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "ultralytics": importlib.metadata.version("ultralytics"),
        "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "lock": lock_provenance(),
    }
    if model is not None:
        env.update(device=str(model.device), dtype=str(model.dtype).replace("torch.", ""),
                   attention=model.attn_implementation, model_fingerprint=model.fingerprint())
    return env


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def gt_token_recall(model: Any, gt: np.ndarray, kept: list[list[int]],
                    members: dict[int, list[tuple[int, float]]] | None = None) -> list[float] | None:
    """Per LLM layer, how much of the ground truth's image tokens is still present: the target patches are those it
    covers at least half (its most covered patch if none) through the CLIP geometry; each counts as present to the
    extent the layer's tokens carry it (`patch_shares`: 1 for its own token, its share w_p / sum(w) in a merged,
    pooled or recycled token, summed and capped at 1); recall is the mean over target patches."""
    if not (gt == 1).any():  # no target region (an empty ground truth): nothing to recall
        return None
    cov = model.patch_coverage((gt == 1)[None])[0]
    target = set((cov >= 0.5).nonzero().squeeze(1).tolist()) or {int(cov.argmax())}
    out, shares = [], {}
    for layer in kept:
        if not members or min(layer, default=0) >= -1:  # single patches only: as cheap as a set intersection
            out.append(round(len(target.intersection(layer)) / len(target), 4))
            continue
        carried: dict[int, float] = {}
        for code in layer:
            if code not in shares:
                shares[code] = patch_shares(code, members)
            for patch, share in shares[code].items():
                if patch in target:
                    carried[patch] = carried.get(patch, 0.0) + share
        out.append(round(sum(min(1.0, v) for v in carried.values()) / len(target), 4))
    return out


def _segments(per_layer: list[list[int]]) -> list[list[Any]]:
    """Kept patches per layer as [first_layer, patches] segments (a new segment only when the set changes)."""
    out: list[list[Any]] = []
    for i, p in enumerate(per_layer):
        if not out or out[-1][1] != p:
            out.append([i, p])
    return out


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Complete records of a cell file, one per sample id (first wins).

    A torn last line (a process killed mid-write) is ignored, and with `repair` cut off the file so appends stay
    valid JSONL; a corrupt line elsewhere is an error naming the file and line.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
        with path.open("r+b") as f:
            f.truncate(end)
    records, seen = [], set()
    for k, line in enumerate(raw[:end].decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{k} is not a valid record; delete that line to rerun the sample") from None
        if rec["sample_id"] not in seen:
            seen.add(rec["sample_id"])
            records.append(rec)
    return records


def cell_files(cells_dir: Path, cell_id: str) -> list[Path]:
    """A cell's record files: one process's and every shard's."""
    return sorted(p for p in (cells_dir / f"{cell_id}.jsonl", *cells_dir.glob(f"{cell_id}.*-of-*.jsonl"))
                  if p.is_file())


def read_cell(cells_dir: Path, cell_id: str) -> list[dict[str, Any]]:
    """Every finished record of a cell, merged over the files of all shards (one per sample id), in dataset order."""
    seen: set[str] = set()
    records = []
    for path in cell_files(cells_dir, cell_id):
        for r in read_records(path):
            if r["sample_id"] not in seen:
                seen.add(r["sample_id"])
                records.append(r)
    if all("index" in r for r in records):  # records made before the index existed stay in file order
        records.sort(key=lambda r: r["index"])
    return records


@dataclass
class Encoded:
    """An image's preprocessing and encoder outputs, computed once for all its queries in a run."""

    prepared: Any
    vision: Any
    sam: Any
    seconds: dict[str, float]  # the encoders' time for this image (its share of the batch)
    ran: bool = False  # whether a record already says it ran the encoders ("encoded": the first query of the image)


def encode_images(model: Any, images: list[Any]) -> list[Encoded]:
    """CLIP and SAM's image encoder on several images as one batch each (every method here takes the tower's
    features as they are; none changes the tower). The time is split evenly over the images."""
    from harness.engine import run_vision, split_vision
    from harness.ledger import Ledger

    watch = Stopwatch(model.device)
    watch.last = {}
    with torch.inference_mode():
        preps = [model.prepare(im) for im in images]
        with watch("vision"):
            feats = split_vision(run_vision(model, torch.cat([p.clip_pixels for p in preps]), Ledger()))
        embs: list[Any] = [None] * len(preps)
        if model.sam is not None:
            with watch("sam_encoder"):
                batch = model.sam_image_embeddings(torch.cat([p.sam_pixels for p in preps]))
            embs = [batch[i:i + 1] for i in range(len(preps))]
    per_image = {stage: t / len(preps) for stage, t in watch.last.items()}
    return [Encoded(p, f, e, dict(per_image)) for p, f, e in zip(preps, feats, embs, strict=True)]


class CellWriter:
    """The one writer of a cell's record file for this process (its shard's file), holding the file's lock."""

    def __init__(self, out_dir: Path, cell: Cell, method: Method, model: Any, expected: int, suffix: str,
                 env: dict[str, Any], stack: contextlib.ExitStack):
        cells_dir = out_dir / "cells"
        self.path = cells_dir / f"{cell.id}{suffix}.jsonl"
        try:
            stack.enter_context(exclusive(cells_dir / f"{cell.id}{suffix}.lock", wait=False))
        except Busy as busy:
            raise ValueError(f"{cell.method} on {cell.dataset}:{cell.split} is being run into {out_dir} by another "
                             f"process (pid {busy.holder}); wait for it to finish, or use another --out") from None
        for other in (cells_dir / f"{cell.id}.lock", *cells_dir.glob(f"{cell.id}.*-of-*.lock")):
            if _shard_count(other.name) != _shard_count(f"{cell.id}{suffix}.lock"):  # the cell cut another way
                try:
                    with exclusive(other, wait=False):
                        pass
                except Busy as busy:
                    raise ValueError(f"{cell.method} on {cell.dataset}:{cell.split} is being run into {out_dir} by "
                                     f"another launch (pid {busy.holder}, {other.name}); wait for it, or rerun "
                                     f"with its shard count (`segprune status {out_dir}`)") from None
        meta_path = cells_dir / f"{cell.id}.json"
        if meta_path.is_file() and any(read_records(p) for p in cell_files(cells_dir, cell.id)):
            before = read_json(meta_path, META_RECOVER).get("resolved_method", method.spec())
            if before != method.spec():  # a budget spec must still resolve to what the records were made with
                raise ValueError(f"{cell.method} now resolves to {method.spec()}, but {cells_dir / cell.id}.jsonl "
                                 f"was made with {before}; use a new run folder or delete the cell's files to "
                                 f"rerun it")
        write_json(meta_path, {**asdict(cell), "id": cell.id, "resolved_method": method.spec(),
                               "positions": method.policy, "expected": expected, "grid": list(model.info.grid),
                               "environment": env})
        read_records(self.path, repair=True)  # a torn last line (killed mid-write) is cut before appending
        self.file = stack.enter_context(self.path.open("a"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")  # one complete line per write, flushed: never a partial record
        self.file.flush()


def _shard_count(lock_name: str) -> str:
    """The shard count a cell's lock file belongs to ("" for one process)."""
    stem = lock_name.removesuffix(".lock")
    return stem.rpartition("-of-")[2] if "-of-" in stem else ""


def evaluate(model: Any, cell: Cell, sample: Any, index: int, method: Method, encoded: Encoded | None,
             watch: Stopwatch, arch: Arch) -> dict[str, Any]:
    """One sample of a cell: the record written for it."""
    reset_peak_memory(model.device)
    given = {} if encoded is None else {"prepared": encoded.prepared, "image_embeddings": encoded.sam,
                                         "vision": encoded.vision}
    r = model.segment(sample.image, sample.query, method, is_sentence=sample.is_sentence, sample_key=sample.id,
                      stopwatch=watch, decode=cell.decode, instances=sample.instances, **given)
    gt = sample.gt_mask()
    if gt.shape != r.mask.shape:
        where = sample.image if isinstance(sample.image, (str, Path)) else f"the image of sample {sample.id}"
        raise ValueError(f"{where} is {r.mask.shape[1]}x{r.mask.shape[0]} pixels but its annotation is "
                         f"{gt.shape[1]}x{gt.shape[0]} ({cell.dataset}:{cell.split} sample {sample.id}); "
                         f"replace the image or fix its annotation")
    inter, union = intersection_union(r.mask, gt)
    latency = dict(r.latency)
    ran = True
    if encoded is not None:  # the image's encoder time (its share of the batch) is part of each of its queries
        latency.update(encoded.seconds)
        ran, encoded.ran = not encoded.ran, True
    rec = {
        "sample_id": sample.id, "index": index, "image_id": sample.image_id, "query": sample.query, "encoded": ran,
        "intersection": inter, "union": union, "iou": sample_iou(inter, union), "n_avg": r.trace.n_avg,
        "image_tokens_per_layer": r.trace.image_tokens_per_layer,
        "tokens_per_layer": r.trace.tokens_per_layer, "kept_patches": _segments(r.trace.kept_patches),
        "merged_members": {str(code): [[p, float(f"{w:.4g}")] for p, w in pairs]
                           for code, pairs in r.trace.members.items()},
        "gt_recall": gt_token_recall(model, gt, r.trace.kept_patches, r.trace.members),
        "flops": r.flops, "llm_flops": {c: llm_total_flops(arch, r.ledger, c) for c in ("csp", "routing")},
        "latency_s": latency, "peak_mem_bytes": peak_memory_bytes(model.device), "mask_rle": _rle(r.mask),
    }
    if r.answer is not None:  # generate mode: what the model said, and whether it produced a mask
        rec.update(answer=r.answer, has_seg=r.seg_hidden is not None)
    return rec


def policy_of(resolved: str | None) -> str | None:
    """The position-id policy of a resolved method spec (cells written before the policy was recorded), None when
    this installation cannot build it."""
    try:
        return create_method(resolved).policy if resolved else None
    except ValueError:
        return None


def summarize_cell(cell: Cell, records: list[dict[str, Any]], expected: int | None = None,
                   resolved: str | None = None, positions: str | None = None) -> dict[str, Any]:
    """One summary row; `resolved` is the method with every parameter (a budget spec's mapping on the model),
    `positions` the position-id policy it ran with."""
    row: dict[str, Any] = {"cell": cell.id, "model": cell.model, "method": cell.method_name, "spec": cell.method,
                           "resolved": resolved or cell.method, "positions": positions or "", "dataset": cell.dataset,
                           "split": cell.split, "decode": cell.decode, "dtype": cell.dtype, "attn": cell.attn,
                           "fingerprint": cell.model_fingerprint}
    row.update(aggregate((r["intersection"], r["union"]) for r in records))
    row["complete"] = expected is None or len(records) >= expected
    if records:
        row["n_avg"] = float(np.mean([r["n_avg"] for r in records]))
        if cell.decode == "generate":  # share of samples whose generated answer held a [SEG] (the rest score 0)
            row["seg_rate"] = float(np.mean([r.get("has_seg", True) for r in records]))
        row["tflops"] = float(np.mean([r["flops"]["total"] for r in records])) / 1e12
        row["llm_tflops"] = float(np.mean([r["flops"]["llm"] for r in records])) / 1e12
        for conv in ("csp", "routing"):
            row[f"llm_tflops_{conv}"] = float(np.mean([r["llm_flops"][conv] for r in records])) / 1e12
        for stage in ("vision", "method", "instances", "projector", "llm", "sam_encoder", "mask_decoder"):
            vals = [r["latency_s"][stage] for r in records if stage in r["latency_s"]]
            row[f"{stage}_ms"] = float(np.median(vals)) * 1e3 if vals else float("nan")
        # the LLM stage as papers report it (T_LVLM): the loop plus the method's scoring inside it
        row["llm_total_ms"] = float(np.median([r["latency_s"]["llm"] + r["latency_s"].get("method", 0.0)
                                               for r in records])) * 1e3
    return row


def _merge_config(out_dir: Path, cells: list[Cell]) -> None:
    """Add `cells` to the run's config.json (cells of earlier commands into the same folder are kept)."""
    path = out_dir / "config.json"
    with exclusive(out_dir / ".lock", wait=True):  # two commands into one folder: neither loses the other's cells
        known = read_json(path, CONFIG_RECOVER)["cells"] if path.is_file() else []
        ids = {c["id"] for c in known}
        known += [{**asdict(c), "id": c.id} for c in cells if c.id not in ids]
        write_json(path, {"harness": harness.__version__, "cells": known})


def data_fingerprint(samples: list[Any]) -> str:
    """Hash of a split's samples: ids, image ids, queries and image file names (not their pixels or masks)."""
    blob = json.dumps([[s.id, s.image_id, s.query, Path(s.image).name if isinstance(s.image, (str, Path)) else ""]
                       for s in samples])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_grid(cells: list[Cell], *, device: str | None = None) -> tuple[list[Cell], dict, dict, dict]:
    """Load every model and dataset and resolve and bind every method before anything runs, so a bad cell fails
    first.

    Returns the cells with their model fingerprints, the models, the datasets and each cell's method (by cell id).
    """
    models: dict[tuple[str, str, str], Any] = {}
    datasets: dict[tuple[str, str, str | None, int | None], list[Any]] = {}
    ready, methods, splits = [], {}, {}
    for cell in cells:
        key = (cell.model, cell.dtype, cell.attn)
        if key not in models:
            model = harness.load_model(cell.model, device=device, dtype=cell.dtype, attn_implementation=cell.attn)
            if model.sam is None:
                raise ValueError(f"{cell.model} has no mask decoder (SAM); `run` needs a segmentation model "
                                 f"(its FLOPs are available with `segprune flops`)")
            models[key] = model
        dkey = (cell.dataset, cell.split, cell.data_root, cell.limit)
        if dkey not in datasets:
            split = harness.load_dataset(cell.dataset, cell.split, root=cell.data_root)  # whole: the fingerprint
            splits[dkey] = data_fingerprint(split)  # must not depend on the limit (a larger limit resumes)
            datasets[dkey] = split[:cell.limit]
        method = create_method(cell.method, info=models[key].info)  # a budget spec resolves on its model
        method.bind(models[key].info)
        method.check_data(cell.dataset, cell.split)
        ready.append(replace(cell, model_fingerprint=models[key].fingerprint(), data_fingerprint=splits[dkey]))
        methods[ready[-1].id] = method
    return ready, models, datasets, methods


def run_grid(cells: list[Cell], out_dir: str | Path, *, device: str | None = None, shard: Shard | None = None,
             encoder_batch: int = ENCODER_BATCH, reuse: bool = True, summarize: bool = True,
             on_prepared: Callable[[list[Cell]], None] | None = None,
             progress_factory: Callable[[int, str], Any] | None = None) -> list[dict[str, Any]]:
    """Run the unfinished items of `shard` (default: all of them, one process) and write config, environment and
    summary into `out_dir`. Returns the summary rows of `cells`, from the records of every shard.

    Items run image by image (`harness.shards`): each image is preprocessed and encoded (CLIP, SAM's image encoder)
    once, in batches of `encoder_batch` images, for all its queries in every cell; `reuse=False` computes them for
    every query instead (what a naive loop does; for throughput comparisons). `summarize=False` (a launcher's shard)
    writes no summary or analysis (`segprune status` does, once every shard has finished) and returns no rows;
    `on_prepared` gets the cells with their ids once models and data are loaded.
    """
    shard = shard or Shard()
    cells, models, datasets, methods = prepare_grid(cells, device=device)
    out_dir = Path(out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    _merge_config(out_dir, cells)
    if on_prepared:
        on_prepared(cells)
    envs = {key: environment(model) for key, model in models.items()}  # reading the lock takes a while: once
    write_json(out_dir / f"environment{shard.suffix}.json", next(iter(envs.values())))  # a shard's node: its own
    mine = shard_blocks(plan(cells, datasets, encoder_batch), shard)
    try:
        with contextlib.ExitStack() as stack:
            counts: dict[int, int] = {}
            for block in mine:
                for ci, _ in block.items:
                    counts[ci] = counts.get(ci, 0) + 1
            writers = {ci: CellWriter(out_dir, cells[ci], methods[cells[ci].id], models[model_key(cells[ci])],
                                      len(datasets[data_key(cells[ci])]), shard.suffix, envs[model_key(cells[ci])],
                                      stack) for ci in counts}
            done = {ci: {r["sample_id"] for r in read_cell(out_dir / "cells", cells[ci].id)} for ci in writers}
            todo = [[(ci, si) for ci, si in b.items if datasets[b.data][si].id not in done[ci]] for b in mine]
            bar = progress_factory(sum(map(len, todo)), "grid" if shard.count == 1 else str(shard)) \
                if progress_factory else None
            try:
                _run_blocks(mine, todo, cells, models, datasets, methods, writers, reuse, bar)
            finally:
                if bar is not None:
                    bar.close()
    finally:
        summary = write_summary(out_dir) if summarize else []  # every cell of the folder, from every shard's records
    if not summarize:
        return []
    from harness.analysis import analyze_run

    analyze_run(out_dir)
    by_id = {r["cell"]: r for r in summary}
    return [by_id[c.id] for c in cells]


def _run_blocks(blocks: list[Block], todo: list[list[tuple[int, int]]], cells: list[Cell], models: dict,
                datasets: dict, methods: dict, writers: dict[int, CellWriter], reuse: bool, bar: Any) -> None:
    watches = {key: Stopwatch(model.device) for key, model in models.items()}
    arches = {key: Arch.from_model(model) for key, model in models.items()}
    for block, items in zip(blocks, todo, strict=True):
        if not items:
            continue
        model = models[block.model]
        samples = datasets[block.data]
        images = block.images  # the whole block, also on resume: the encoders see the batches an unbroken run does
        encoded = dict(zip([i for i, _ in images], encode_images(model, [im for _, im in images]), strict=True)) \
            if reuse else {}
        for ci, si in items:
            cell, sample = cells[ci], samples[si]
            rec = evaluate(model, cell, sample, si, methods[cell.id], encoded.get(sample.image_id),
                           watches[block.model], arches[block.model])
            writers[ci].write(rec)
            if bar is not None:
                bar.update(1)


def load_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """Summary rows of a run folder, recomputed from its records; cells without records are marked missing."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a segprune run folder (no config.json); run `segprune run` or "
                         f"`segprune grid` to make one")
    cfg = read_json(cfg_path, CONFIG_RECOVER)
    rows = []
    for c in cfg["cells"]:
        cid = c["id"]  # the stored id: valid even after a harness upgrade changed how ids are computed
        cell = Cell(**{k: v for k, v in c.items() if k in Cell.__dataclass_fields__})
        records = read_cell(run_dir / "cells", cid)
        meta = run_dir / "cells" / f"{cid}.json"
        info = read_json(meta, META_RECOVER) if meta.is_file() else {}
        expected = info.get("expected", cell.limit)
        if expected is not None:  # a smaller limit shows its prefix (shards may have filled later samples first)
            records = [r for k, r in enumerate(records) if r.get("index", k) < expected]
        row = summarize_cell(cell, records, expected, info.get("resolved_method"),
                             info.get("positions") or policy_of(info.get("resolved_method")))
        row["cell"] = cid
        row["missing"] = not records
        rows.append(row)
    return rows


def write_summary(run_dir: Path) -> list[dict[str, Any]]:
    """summary.csv / summary.json: one row per cell of the folder, from its records. Returns the rows."""
    import pandas as pd

    with exclusive(run_dir / ".lock", wait=True):
        rows = load_run(run_dir)
        write_atomic(run_dir / "summary.csv", pd.DataFrame(rows).to_csv(index=False))
        write_json(run_dir / "summary.json", rows)
    return rows


def cell_records(run_dir: str | Path, cell_id: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` (all if None) finished records of a cell of a run folder, in dataset order."""
    records = read_cell(Path(run_dir) / "cells", cell_id)
    return records if n is None else records[:n]


def default_methods() -> list[str]:
    """The default grid: every registered built-in method at its default parameters (except those that declare
    themselves too slow for it: `Method.in_default_grid`)."""
    from harness.method import METHODS

    return [name for name, cls in METHODS.items() if cls.__module__.startswith("harness.methods") and
            cls.in_default_grid]


def default_run_dir(base: str | Path = "runs") -> Path:
    return Path(base) / "default"

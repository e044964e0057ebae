"""Launchers: the shards of a grid as a Slurm job array or as processes on this machine, through submitit.

A launch is one grid (its cells) cut into a number of shards (`harness.shards`), saved as
`launches/<id>.json` in the run folder (the id hashes the cells, the shard count and the encoder batch, so rerunning
the same command finds the same launch). Each shard runs `run_shard(launch file, k)`: the runner on the items of
shard k only, writing only its own files, with no communication between shards.

- `slurm`: one job array, one task per unfinished shard; returns at once with the job ids. Rerunning the same
  command submits only the shards that are neither finished nor queued or running (`squeue`); `segprune status RUN`
  shows per-shard progress, the Slurm state, failures and the log path.
- `local`: N shard processes here (submitit's local executor), one per visible GPU on CUDA, or CPU workers that
  split the cores between them; waits for them and reports a failed shard in one line with its log.

Slurm's accounting database is not needed: a shard's state comes from `squeue` while it is queued or running, then
from its records and from submitit's result file (finished, failed with an error, or gone: killed or its node lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.files import Busy, exclusive, read_json, write_json
from harness.shards import Shard, data_key, plan, shard_blocks

LAUNCH_RECOVER = "delete it and rerun the command that launched the grid (finished samples are kept)"
LAUNCHERS = ("none", "local", "slurm")


def launch_file(out_dir: Path, cells: list[Any], shards: int, encoder_batch: int, device: str | None,
                reuse: bool = True, threads: int | None = None) -> Path:
    """Write (or find) the launch of `cells` in `shards` into the run folder; returns its path.

    Its id hashes everything a shard runs with, the harness version and what the model paths hold (file names,
    sizes, times), so the same command finds the same launch, and new weights at the same path make a new one. The
    cells' ids (which include the model's fingerprint) are filled in by the first shard that loads them.
    """
    import harness

    content = {"cells": [{k: v for k, v in asdict(c).items() if k not in ("model_fingerprint", "data_fingerprint")}
                         for c in cells], "shards": shards, "encoder_batch": encoder_batch, "device": device,
               "reuse": reuse, "threads": threads, "harness": harness.__version__,
               "models": {c.model: _stamp(c.model) for c in cells}}
    lid = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    path = out_dir / "launches" / f"{lid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_suffix(".lock"), wait=True):
        old = read_json(path, LAUNCH_RECOVER) if path.is_file() else {}
        write_json(path, {**content, "id": lid, "run_dir": str(out_dir.resolve()), "resolved": old.get("resolved"),
                          "jobs": old.get("jobs", {})})
    return path


def _stamp(model: str) -> list[list[Any]] | str:
    """What a model folder holds, cheaply: each file's name, size and modification time (a name: itself)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    return sorted([str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns]
                  for f in folder.rglob("*") if f.is_file())


def record_resolved(path: Path, cells: list[Any]) -> None:
    """The launch cells' ids in the run folder (with model and data fingerprints), as a shard found them."""
    with exclusive(path.with_suffix(".lock"), wait=True):
        spec = read_json(path, LAUNCH_RECOVER)
        spec["resolved"] = [c.id for c in cells]
        write_json(path, spec)


def read_launch(path: Path) -> dict[str, Any]:
    return read_json(path, LAUNCH_RECOVER)


def record_jobs(path: Path, jobs: dict[int, dict[str, Any]]) -> None:
    with exclusive(path.with_suffix(".lock"), wait=True):
        spec = read_json(path, LAUNCH_RECOVER)
        spec["jobs"].update({str(k): v for k, v in jobs.items()})
        write_json(path, spec)


def run_shard(launch: str, index: int) -> dict[str, Any]:
    """Run shard `index` of a launch (what each Slurm task or local worker calls)."""
    import torch

    from harness.cli import third_parties_offline_and_quiet
    from harness.runner import Cell, run_grid

    third_parties_offline_and_quiet("grid")  # a shard is segprune too: no network, quiet third parties
    spec = read_json(launch, LAUNCH_RECOVER)
    threads = spec.get("threads") or os.environ.get("SLURM_CPUS_PER_TASK")  # the cores it was given, not the node's
    if threads:
        torch.set_num_threads(int(threads))
    cells = [Cell(**{k: v for k, v in c.items() if k in Cell.__dataclass_fields__}) for c in spec["cells"]]
    run_grid(cells, spec["run_dir"], device=spec["device"], shard=Shard(index, spec["shards"]),
             encoder_batch=spec["encoder_batch"], reuse=spec["reuse"], summarize=False,
             on_prepared=lambda ready: record_resolved(Path(launch), ready))
    return {"shard": index}


# -- progress ----------------------------------------------------------------------------------------------------
def progress(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """(done, total) items of each shard of a launch, from the run folder's records (datasets are listed, no model
    is loaded)."""
    import harness
    from harness.runner import Cell, read_cell

    cells = [Cell(**{k: v for k, v in c.items() if k in Cell.__dataclass_fields__}) for c in spec["cells"]]
    datasets: dict[tuple[Any, ...], list[Any]] = {}
    for c in cells:
        if data_key(c) not in datasets:  # as the runner lists it: the whole split, then its first `limit`
            datasets[data_key(c)] = harness.load_dataset(c.dataset, c.split, root=c.data_root)[:c.limit]
    run_dir = Path(spec["run_dir"])
    ids = spec.get("resolved") or [None] * len(cells)  # unknown until a shard has loaded the models: 0 done
    done = {i: {r["sample_id"] for r in read_cell(run_dir / "cells", cid)} if cid else set()
            for i, cid in enumerate(ids)}
    blocks = plan(cells, datasets, spec["encoder_batch"])
    out = []
    for k in range(spec["shards"]):
        items = [(ci, datasets[b.data][si].id) for b in shard_blocks(blocks, Shard(k, spec["shards"]))
                 for ci, si in b.items]
        out.append((sum(sid in done[ci] for ci, sid in items), len(items)))
    return out


def records_written(spec: dict[str, Any]) -> int:
    """Lines in the launch cells' record files: a cheap count for a progress bar (`progress` is exact)."""
    from harness.runner import cell_files

    spec = read_json(spec["path"], LAUNCH_RECOVER) if "path" in spec else spec  # the resolved ids, once known

    run_dir = Path(spec["run_dir"])
    return sum(p.read_bytes().count(b"\n") for cid in spec.get("resolved") or []
               for p in cell_files(run_dir / "cells", cid))


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of the jobs still queued or running (`squeue`; jobs it no longer knows are absent)."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ValueError("squeue did not answer in 60 s; is the Slurm controller up (`sinfo`)?") from None
    if out.returncode != 0:
        raise ValueError(f"squeue failed: {_last_line(out.stderr)}; is Slurm reachable from this machine?")
    states = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
    return {j: states[j] for j in job_ids if j in states}


def shard_states(path: Path) -> list[dict[str, Any]]:
    """Per shard of a launch: done/total items, state, the log and the error of a failed shard."""
    spec = read_json(path, LAUNCH_RECOVER)
    jobs = spec.get("jobs", {})
    queued = queue_states([j["job_id"] for j in jobs.values() if j.get("launcher") == "slurm"])
    rows = []
    for k, (done, total) in enumerate(progress(spec)):
        job = jobs.get(str(k), {})
        row = {"shard": k, "done": done, "total": total, "job": job.get("job_id"), "log": job.get("stderr")}
        writing = _writing(Path(spec["run_dir"]), Shard(k, spec["shards"]))
        row["queued"] = job.get("job_id") in queued or writing
        if done == total:
            row["state"] = "finished"
        elif row["queued"]:
            row["state"] = queued[job["job_id"]].lower() if job.get("job_id") in queued else "running"
        elif not job:
            row["state"] = "not submitted"
        else:
            error = failure(job)
            row["state"] = f"failed: {error}" if error else "stopped (killed, timed out or its node lost)"
        rows.append(row)
    return rows


def _writing(run_dir: Path, shard: Shard) -> bool:
    """Whether a process holds one of the shard's cell locks now (it is running, on any node of a shared file
    system); a dead one holds none."""
    for lock in (run_dir / "cells").glob(f"*{shard.suffix}.lock") if shard.count > 1 else ():
        try:
            with exclusive(lock, wait=False):
                pass
        except Busy:
            return True
    return False


def failure(job: dict[str, Any]) -> str | None:
    """The last line of a shard's error, from submitit's result file (None if it wrote none)."""
    result = Path(job.get("result", ""))
    if not job.get("result") or not result.is_file():
        return None
    try:
        with result.open("rb") as f:
            outcome, value = pickle.load(f)  # submitit's own file, written by our job
    except Exception:  # noqa: BLE001 - a damaged result file is reported as such
        return "its result file is unreadable"
    return _last_line(str(value)) if outcome == "error" else None


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no message"


# -- Slurm -------------------------------------------------------------------------------------------------------
def launch_slurm(path: Path, *, partition: str | None, gpus_per_task: int, cpus_per_task: int | None,
                 mem_gb: float | None, time_min: int, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Submit the unfinished shards of a launch that are not queued or running as one job array."""
    import submitit

    if not shutil.which("sbatch"):
        raise ValueError("--launcher slurm needs Slurm's sbatch on this machine (not found on PATH); run on a node "
                         "that can submit jobs, or use --launcher local")
    spec = read_json(path, LAUNCH_RECOVER)
    states = shard_states(path)
    waiting = [s["shard"] for s in states if s["queued"] and s["state"] != "finished"]  # in squeue, any state
    todo = [s["shard"] for s in states if s["state"] != "finished" and not s["queued"]]
    if not todo:
        return {"submitted": {}, "waiting": waiting, "finished": sum(s["state"] == "finished" for s in states)}
    executor = submitit.SlurmExecutor(folder=Path(spec["run_dir"]) / "logs" / "%j")
    params: dict[str, Any] = {"job_name": f"segprune-{spec['id']}", "time": time_min, "gpus_per_task": gpus_per_task,
                              "ntasks_per_node": 1, "array_parallelism": len(todo), "signal_delay_s": 120}
    if partition:
        params["partition"] = partition
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if mem_gb:
        params["mem"] = f"{int(mem_gb * 1024)}M"
    if extra:
        params["additional_parameters"] = extra
    if not gpus_per_task:
        del params["gpus_per_task"]
    executor.update_parameters(**params)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            jobs = executor.map_array(run_shard, [str(path)] * len(todo), todo)  # sbatch's own lines: in the error
    except (subprocess.CalledProcessError, OSError, RuntimeError) as err:
        detail = getattr(err, "stderr", None) or getattr(err, "output", None) or str(err)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise ValueError(f"sbatch refused the job array: {_last_line(str(detail))}; check --partition, --time and "
                         f"--gpus-per-task against `sinfo`") from None
    submitted = {k: _job_record(job, "slurm") for k, job in zip(todo, jobs, strict=True)}
    record_jobs(path, submitted)
    return {"submitted": submitted, "waiting": waiting, "finished": sum(s["state"] == "finished" for s in states)}


def _job_record(job: Any, launcher: str) -> dict[str, Any]:
    return {"job_id": str(job.job_id), "launcher": launcher, "stderr": str(job.paths.stderr),
            "stdout": str(job.paths.stdout), "result": str(job.paths.result_pickle), "submitted": time.time()}


# -- local -------------------------------------------------------------------------------------------------------
def launch_local(path: Path, workers: int, *, on_progress: Any = None) -> None:
    """Run the unfinished shards of a launch as local processes (one per GPU on CUDA, else CPU workers) and wait."""
    import submitit
    import torch

    spec = read_json(path, LAUNCH_RECOVER)
    gpus = worker_gpus(workers, spec["device"], torch.cuda.device_count())
    states = shard_states(path)
    running = [s["shard"] for s in states if s["queued"] and s["state"] != "finished"]
    if running:
        raise ValueError(f"shard(s) {', '.join(map(str, running))} of this grid are being run by another local "
                         f"launch into {spec['run_dir']}; wait for it (`segprune status`), or use another --out")
    todo = [s["shard"] for s in states if s["state"] != "finished"]
    executor = submitit.LocalExecutor(folder=Path(spec["run_dir"]) / "logs" / "local-%j")
    jobs = {}
    for k in todo:
        one = {"gpus_per_node": 1, "visible_gpus": (gpus[k],)} if gpus else {"gpus_per_node": 0}
        executor.update_parameters(timeout_min=60 * 24 * 30, **one)
        jobs[k] = executor.submit(run_shard, str(path), k)
    record_jobs(path, {k: _job_record(job, "local") for k, job in jobs.items()})
    total = sum(s["total"] for s in states)
    spec["path"] = str(path)
    try:
        while not all(job.done() for job in jobs.values()):
            if on_progress:
                on_progress(min(total, records_written(spec)), total)
            time.sleep(2)
    except KeyboardInterrupt:
        for job in jobs.values():
            job.cancel(check=False)
        raise
    if on_progress:
        on_progress(min(total, records_written(spec)), total)
    failed = [(k, job) for k, job in jobs.items() if job.exception() is not None]
    if failed:
        k, job = failed[0]
        error = failure(_job_record(job, "local")) or "it stopped without a result (killed?)"
        raise ValueError(f"shard {k} of {spec['shards']} failed: {error} (log: {job.paths.stderr}); rerun the same "
                         f"command to run only the unfinished shards")


def worker_gpus(workers: int, device: str | None, visible: int) -> list[int]:
    """The GPU each local worker gets (as CUDA_VISIBLE_DEVICES, so it sees it as cuda:0): the k-th of this process's
    visible GPUs (its own CUDA_VISIBLE_DEVICES, if set); [] on CPU."""
    if not device or not device.startswith("cuda"):
        return []
    if device != "cuda":
        raise ValueError(f"--launcher local gives each worker one GPU: use --device cuda, not {device} (restrict the "
                         f"GPUs with CUDA_VISIBLE_DEVICES)")
    if workers > visible:
        raise ValueError(f"--workers {workers} but {visible} GPU(s) are visible; use at most one worker per GPU")
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not listed:
        return list(range(workers))
    ids = [x.strip() for x in listed.split(",") if x.strip()]
    if not all(x.isdigit() for x in ids):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={listed} names GPUs by UUID; give their indices to use "
                         f"--launcher local")
    return [int(x) for x in ids[:workers]]


def local_threads(workers: int, device: str | None) -> int | None:
    """CPU threads per local worker: the cores split between them (None on CUDA: torch's default)."""
    if device and device.startswith("cuda"):
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def launches(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "launches").glob("*.json"), key=lambda p: p.stat().st_mtime)


"""Launchers: shards as local worker processes (submitit's local executor) and as a job array on a real Slurm
(`.ci/slurm up` starts a one-node cluster; the Slurm tests skip when none answers). Merged results equal one
process's; a killed shard is resumed alone; bad options and an unreachable Slurm are one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.launch import launches, local_threads, shard_states, worker_gpus
from harness.runner import expand_grid, load_run, read_cell, run_grid
from tests.test_faults import one_line_error
from tests.test_shards import same_results

GRID = """models: [random:tiny]
methods: [none, "fastv@75%"]
datasets: ["shapes-ref:val", "shapes-ref:testA"]
limit: {limit}
"""


def write_grid(tmp_path: Path, limit: int = 6, datasets: str = '"shapes-ref:val", "shapes-ref:testA"') -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace('"shapes-ref:val", "shapes-ref:testA"', datasets).format(limit=limit))
    return path


def single_process(tmp_path: Path, limit: int = 6, threads: int | None = None,
                   datasets: tuple[str, ...] = ("shapes-ref:val", "shapes-ref:testA"),
                   encoder_batch: int = 2) -> dict[tuple[str, str, str], list]:
    """The grid in this process, with the workers' CPU threads (float reductions on CPU depend on the thread count:
    one pixel of one mask differed between 1 and 2 threads)."""
    cells = expand_grid(["random:tiny"], ["none", "fastv@75%"], list(datasets), limit=limit)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        run_grid(cells, tmp_path / "single", encoder_batch=encoder_batch)
    finally:
        torch.set_num_threads(before)
    return records_by_cell(tmp_path / "single")


def records_by_cell(run: Path) -> dict[tuple[str, str, str], list[dict]]:
    return {(r["spec"], r["dataset"], r["split"]): read_cell(run / "cells", r["cell"]) for r in load_run(run)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert [r["sample_id"] for r in a[key]] == [r["sample_id"] for r in b[key]], key
        assert all(same_results(x, y) for x, y in zip(a[key], b[key], strict=True)), key


def test_local_workers_merge_to_the_single_process_records(tmp_path):
    grid = write_grid(tmp_path, datasets='"shapes-ref:val"')  # 3 images, a block each: shard 0 gets images 1-2,
    out = CliRunner().invoke(main, ["grid", str(grid), "--out", str(tmp_path / "run"), "--launcher", "local",
                                    "--workers", "2", "--encoder-batch", "1"])  # shard 1 image 3, of the same cells
    assert out.exit_code == 0, out.output
    assert "fastv@75%" in out.output
    merged = records_by_cell(tmp_path / "run")
    assert_same(merged, single_process(tmp_path, threads=local_threads(2, None), datasets=("shapes-ref:val",),
                                       encoder_batch=1))
    assert all(len(list((tmp_path / "run" / "cells").glob(f"{r['cell']}.*-of-2.jsonl"))) == 2
               for r in load_run(tmp_path / "run"))  # both shards wrote every cell, side by side
    (launch,) = launches(tmp_path / "run")
    assert [(s["done"], s["total"], s["state"]) for s in shard_states(launch)] == [(8, 8, "finished"),
                                                                                  (4, 4, "finished")]
    status = CliRunner().invoke(main, ["status", str(tmp_path / "run")])
    assert status.exit_code == 0 and "local, 2 shard(s)" in status.output and "finished" in status.output


@pytest.mark.parametrize("args, message", [
    (["--launcher", "local"], "needs --workers"),
    (["--launcher", "local", "--workers", "2", "--shards", "3"], "leave out --shards"),
    (["--workers", "2"], "--workers is an option of --launcher local"),
    (["--partition", "gpu"], "--partition is an option of --launcher slurm"),
    (["--shards", "2"], "add --launcher slurm, or --shard K"),
    (["--shard", "1"], "--shard K needs --shards N"),
    (["--shard", "2", "--shards", "2"], "numbered 0..count-1"),
    (["--launcher", "slurm", "--shards", "0"], "--shards must be at least 1"),
    (["--launcher", "slurm", "--time", "0"], "--time is in minutes"),
    (["--encoder-batch", "0"], "--encoder-batch must be at least 1"),
])
def test_bad_launcher_options_are_one_line(tmp_path, args, message):
    out = CliRunner().invoke(main, ["grid", str(write_grid(tmp_path)), "--out", str(tmp_path / "run"), *args])
    one_line_error(out, message)


def test_one_shard_in_this_process_then_the_rest(tmp_path):
    grid, run = write_grid(tmp_path), tmp_path / "run"
    for k in (1, 0):
        out = CliRunner().invoke(main, ["grid", str(grid), "--out", str(run), "--shard", str(k), "--shards", "2",
                                        "--encoder-batch", "2"])
        assert out.exit_code == 0, out.output
        assert f"shard {k} of 2" in out.output
    assert_same(records_by_cell(run), single_process(tmp_path))


def test_each_local_worker_gets_its_own_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus(3, "cuda", 4) == [0, 1, 2] and worker_gpus(2, None, 0) == [] and worker_gpus(2, "cpu", 8) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,2")  # this process's GPUs, by index: the workers get those
    assert worker_gpus(2, "cuda", 3) == [5, 7]
    with pytest.raises(ValueError, match="at most one worker per GPU"):
        worker_gpus(4, "cuda", 3)
    with pytest.raises(ValueError, match="use --device cuda, not cuda:1"):
        worker_gpus(2, "cuda:1", 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3f2a,GPU-77b1")
    with pytest.raises(ValueError, match="by UUID"):
        worker_gpus(2, "cuda", 2)


def test_a_second_local_launch_of_a_running_grid_is_refused(tmp_path):
    from harness.files import exclusive
    from harness.launch import launch_file, launch_local

    cells = expand_grid(["random:tiny"], ["none"], ["shapes-ref:val"], limit=4)  # 2 images: a block per shard
    path = launch_file(tmp_path, cells, 2, 1, None)
    (tmp_path / "cells").mkdir()
    with exclusive(tmp_path / "cells" / "0123456789ab.1-of-2.lock", wait=False):  # shard 1's worker is writing
        with pytest.raises(ValueError, match=r"shard\(s\) 1 of this grid are being run by another local launch"):
            launch_local(path, 2)
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_slurm_without_sbatch_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = CliRunner().invoke(main, ["grid", str(write_grid(tmp_path)), "--out", str(tmp_path / "run"),
                                    "--launcher", "slurm"])
    one_line_error(out, "needs Slurm's sbatch", "--launcher local")


# -- a real Slurm ------------------------------------------------------------------------------------------------
def slurm_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


@pytest.fixture
def slurm():
    """A Slurm cluster that answers; CI (SEGPRUNE_REQUIRE_SLURM) starts one, so there it must."""
    if slurm_answers():
        return
    if os.environ.get("SEGPRUNE_REQUIRE_SLURM"):
        pytest.fail("SEGPRUNE_REQUIRE_SLURM is set but no Slurm cluster answers `sinfo`; run `.ci/slurm up`")
    pytest.skip("no Slurm cluster answers (`.ci/slurm up` starts a one-node one)")


def show(capsys, text: str) -> None:
    """Into the CI log, past pytest's capture: what a user of the real Slurm sees."""
    with capsys.disabled():
        print("".join(f"\n[slurm test] {line}" for line in str(text).strip().splitlines()))


def wait_for_queue(timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["squeue", "-h", "--me", "-o", "%i"], capture_output=True, text=True, timeout=30)
        if not out.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"Slurm jobs still queued after {timeout} s: {out.stdout}")


def submit(grid: Path, run: Path, *extra: str, capsys=None):
    out = CliRunner().invoke(main, ["grid", str(grid), "--out", str(run), "--launcher", "slurm", "--shards", "2",
                                    "--encoder-batch", "2", "--time", "10", "--cpus-per-task", "1", *extra])
    if capsys is not None:
        show(capsys, out.output)
    return out


@pytest.mark.slurm
def test_slurm_job_array_merges_to_the_single_process_records(tmp_path, slurm, capsys):
    grid, run = write_grid(tmp_path), tmp_path / "run"
    out = submit(grid, run, capsys=capsys)
    assert out.exit_code == 0 and "submitted shard(s) 0, 1 of 2 as Slurm job" in out.output, out.output
    twice = submit(grid, run, capsys=capsys)  # the same launch again while it runs: nothing is submitted twice
    assert twice.exit_code == 0 and "submitted shard" not in twice.output, twice.output
    assert "already queued or running" in twice.output or "every shard is finished" in twice.output
    wait_for_queue()
    status = CliRunner().invoke(main, ["status", str(run)])
    show(capsys, status.output)
    assert status.exit_code == 0 and status.output.count("12 / 12") == 2, status.output
    assert [s["state"] for s in shard_states(launches(run)[0])] == ["finished", "finished"]
    assert_same(records_by_cell(run), single_process(tmp_path, threads=1))  # a task's torch threads: its 1 CPU
    again = submit(grid, run, capsys=capsys)
    assert again.exit_code == 0 and "every shard is finished" in again.output  # nothing is done twice


@pytest.mark.slurm
def test_a_killed_slurm_shard_is_resubmitted_alone(tmp_path, slurm, capsys):
    grid, run = write_grid(tmp_path, limit=40), tmp_path / "run"
    assert submit(grid, run, capsys=capsys).exit_code == 0
    lock = None
    end = time.time() + 120
    while time.time() < end:  # shard 1's writer has started and written a record: kill -9 its process
        files = list((run / "cells").glob("*.1-of-2.jsonl")) if (run / "cells").is_dir() else []
        if any(f.stat().st_size for f in files):
            lock = files[0].with_suffix(".lock")
            break
        time.sleep(0.2)
    assert lock is not None, "shard 1 wrote nothing"
    os.kill(int(lock.read_text().strip()), signal.SIGKILL)
    launch = launches(run)[0]
    end = time.time() + 60
    while time.time() < end and not shard_states(launch)[1]["state"].startswith(("stopped", "failed")):
        time.sleep(0.5)  # Slurm notices the task died and takes it off the queue
    show(capsys, f"after kill -9 of shard 1: {[s['state'] for s in shard_states(launch)]}")
    again = submit(grid, run)  # shard 0 still running or finished: only shard 1 goes again, if it died
    show(capsys, again.output)
    assert again.exit_code == 0 and "submitted shard(s) 1 of 2" in again.output, again.output
    assert "submitted shard(s) 0" not in again.output
    wait_for_queue()
    states = shard_states(launch)
    assert all(s["state"] == "finished" for s in states), states
    merged = records_by_cell(run)
    assert all(len(v) == 40 and len({r["sample_id"] for r in v}) == 40 for v in merged.values())


@pytest.mark.slurm
def test_sbatch_refusing_the_array_is_one_line(tmp_path, slurm):
    out = submit(write_grid(tmp_path), tmp_path / "run", "--partition", "no-such-partition")
    one_line_error(out, "sbatch refused the job array", "--partition")

"""What a machine or a second process can do to a run folder: each is one line, a non-zero exit, nothing lost."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import harness
from harness.cli import main
from harness.files import exclusive, read_json, write_json
from harness.runner import expand_grid, load_run, prepare_grid, run_grid

RUN = ["run", "--model", "random:tiny", "--dataset", "toy:val", "--limit", "1"]


def one_line_error(out, *fragments: str) -> None:
    assert out.exit_code == 2, out.output
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output, out.output
    for fragment in fragments:
        assert fragment in out.output, out.output


def test_a_file_too_large_for_the_disk_leaves_the_old_config_whole(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size, as a full disk does mid-file: the rewrite of a
    config.json that grows past it must fail as one line and leave the previous file as it was."""
    out = tmp_path / "run"
    assert CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(out)]).exit_code == 0
    before = (out / "config.json").read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 200}, {len(before) + 200}))
        from harness.cli import main
        sys.argv = ["segprune", *{[*RUN, "--method", "downsample", "--method", "random", "--out", str(out)]!r}]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: File too large: ") and len(done.stderr.strip().splitlines()) == 1
    assert (out / "config.json").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_run_file_is_named_with_how_to_recover(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(out)]).exit_code == 0
    (out / "config.json").write_text('{"cells": [')
    one_line_error(CliRunner().invoke(main, ["table", str(out)]), f"{out / 'config.json'} is corrupt",
                   "rerun the commands")
    one_line_error(CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(out)]), "is corrupt")


def test_write_json_replaces_whole_and_keeps_permissions_usual(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2})
    assert read_json(path, "") == {"x": 2} and os.listdir(tmp_path) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("code, hint", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                        (errno.EACCES, "no permission")])
def test_os_errors_are_one_line_with_the_file_and_a_fix(tmp_path, monkeypatch, code, hint):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "run" / "config.json"))

    monkeypatch.setattr("harness.runner.run_grid", fail)
    one_line_error(CliRunner().invoke(main, [*RUN, "--out", str(tmp_path / "run")]), os.strerror(code),
                   "config.json", hint)


def test_a_failed_rename_names_both_files(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)  # as the kernel reports it

    monkeypatch.setattr(os, "replace", fail)
    out = CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(tmp_path / "run")])
    one_line_error(out, os.strerror(errno.EXDEV), "config.json.", " -> ", "config.json")


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"), ("meta", "cpu, cuda or mps")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device"),
                                                                   ("cuda:1", "no CUDA device")]))
def test_devices_this_machine_lacks_are_one_line(tmp_path, device, message):
    one_line_error(CliRunner().invoke(main, [*RUN, "--method", "none", "--device", device, "--out",
                                             str(tmp_path / "run")]), message)


def test_a_second_writer_of_a_cell_is_refused_and_writes_nothing(tmp_path):
    cells, _, _, _ = prepare_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=1))
    (tmp_path / "cells").mkdir()
    with exclusive(tmp_path / "cells" / f"{cells[0].id}.lock", wait=False):  # as a first `run` holds it
        out = CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(tmp_path)])
    one_line_error(out, "is being run into", f"pid {os.getpid()}", "another --out")
    assert not (tmp_path / "cells" / f"{cells[0].id}.jsonl").exists()
    assert CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(tmp_path)]).exit_code == 0  # released


def test_summaries_keep_the_cells_of_earlier_commands(tmp_path):
    for method in ("none", "downsample"):
        assert CliRunner().invoke(main, [*RUN, "--method", method, "--out", str(tmp_path)]).exit_code == 0
    assert [r["method"] for r in json.loads((tmp_path / "summary.json").read_text())] == ["none", "downsample"]
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3


def test_a_model_is_one_cell_however_its_path_is_spelled(tmp_path, monkeypatch):
    harness.load_model("random:tiny").save_pretrained(tmp_path / "models" / "m")
    monkeypatch.chdir(tmp_path / "models")
    for spelling in (str(tmp_path / "models" / "m"), "m", "../models/m"):
        run_grid(expand_grid([spelling], ["none"], ["toy:val"], limit=1), tmp_path / "run")
    assert len(load_run(tmp_path / "run")) == 1
    assert len(list((tmp_path / "run" / "cells").glob("*.jsonl"))) == 1


@pytest.mark.parametrize("yaml, message", [
    ("- none\n", "a grid is a mapping"),
    ("methods: 3\ndatasets: ['toy:val']\n", "'methods' must be a list of names"),
    ("methods: [none, {k: 2}]\ndatasets: ['toy:val']\n", "'methods' must be a list of names"),
    ("methods: [none]\ndatasets: ['toy:val']\nlimit: 8.5\n", "'limit' must be a whole number"),
    ("methods: [none]\ndatasets: ['toy:val']\nlimit: 0\n", "'limit' must be a whole number"),
    ("methods: [none]\ndatasets: ['toy:val']\ndtype: fp8\n", "'dtype' must be one of fp32, bf16, fp16"),
    ("methods: [none]\ndatasets: ['toy:val']\nmodel: [a, b]\n", "'model' must be one model"),
    ("methods: [none]\ndatasets: ['toy:val'\n", "not valid YAML"),
])
def test_grid_files_are_checked_before_anything_runs(tmp_path, yaml, message):
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml)
    one_line_error(CliRunner().invoke(main, ["grid", str(cfg), "--out", str(tmp_path / "run")]), message)
    assert not (tmp_path / "run").exists()


def test_a_single_name_where_a_list_is_expected_is_that_one_name(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model: random:tiny\nmethods: none\ndatasets: toy:val\nlimit: 1\n")
    out = CliRunner().invoke(main, ["grid", str(cfg), "--out", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert [(r["method"], r["n"]) for r in load_run(tmp_path / "run")] == [("none", 1)]


def test_viz_limit_below_one_is_one_line(tmp_path):
    assert CliRunner().invoke(main, [*RUN, "--method", "none", "--out", str(tmp_path)]).exit_code == 0
    for limit in ("0", "-38"):
        one_line_error(CliRunner().invoke(main, ["viz", str(tmp_path), "--limit", limit]), "--limit must be at least 1")

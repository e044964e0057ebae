"""What a machine or a second process can do to a run folder: each is one line, a non-zero exit, nothing lost."""

from __future__ import annotations

import dataclasses
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
        from harness.cli import main
        import harness.runner  # imported before the limit: torch 2.6 writes generated code to disk at import
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 200}, {len(before) + 200}))
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


def test_a_split_is_one_cell_however_its_root_is_spelled(tmp_path, monkeypatch):
    from tests.test_datasets import _refer_root

    _refer_root(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    for spelling in (str(tmp_path / "data"), "data", "./data/refer_seg"):
        run_grid(expand_grid(["random:tiny"], ["none"], ["refcoco:val"], limit=1, data_root=spelling),
                 tmp_path / "run")
    assert len(load_run(tmp_path / "run")) == 1


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


def test_a_wrong_size_image_or_a_bad_rle_names_the_file(tmp_path):
    from PIL import Image

    from tests.test_datasets import _refer_root

    root = _refer_root(tmp_path / "data")
    images = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    Image.new("RGB", (30, 20)).save(images / "COCO_train2014_000000000001.jpg")  # the annotation says 60x40
    out = CliRunner().invoke(main, ["run", "--model", "random:tiny", "--dataset", "refcoco:val", "--method", "none",
                                    "--data-root", str(root), "--out", str(tmp_path / "run")])
    one_line_error(out, "COCO_train2014_000000000001.jpg is 30x20 pixels but its annotation is 60x40")

    inst = root / "refer_seg" / "refcoco" / "instances.json"
    data = json.loads(inst.read_text())
    data["annotations"][1]["segmentation"] = {"size": [40, 60], "counts": [5, 9999]}
    inst.write_text(json.dumps(data))
    out = CliRunner().invoke(main, ["run", "--model", "random:tiny", "--dataset", "refcoco:testA", "--method", "none",
                                    "--data-root", str(root), "--out", str(tmp_path / "run")])
    one_line_error(out, f"annotation 12 in {inst}: cannot decode its segmentation")


def test_a_method_given_twice_is_one_row_and_the_table_shows_the_spec_as_written(tmp_path):
    out = CliRunner().invoke(main, [*RUN, "--method", "none", "--method", "fastv", "--method", "fastv:k=2",
                                    "--method", "csp:cluster=cls", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    labels = [line.split()[0] for line in out.output.splitlines()[2:5]]
    assert labels == ["none", "fastv", "csp:cluster=cls"] and "null" not in out.output
    assert "csp:l_c=null" in (tmp_path / "config.json").read_text()  # the resolved spec stays in the run folder


def test_latex_header_has_a_real_delta(tmp_path):
    assert CliRunner().invoke(main, [*RUN, "--method", "none", "--method", "downsample", "--out",
                                     str(tmp_path)]).exit_code == 0
    latex = CliRunner().invoke(main, ["table", str(tmp_path), "--format", "latex"]).output
    assert "$\\Delta$gIoU" in latex and "textbackslash" not in latex and "\\$" not in latex


def test_plot_refuses_an_empty_run_and_marks_a_partial_one(tmp_path, monkeypatch):
    from harness.report import plot_run

    cells = expand_grid(["random:tiny"], ["none", "downsample"], ["toy:val"], limit=2)
    run_grid(cells[:1], tmp_path / "run")
    config = tmp_path / "run" / "config.json"
    cfg = json.loads(config.read_text())
    empty = tmp_path / "empty"
    (empty / "cells").mkdir(parents=True)
    (empty / "config.json").write_text(json.dumps(cfg))
    for f in (tmp_path / "run" / "cells").glob("*.jsonl"):
        (empty / "cells" / f.name).write_text("")
    one_line_error(CliRunner().invoke(main, ["plot", str(empty)]), "no cell with a finished mean gIoU")

    prepared, _, _, _ = prepare_grid(cells)  # the second cell listed in the config but never run: partial grid
    cfg["cells"].append({**dataclasses.asdict(prepared[1]), "id": prepared[1].id})
    config.write_text(json.dumps(cfg))
    titles = []
    monkeypatch.setattr("matplotlib.figure.Figure.suptitle", lambda self, t, **kw: titles.append(t))
    plot_run(tmp_path / "run")
    assert titles and titles[0].endswith("partial: 1 cell(s) unfinished")


def test_sigterm_stops_like_ctrl_c_and_writes_the_summary(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import harness.runner as runner
        real = runner.evaluate
        def run_then_terminate(*args, **kwargs):  # the second cell's sample is stopped by a scheduler's SIGTERM
            if (runner.Path({str(tmp_path)!r}) / "summary.done").exists():
                os.kill(os.getpid(), signal.SIGTERM)
            out = real(*args, **kwargs)
            (runner.Path({str(tmp_path)!r}) / "summary.done").touch()
            return out
        runner.evaluate = run_then_terminate
        from harness.cli import main
        sys.argv = ["segprune", *{[*RUN, "--method", "none", "--method", "downsample", "--out", str(tmp_path)]!r}]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "terminated: finished samples are saved" in done.stderr
    assert [r["method"] for r in json.loads((tmp_path / "summary.json").read_text())] == ["none", "downsample"]
    assert [r["n"] for r in json.loads((tmp_path / "summary.json").read_text())] == [1, 0]


def test_shapes_ref_is_generated_only_into_the_cache_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPRUNE_CACHE", str(tmp_path / "cache"))
    samples = harness.load_dataset("shapes-ref", "testA", root=str(tmp_path / "typo"), limit=1)
    assert len(samples) == 1 and not (tmp_path / "typo").exists()
    assert (tmp_path / "cache" / "shapes-ref-v2" / "testA" / "refs(unc).p").is_file()
    out = CliRunner().invoke(main, ["data", "shapes-ref", "--split", "testA", "--data-root", str(tmp_path / "asked")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "asked" / "shapes-ref-v2" / "testA" / "refs(unc).p").is_file()


def test_a_damaged_or_orphaned_generation_is_repaired_and_the_split_is_shareable(tmp_path):
    from harness.datasets.shapes import generate

    folder = tmp_path / "shapes-ref-v2" / "val"
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = tmp_path / "shapes-ref-v2" / f".val-{gone.pid}-x1y2"  # a generation killed mid-way
    orphan.mkdir(parents=True)
    generate("val", folder, n_images=2)
    (folder / "refs(unc).p").unlink()  # a file deleted by hand
    generate("val", folder, n_images=2)
    assert (folder / "refs(unc).p").is_file() and not orphan.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_copied_bundled_model_is_checksum_checked(tmp_path):
    import shutil

    from harness.model import BUNDLED

    copy = tmp_path / "copy"
    shutil.copytree(BUNDLED, copy)
    harness.load_model(str(copy))  # intact: loads
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its checksum"):
        harness.load_model(str(copy))

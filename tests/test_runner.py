"""Runs: content-hashed cells, flushed records, resume after interruption or a torn line, readable errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import harness
from harness.cli import main
from harness.runner import Cell, expand_grid, load_run, read_records, run_grid


def test_cell_ids_hash_resolved_content():
    a = expand_grid(["random:tiny"], ["random"], ["toy:val"], limit=3)[0]
    b = expand_grid(["random:tiny"], ["random:k=2,ratio=0.5,seed=0"], ["toy:val"], limit=3)[0]
    c = expand_grid(["random:tiny"], ["random:ratio=0.25"], ["toy:val"], limit=3)[0]
    assert a.id == b.id != c.id
    assert a.method == "random:k=2,ratio=0.5,seed=0"


def test_method_name_of_a_budget_spec_is_the_registered_name():
    assert [Cell(model="m", method=m, dataset="d", split="val").method_name
            for m in ("fastv@75%", "csp:fill=none@50%", "pdrop:ratio=0.5", "none")] == ["fastv", "csp", "pdrop", "none"]


def test_run_writes_records_and_resumes_without_recomputing(tmp_path, monkeypatch):
    cells = expand_grid(["random:tiny"], ["none", "random:ratio=0.75"], ["toy:val"], limit=3)
    rows = run_grid(cells, tmp_path)
    assert [r["n"] for r in rows] == [3, 3] and all(r["complete"] for r in rows)
    for name in ("config.json", "environment.json", "summary.csv", "summary.json"):
        assert (tmp_path / name).is_file()
    env = json.loads((tmp_path / "environment.json").read_text())
    assert {"torch", "transformers", "git_commit", "device", "dtype", "attention", "model_fingerprint"} <= set(env)
    lock = Path(__file__).resolve().parents[1] / "uv.lock"  # the checkout's own lock, whichever environment runs this
    assert env["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert env["lock"]["locked"] == (not env["lock"]["differences"])
    rec = read_records(tmp_path / "cells" / f"{rows[1]['cell']}.jsonl")[0]
    assert rec["image_tokens_per_layer"] == [256, 256] + [64] * 6
    assert {"intersection", "union", "flops", "llm_flops", "latency_s", "mask_rle", "kept_patches"} <= set(rec)

    def boom(*args, **kwargs):
        raise AssertionError("a finished sample was recomputed")

    monkeypatch.setattr(harness.SegModel, "segment", boom)
    again = run_grid(cells, tmp_path)
    assert [r["giou"] for r in again] == [r["giou"] for r in rows]


def test_torn_last_line_is_dropped_and_the_sample_rerun(tmp_path):
    cells = expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=2)
    cid = run_grid(cells, tmp_path)[0]["cell"]
    path = tmp_path / "cells" / f"{cid}.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed mid-write
    assert len(read_records(path)) == 1
    rows = run_grid(cells, tmp_path)
    assert rows[0]["n"] == 2 and len(path.read_text().splitlines()) == 2


def test_interrupted_run_keeps_finished_samples_and_tables_partial_cells(tmp_path, monkeypatch):
    cells = expand_grid(["random:tiny"], ["none", "downsample"], ["toy:val"], limit=3)
    real = harness.SegModel.segment
    calls = {"n": 0}

    def ctrl_c_on_fifth_sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(harness.SegModel, "segment", ctrl_c_on_fifth_sample)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cells, tmp_path)
    rows = load_run(tmp_path)  # image by image: images 1 and 2 in both cells, then the stop
    assert [r["n"] for r in rows] == [2, 2] and not any(r["complete"] for r in rows)
    out = CliRunner().invoke(main, ["table", str(tmp_path)])
    assert out.exit_code == 0 and "(partial: toy:val)" in out.output
    monkeypatch.setattr(harness.SegModel, "segment", real)
    assert [r["n"] for r in run_grid(cells, tmp_path)] == [3, 3]


def test_cli_run_table_methods_flops(tmp_path):
    cli = CliRunner()
    out = cli.invoke(main, ["run", "--limit", "2", "--method", "none", "--method", "random:ratio=0.5",
                            "--out", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert "gIoU" in out.output and f"run folder: {tmp_path / 'r'}" in out.output
    md = cli.invoke(main, ["table", str(tmp_path / "r"), "--format", "markdown"])
    assert md.exit_code == 0 and md.output.startswith("| group")
    listing = cli.invoke(main, ["methods", "--json"])
    names = {m["name"] for m in json.loads(listing.output)}
    assert {"none", "random", "downsample"} <= names
    fl = cli.invoke(main, ["flops", "psalm-phi-1.5", "--text-tokens", "0", "--image-tokens", "450"])
    assert fl.exit_code == 0 and "1,126.98" in fl.output


def test_cli_grid_from_yaml(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model: random:tiny\nmethods: [none, 'downsample:stride=4']\ndatasets: ['toy:val']\nlimit: 2\n")
    out = CliRunner().invoke(main, ["grid", str(cfg), "--out", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert "downsample:stride=4" in out.output


@pytest.mark.parametrize("args, message", [
    (["run", "--method", "fastvv"], "unknown method 'fastvv'"),
    (["run", "--method", "random:ratio=2"], "ratio"),
    (["run", "--method", "random:k=99", "--limit", "1"], "beyond the model"),
    (["run", "--model", "random:huge", "--limit", "1"], "unknown model"),
    (["run", "--dataset", "nope:val"], "unknown dataset"),
    (["run", "--limit", "0"], "limit"),
    (["table", "/does/not/exist"], "does not exist"),
    (["flops", "lisa-70b"], "unknown architecture"),
    (["flops", "lisa-7b", "--schedule", "abc"], "cannot parse schedule"),
])
def test_user_errors_are_one_line_and_nonzero(tmp_path, args, message):
    out = CliRunner().invoke(main, args + (["--out", str(tmp_path / "r")] if args[0] == "run" else []))
    assert out.exit_code == 2
    assert message in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_table_of_a_folder_that_is_not_a_run(tmp_path):
    out = CliRunner().invoke(main, ["table", str(tmp_path)])
    assert out.exit_code == 2 and "not a segprune run folder" in out.output


def test_undecodable_image_is_a_readable_error(tmp_path, tiny):
    import ultralytics  # noqa: F401  (it wraps Image.open; a corrupt file must still give the readable error)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        tiny.segment(bad, "the red square")


def test_cell_round_trips_through_config_and_ids_name_the_weights(tmp_path):
    cells = expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=1)
    cid = run_grid(cells, tmp_path)[0]["cell"]
    saved = json.loads((tmp_path / "config.json").read_text())["cells"][0]
    assert Cell(**{k: v for k, v in saved.items() if k != "id"}).id == saved["id"] == cid
    assert saved["model_fingerprint"] and cid != cells[0].id  # the id covers the weights, not only the name


def test_second_command_into_the_same_folder_keeps_the_first_cells(tmp_path):
    run_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=1), tmp_path)
    run_grid(expand_grid(["random:tiny"], ["downsample"], ["toy:val"], limit=1), tmp_path)
    assert [r["method"] for r in load_run(tmp_path)] == ["none", "downsample"]


def test_table_uses_stored_ids_after_a_version_change(tmp_path, monkeypatch):
    run_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=2), tmp_path)
    monkeypatch.setattr(harness, "__version__", "99.0")
    row = load_run(tmp_path)[0]
    assert row["n"] == 2 and not row["missing"]


def test_larger_limit_resumes_and_smaller_limit_shows_the_prefix(tmp_path):
    first = run_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=2), tmp_path)[0]
    more = run_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=3), tmp_path)[0]
    assert first["cell"] == more["cell"] and more["n"] == 3
    path = tmp_path / "cells" / f"{more['cell']}.jsonl"
    assert len(path.read_text().splitlines()) == 3  # the first two were not recomputed
    fewer = run_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=1), tmp_path)[0]
    assert fewer["n"] == 1


def test_bad_cells_fail_before_anything_runs(tmp_path):
    cells = expand_grid(["random:tiny"], ["none", "random:k=99"], ["toy:val"], limit=1)
    with pytest.raises(ValueError, match="beyond the model"):
        run_grid(cells, tmp_path)
    assert not (tmp_path / "cells").exists()


def test_models_without_a_mask_decoder_are_refused(tmp_path, monkeypatch):
    import harness.runner as r

    tiny = harness.load_model("random:tiny")
    tiny.sam = None
    monkeypatch.setattr(r.harness, "load_model", lambda *a, **k: tiny)
    with pytest.raises(ValueError, match="no mask decoder"):
        run_grid(expand_grid(["random:tiny"], ["none"], ["toy:val"], limit=1), tmp_path)


def test_sam_encoder_latency_is_measured_when_it_runs(tmp_path):
    rows = run_grid(expand_grid(["random:tiny"], ["none", "downsample"], ["toy:val"], limit=2), tmp_path)
    first = read_records(tmp_path / "cells" / f"{rows[0]['cell']}.jsonl")
    second = read_records(tmp_path / "cells" / f"{rows[1]['cell']}.jsonl")
    assert all(r["encoded"] and r["latency_s"]["sam_encoder"] > 1e-4 for r in first)  # each image's encoders ran
    assert not any(r["encoded"] for r in second)  # ... once: the second cell reused them, and its records carry
    assert [r["latency_s"]["sam_encoder"] for r in second] == [r["latency_s"]["sam_encoder"] for r in first]


def test_exponent_floats_round_trip_through_specs():
    from harness.method import create_method

    assert create_method("random:ratio=5e-05").ratio == 5e-05
    m = create_method("random", ratio=1e-7)
    assert create_method(m.spec()).ratio == 1e-7


def test_generate_cells_record_the_answer_and_the_table_says_so(tmp_path):
    template = expand_grid(["random:tiny"], ["fastv"], ["toy:val"], limit=2)[0]
    cells = expand_grid(["random:tiny"], ["fastv"], ["toy:val"], limit=2, decode="generate")
    assert cells[0].id != template.id
    row = run_grid(cells, tmp_path)[0]
    recs = read_records(tmp_path / "cells" / f"{row['cell']}.jsonl")
    assert all(isinstance(r["answer"], str) for r in recs)
    assert row["decode"] == "generate" and row["seg_rate"] == sum(r["has_seg"] for r in recs) / 2
    assert all(r["iou"] == 0.0 for r in recs if not r["has_seg"])  # no [SEG]: LISA returns no mask
    table = CliRunner().invoke(main, ["table", str(tmp_path)])
    assert table.exit_code == 0 and "[generate, [SEG] in" in table.output


def test_grid_with_an_unknown_decode_mode_is_one_line(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("methods: [none]\ndatasets: ['toy:val']\ndecode: beam\n")
    out = CliRunner().invoke(main, ["grid", str(cfg), "--out", str(tmp_path / "run")])
    assert out.exit_code == 2 and "unknown decode mode 'beam'" in out.output
    assert len(out.output.strip().splitlines()) == 1

"""Paper-style tables and trade-off plots of a run folder (harness.report)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.report import (
    compare_frame,
    method_label,
    paired_drop,
    paper_frame,
    pareto_front,
    plot_run,
    render_paper_table,
    series_styles,
)
from harness.runner import expand_grid, run_grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cells = expand_grid(["random:tiny"], ["none", "random@50%", "random@75%", "downsample", "fastv@75%"],
                        ["toy:val", "toy:test"], limit=3)
    run_grid(cells, out)
    return out


def test_frame_has_one_row_per_method_with_splits_and_the_paired_drop(run):
    frame, notes = paper_frame(run)
    assert frame["method"].iloc[0] == "none" and set(frame["method"]) == {"none", "downsample", "random@50%",
                                                                           "random@75%", "fastv@75%"}
    assert list(frame["group"]) == ["baseline", "controls", "controls", "controls", "in-LLM"]
    assert frame["N_avg"].iloc[1:4].is_monotonic_decreasing  # within a group: by cost
    assert {"toy:val gIoU", "toy:test cIoU", "mean gIoU", "N_avg", "TFLOPs", "LLM ms"} <= set(frame.columns)
    assert not notes
    base = frame.iloc[0]
    assert np.isnan(base["dgIoU"])
    for _, r in frame.iloc[1:].iterrows():
        assert r["dgIoU"] == pytest.approx(r["mean gIoU"] - base["mean gIoU"])  # same samples in every cell
        assert r["dgIoU lo"] <= r["dgIoU"] <= r["dgIoU hi"]


def test_compare_pairs_two_methods_on_their_shared_samples(run):
    frame, _ = paper_frame(run)
    by = frame.set_index("method")
    got = compare_frame(run, [("random@50%", "fastv@75%"), ("fastv@75%", "none")]).set_index("A")
    a, b = got.loc["random@50%"], got.loc["fastv@75%"]
    assert (a["B"], a["splits"], a["n"]) == ("fastv@75%", 2, 6)
    assert a["gIoU A"] == pytest.approx(by.loc["random@50%", "mean gIoU"])
    assert a["A - B"] == pytest.approx(by.loc["random@50%", "mean gIoU"] - by.loc["fastv@75%", "mean gIoU"])
    assert a["lo"] <= a["A - B"] <= a["hi"]
    # against the unpruned model it is the table's drop, interval included
    drop = tuple(by.loc["fastv@75%", ["dgIoU", "dgIoU lo", "dgIoU hi"]])
    assert (b["A - B"], b["lo"], b["hi"]) == pytest.approx(drop)
    with pytest.raises(ValueError, match="has no cell of pdrop"):
        compare_frame(run, [("pdrop@50%", "none")])
    r = CliRunner().invoke(main, ["compare", str(run), "random@50%", "fastv@75%", "none"])
    assert r.exit_code != 0 and "pairs of methods" in r.output
    r = CliRunner().invoke(main, ["compare", str(run), "random @ 0.5", "none"])
    assert r.exit_code == 0 and "| random@50% | none" in r.output.replace("  ", " ")


def test_paired_drop_interval():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.3, 0.9, 400)
    images = np.arange(400)
    point, lo, hi = paired_drop([(b - 0.1, b, images)])
    assert point == pytest.approx(-0.1) and lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)  # constant shift
    noisy = b - 0.05 + rng.normal(0, 0.1, 400)
    point, lo, hi = paired_drop([(noisy, b, images), (b, b, images)])  # an unchanged split halves the mean drop
    assert lo < point < hi < 0 and point == pytest.approx(np.mean(noisy - b) / 2)
    # five queries per image with the same outcome are one observation, not five: the interval does not narrow
    once = paired_drop([(noisy[:80], b[:80], images[:80])])
    five = paired_drop([(np.repeat(noisy[:80], 5), np.repeat(b[:80], 5), np.repeat(images[:80], 5))])
    assert five[0] == pytest.approx(once[0]) and five[2] - five[1] == pytest.approx(once[2] - once[1], rel=0.15)


def test_pareto_front():
    x = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    y = np.array([0.5, 0.4, 0.7, 0.6, 0.8])
    assert pareto_front(x, y).tolist() == [0, 2, 4]


def test_method_label_keeps_non_defaults_positions_and_budget():
    from harness.runner import canonical_spec

    assert method_label(canonical_spec("fastv:positions=reindex")) == "fastv:positions=reindex"
    assert method_label(canonical_spec("pdrop:positions=original@75%")) == "pdrop:positions=original@75%"


def test_method_label_keeps_non_defaults_and_budget():
    assert method_label("fastv:k=2,ratio=0.5,keep=null,score=last,seed=0") == "fastv"
    assert method_label("fastv:k=3,ratio=0.5,keep=null,score=seg,seed=0") == "fastv:k=3,score=seg"
    assert method_label("pdrop@75%") == "pdrop@75%"


def test_formats(run):
    frame, notes = paper_frame(run)
    md = render_paper_table(frame, notes, "markdown")
    header = md.split("\n")[0]
    assert "| baseline" in md and "**" in md and "| val gIoU" in header and "toy:val" not in header
    assert "ΔgIoU [95% CI]" in header and "TFLOPs (exact)" in header
    cells = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in md.splitlines()[2:7]}  # val gIoU
    a, b = (float(frame.loc[frame["method"] == m, "toy:val gIoU"].iloc[0]) for m in ("fastv@75%", "random@75%"))
    bold = {m: cells[m].startswith("**") for m in ("fastv@75%", "random@75%")}  # compared at the same budget
    assert bold == {"fastv@75%": round(100 * a, 1) >= round(100 * b, 1),
                    "random@75%": round(100 * b, 1) >= round(100 * a, 1)}
    assert not cells["random@50%"].startswith("**")  # the only row at its budget
    latex = render_paper_table(frame, notes, "latex")
    assert "\\toprule" in latex and "\\bottomrule" in latex and "\\bfseries" in latex
    assert latex.count("\\midrule") == 3  # after the header, and before the controls and the in-LLM group
    body = [line for line in latex.splitlines() if not line.startswith("%")]
    assert "random@75\\%" in latex and all("%" not in line.replace("\\%", "") for line in body)
    assert "N\\_avg" in latex
    csv = pd.read_csv(io.StringIO(render_paper_table(frame, notes, "csv")))
    assert len(csv) == 5 and "dgIoU hi" in csv.columns


def test_missing_and_partial_cells_are_marked(run, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    cfg = json.loads((partial / "config.json").read_text())
    cells = {c["id"]: c for c in cfg["cells"]}
    lost = next(cid for cid, c in cells.items() if c["method"].startswith("downsample") and c["split"] == "test")
    (partial / "cells" / f"{lost}.jsonl").unlink()
    cut = next(cid for cid, c in cells.items() if c["method"].startswith("random@75") and c["split"] == "val")
    lines = (partial / "cells" / f"{cut}.jsonl").read_text().splitlines()
    (partial / "cells" / f"{cut}.jsonl").write_text(lines[0] + "\n")
    frame, notes = paper_frame(partial)
    assert any("downsample on toy:test: missing" in n for n in notes)
    assert any("random@75% on toy:val: partial (1 samples)" in n for n in notes)
    text = render_paper_table(frame, notes, "text")
    rows = {line.split()[0 if line.startswith(" ") else 1]: line for line in text.splitlines()[2:7]}
    assert "(missing: toy:test)" in rows["downsample"] and "missing" in rows["downsample"].split(")", 1)[1]
    assert "(partial: toy:val)" in rows["random@75%"]
    assert frame.loc[frame["method"] == "downsample", "mean gIoU"].isna().all()  # not comparable to full rows


def test_a_run_with_no_cells_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"cells": []}))
    with pytest.raises(ValueError, match="has no cells"):
        paper_frame(tmp_path)


def test_series_styles_stay_distinct_beyond_the_palette():
    for n in (3, 10, 11, 20, 27, 45):
        styles = series_styles([f"m{i}" for i in range(n)])
        assert len(set(styles.values())) == n


def test_plot_writes_png_and_pdf(run, tmp_path):
    paths = plot_run(run, str(tmp_path / "fig"))
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["pdf", "png"]
    from PIL import Image

    with Image.open(next(p for p in paths if p.endswith(".png"))) as png:
        assert png.size[0] >= 1200  # 7 inches at 200 dpi: a full paper width


def test_cli_table_and_plot(run, tmp_path):
    r = CliRunner().invoke(main, ["table", str(run), "--format", "latex", "--out", str(tmp_path / "t.tex")])
    assert r.exit_code == 0 and (tmp_path / "t.tex").read_text().startswith("\\begin{tabular}")
    r = CliRunner().invoke(main, ["plot", str(run), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0 and (tmp_path / "p.png").is_file()
    r = CliRunner().invoke(main, ["table", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_analysis_is_stored_with_the_run(run):
    rows = json.loads((run / "analysis.json").read_text())
    by = {r["method"]: r for r in rows if r["split"] == "val"}
    assert "agreement" not in by["none"] and by["none"]["gt_recall"] == [1.0] * 8  # nothing dropped
    r = by["random@75%"]
    assert 0.0 <= r["agreement"] <= 1.0
    assert r["gt_recall"][0] == 1.0 and max(r["gt_recall"][2:]) < 1.0  # random drops 75% after layer 1
    by_layer = r["recall_vs_drop_by_layer"]
    assert len(by_layer) == 8 and by_layer[0] is None  # every sample keeps all its tokens in layer 0: no correlation
    assert any(c is not None for c in by_layer[2:]) and all(c is None or -1.0 <= c <= 1.0 for c in by_layer)
    assert (run / "analysis.csv").is_file()


def test_spearman():
    from harness.analysis import spearman

    x = np.array([0.1, 0.5, 0.2, 0.9])
    assert spearman(x, x ** 3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.array([1.0, 4.0, 2.0, 3.0])) == pytest.approx(0.8)  # ranks 1 3 2 4 vs 1 4 2 3: 1 - 6 * 2 / 60
    assert spearman(x, np.ones(4)) is None and spearman(x[:2], x[:2]) is None


def test_gt_recall_counts_the_targets_patches(tiny):
    from harness.runner import gt_token_recall

    gt = np.zeros((224, 224), np.uint8)
    gt[:28, :28] = 1  # patches 0, 1, 16, 17 of the 16 x 16 grid
    assert gt_token_recall(tiny, gt, [list(range(256)), [0, 1, 5], [99]]) == [1.0, 0.5, 0.0]
    # merged tokens carry each patch at its share w_p / sum(w): -2 = (0 + 1 + 16 + 99) / 4, -3 = 17 at 1/2 with 200
    members = {-2: [(0, 1.0), (1, 1.0), (16, 1.0), (99, 1.0)], -3: [(17, 2.0), (200, 2.0)]}
    assert gt_token_recall(tiny, gt, [[-2], [-2, -3], [-2, 0, 0], [-1, 99]], members) == [
        0.1875, 0.3125, pytest.approx((1 + 0.25 + 0.25) / 4), 0.0]  # a patch is capped at 1


def test_mask_agreement():
    from harness.analysis import mask_agreement
    from harness.runner import _rle

    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:, :5] = True
    assert mask_agreement(_rle(a), _rle(b)) == pytest.approx(25 / 75)
    assert mask_agreement(_rle(a & ~a), _rle(b & ~b)) == 1.0


def test_viz_draws_one_png_per_sample(run, tmp_path):
    from harness.viz import patch_boxes, visualize

    paths = visualize(run, methods=["random@75%"], limit=2, out=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".png"]
    boxes = patch_boxes(100, 200, (4, 4))  # a centred 100 x 100 square in 25-px patches
    assert boxes[0].tolist() == [50, 0, 75, 25] and boxes[-1].tolist() == [125, 75, 150, 100]
    with pytest.raises(ValueError, match="no finished cell of fastv"):
        visualize(run, methods=["fastv"], out=tmp_path)


def test_viz_adds_the_token_region_map_for_merged_tokens(run, tmp_path):
    from harness.viz import token_map, visualize

    paths = visualize(run, methods=["downsample"], limit=1, out=tmp_path)  # pooled 2x2 windows: merged tokens
    assert len(paths) == 1 and paths[0].stat().st_size > 0
    members = {-2: [(0, 1.0), (1, 1.0)], -3: [(1, 3.0), (2, 1.0)]}
    assert token_map([-2, -3, 3], members, 5).tolist() == [0, 1, 1, 2, -1]  # patch 1: the larger weight wins

"""The position-id policies: GAP's unpruned positions for pre-LLM methods, the `positions=` override, its record."""

from __future__ import annotations

import json

import pytest
import torch

from harness.engine import original_positions
from harness.method import create_method
from harness.runner import expand_grid, load_run, run_grid
from harness.state import Kind
from tests.conftest import QUERY
from tests.reference import Recorder


def test_unpruned_positions_of_patches_merged_tokens_and_cls():
    members = {-2: [(7, 1.0), (3, 0.25), (9, 0.25)],  # VisionZip's target first, weight 1
               -3: [(5, 0.5), (4, 0.5)],  # a tie: the first listed
               -4: [(2, 0.1), (8, 0.6)]}  # the largest weight wins wherever it is listed
    patch_index = torch.tensor([-1, 0, 6, -2, -3, -4])
    got = original_positions(patch_index, n_pre=3, n_full=16, n_post=2, members=members).tolist()
    assert got == [0, 1, 2, 3, 3, 9, 10, 8, 11, 19, 20]
    full = original_positions(torch.arange(16), n_pre=3, n_full=16, n_post=2, members={})
    assert full.tolist() == list(range(21))


def test_a_pre_llm_method_under_original_positions_sees_gap_ids(tiny, image):
    seen = []

    class Spy(Recorder):
        def before_layer(self, i, state, ctx):
            if i == 0:
                seen.append((state, ctx.positions(state).clone()))
            return super().before_layer(i, state, ctx)

    r = tiny.segment(image, QUERY, Spy(create_method("visionzip:dominant=20,contextual=5,positions=original")))
    state, pos = seen[0]
    img = state.kind == Kind.IMAGE
    s, n = int(img.nonzero()[0]), tiny.info.n_image_tokens
    assert int(img.sum()) == 25
    assert pos[:s].tolist() == list(range(s))
    after = (state.index > state.image_rows[-1]).nonzero()[:, 0]
    assert pos[after].tolist() == list(range(s + n, s + n + len(after)))
    for row in state.image_rows.tolist():
        code = int(state.patch[row])
        if code >= 0:
            assert pos[row] == s + code
        elif code == -1:  # CLS
            assert pos[row] == s
        else:  # contextual: its target, the only member of weight 1
            target = [p for p, w in r.trace.members[code] if w == 1.0]
            assert pos[row] == s + target[0]
    seen.clear()
    tiny.segment(image, QUERY, Spy(create_method("visionzip:dominant=20,contextual=5")))  # official: contiguous
    assert seen[0][1].tolist() == list(range(len(seen[0][0])))


def test_the_override_changes_the_result_and_is_refused_where_meaningless(tiny, image):
    a = tiny.segment(image, QUERY, "fastv:k=2,keep=20")
    b = tiny.segment(image, QUERY, "fastv:k=2,keep=20,positions=reindex")
    assert (a.seg_hidden - b.seg_hidden).abs().max() > 1e-4
    with pytest.raises(ValueError, match="positions must be one of original, reindex"):
        create_method("fastv:positions=gap")
    with pytest.raises(ValueError, match="keeps every token"):
        create_method("none:positions=reindex")
    m = create_method("visionzip:positions=original@75%", info=tiny.info)
    assert m.policy == "original" and m.spec().endswith(",positions=original")


def test_a_cell_records_its_policy(tmp_path):
    cells = expand_grid(["random:tiny"], ["pdrop@50%", "pdrop:positions=original@50%"], ["toy:val"], limit=2)
    assert cells[0].id != cells[1].id and cells[1].method == "pdrop:positions=original@50%"
    rows = run_grid(cells, tmp_path)
    assert [r["positions"] for r in rows] == ["reindex", "original"]
    metas = [json.loads((tmp_path / "cells" / f"{r['cell']}.json").read_text()) for r in rows]
    assert [m["positions"] for m in metas] == ["reindex", "original"]
    assert metas[1]["resolved_method"].endswith("positions=original")
    for meta, row in zip(metas, rows, strict=True):  # a cell written before the policy was recorded
        del meta["positions"]
        (tmp_path / "cells" / f"{row['cell']}.json").write_text(json.dumps(meta))
    assert [r["positions"] for r in load_run(tmp_path)] == ["reindex", "original"]

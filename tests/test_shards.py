"""Exact sharding: every item in one shard, an image's queries together, blocks independent of the shard count; a
sharded run merges to what one process computes; a crashed shard resumes alone; per-image encoder reuse changes no
result."""

from __future__ import annotations

import json

import pytest

import harness
from harness.runner import expand_grid, load_run, prepare_grid, read_cell, run_grid
from harness.shards import Shard, assign, data_key, plan, shard_blocks

METHODS = ["none", "downsample", "fastv@75%"]
DATA = ["shapes-ref:val", "shapes-ref:testA"]


def same_results(a: dict, b: dict) -> bool:
    """Records equal but for what a clock measures."""
    drop = ("latency_s", "peak_mem_bytes")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.fixture(scope="module")
def grid():
    cells = expand_grid(["random:tiny"], METHODS, DATA, limit=7)
    return prepare_grid(cells)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 40])
def test_every_item_in_exactly_one_shard_and_an_image_in_one_shard(grid, count):
    cells, _, datasets, _ = grid
    blocks = plan(cells, datasets, encoder_batch=2)
    expected = {(ci, si) for ci, c in enumerate(cells) for si in range(len(datasets[data_key(c)]))}
    seen, image_shard = [], {}
    for k in range(count):
        for b in shard_blocks(blocks, Shard(k, count)):
            seen += b.items
            for ci, si in b.items:
                key = (data_key(cells[ci]), datasets[b.data][si].image_id)
                assert image_shard.setdefault(key, k) == k  # all of an image's queries, in every cell, in one shard
    assert len(seen) == len(set(seen)) and set(seen) == expected  # no duplicates, no padding, nothing missing
    owners = assign(blocks, count)
    assert owners == sorted(owners)  # contiguous runs of blocks
    if count <= len(blocks):
        sizes = [sum(len(b.items) for b, o in zip(blocks, owners, strict=True) if o == k) for k in range(count)]
        assert max(sizes) - min(sizes) <= 2 * max(len(b.items) for b in blocks)  # balanced up to a block's size


def test_blocks_do_not_depend_on_the_shard_count(grid):
    cells, _, datasets, _ = grid
    blocks = plan(cells, datasets, encoder_batch=3)
    for count in (1, 2, 4):
        again = [b for k in range(count) for b in shard_blocks(blocks, Shard(k, count))]
        assert [[i for i, _ in b.images] for b in again] == [[i for i, _ in b.images] for b in blocks]
    queries = [datasets[b.data][si].image_id for b in blocks[:1] for _, si in b.items]
    assert len(blocks[0].images) == 3 and len(queries) == 3 * 2 * len(METHODS)  # 3 images, 2 queries each, 3 cells


def test_sharded_run_merges_to_the_single_process_records(tmp_path):
    cells = expand_grid(["random:tiny"], METHODS, DATA, limit=7)
    single = run_grid(cells, tmp_path / "single", encoder_batch=2)
    for k in (2, 0, 1):  # any order
        run_grid(cells, tmp_path / "sharded", shard=Shard(k, 3), encoder_batch=2)
    sharded = load_run(tmp_path / "sharded")
    assert [r["giou"] for r in sharded] == [r["giou"] for r in single] and all(r["complete"] for r in sharded)
    files = sorted(p.name for p in (tmp_path / "sharded" / "cells").glob("*.jsonl"))
    assert {f.split(".")[1] for f in files} == {"0-of-3", "1-of-3", "2-of-3"}  # each shard wrote only its own files
    for row in single:
        one = read_cell(tmp_path / "single" / "cells", row["cell"])
        merged = read_cell(tmp_path / "sharded" / "cells", row["cell"])
        assert [r["sample_id"] for r in merged] == [r["sample_id"] for r in one]  # dataset order, no duplicates
        assert all(same_results(a, b) for a, b in zip(one, merged, strict=True))
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert [r["giou"] for r in summary] == [r["giou"] for r in single]


def test_a_crashed_shard_resumes_alone(tmp_path, monkeypatch):
    cells = expand_grid(["random:tiny"], ["none", "downsample"], ["shapes-ref:val"], limit=8)  # 4 images, 2 queries
    run_grid(cells, tmp_path, shard=Shard(0, 2), encoder_batch=1)  # images 1 and 2
    before = {p.name: p.read_bytes() for p in (tmp_path / "cells").glob("*.0-of-2.jsonl")}
    real, calls = harness.SegModel.segment, {"n": 0, "kill": 3}

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["kill"]:
            raise KeyboardInterrupt  # as a kill would: what was written stays, nothing else is
        return real(self, *args, **kwargs)

    monkeypatch.setattr(harness.SegModel, "segment", counted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cells, tmp_path, shard=Shard(1, 2), encoder_batch=1)
    assert [r["n"] for r in load_run(tmp_path)] == [6, 4]  # image 3: both queries of `none`, then the kill
    calls.update(n=0, kill=-1)
    rows = run_grid(cells, tmp_path, shard=Shard(1, 2), encoder_batch=1)
    assert [r["n"] for r in rows] == [8, 8] and all(r["complete"] for r in rows)
    assert calls["n"] == 6  # only what shard 1 had left
    assert {p.name: p.read_bytes() for p in (tmp_path / "cells").glob("*.0-of-2.jsonl")} == before


def test_encoder_reuse_changes_no_result(tmp_path):
    """Each image's CLIP and SAM encoders once per run (batch of one image) equal computing them per query."""
    cells = expand_grid(["random:tiny"], METHODS, ["shapes-ref:val"], limit=4)
    run_grid(cells, tmp_path / "reuse", encoder_batch=1)
    run_grid(cells, tmp_path / "per-query", reuse=False)
    for c in load_run(tmp_path / "reuse"):
        a = read_cell(tmp_path / "reuse" / "cells", c["cell"])
        b = read_cell(tmp_path / "per-query" / "cells", c["cell"])
        a = [{k: v for k, v in r.items() if k != "encoded"} for r in a]  # where the encoders ran: below
        b = [{k: v for k, v in r.items() if k != "encoded"} for r in b]
        assert len(a) == 4 and all(same_results(x, y) for x, y in zip(a, b, strict=True))
    ran = [[r["encoded"] for r in read_cell(tmp_path / "reuse" / "cells", c["cell"])]
           for c in load_run(tmp_path / "reuse")]
    assert ran == [[True, False, True, False]] + [[False] * 4] * (len(METHODS) - 1)  # once per image, 2 images
    again = [[r["encoded"] for r in read_cell(tmp_path / "per-query" / "cells", c["cell"])]
             for c in load_run(tmp_path / "per-query")]
    assert all(all(x) for x in again)


def test_a_cell_being_written_by_another_shard_count_is_refused(tmp_path):
    """One process into a folder where shard 0 of 2 is writing a cell: refused before anything runs twice."""
    from harness.files import exclusive

    cells = prepare_grid(expand_grid(["random:tiny"], ["none"], ["shapes-ref:val"], limit=4))[0]  # 2 images
    (tmp_path / "cells").mkdir()
    with exclusive(tmp_path / "cells" / f"{cells[0].id}.0-of-2.lock", wait=False):
        with pytest.raises(ValueError, match="by another launch .*0-of-2.lock"):
            run_grid(cells, tmp_path)
    assert not read_cell(tmp_path / "cells", cells[0].id)
    with exclusive(tmp_path / "cells" / f"{cells[0].id}.0-of-2.lock", wait=False):  # shards of one launch: side
        run_grid(cells, tmp_path, shard=Shard(1, 2), encoder_batch=1)  # by side on the same cell
    assert len(read_cell(tmp_path / "cells", cells[0].id)) == 2  # shard 1's image, 2 queries
    assert run_grid(cells, tmp_path)[0]["n"] == 4  # released: one process does the rest


def test_a_bad_shard_is_one_line():
    with pytest.raises(ValueError, match="numbered 0..count-1"):
        Shard(3, 3)
    with pytest.raises(ValueError, match="encoder batch"):
        plan([], {}, encoder_batch=0)

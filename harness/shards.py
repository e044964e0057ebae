"""Exact sharding of a grid's work, image by image.

The work of a grid is its (cell, sample) items. They are grouped by image: for each model of the grid and each split
it runs on (in grid order), the split's images in order of first appearance, and for each image every cell of that
model and split with the image's samples in split order. The images of a split are cut into blocks of
`encoder_batch` (the images whose CLIP and SAM encoders run as one batch), and shard k of n takes a contiguous run
of blocks holding about 1/n of the items. So:

- every item is in exactly one shard: no duplicates and no padding (a sampler that pads repeats samples and skews
  the metric);
- an image's queries, in every cell, are in one shard, and its encoders run once there;
- the blocks, and so the batches the encoders see, do not depend on n: a sharded run computes what one process does.

A shard writes only its own files (`cells/<cell>.<k>-of-<n>.jsonl`; one process: `cells/<cell>.jsonl`), and
reading a run merges them (`harness.runner.read_cell`). Shards never talk to each other: no collectives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ENCODER_BATCH = 8  # images per CLIP / SAM encoder batch


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist: shards are numbered 0..count-1 "
                             f"and count is at least 1")

    @property
    def suffix(self) -> str:
        """What this shard's record files add to the cell id ("" for a single process)."""
        return "" if self.count == 1 else f".{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


SHARD_SUFFIX = re.compile(r"\.(\d+)-of-(\d+)$")


@dataclass
class Block:
    """Images whose encoders run as one batch, and the items on them, in run order."""

    model: tuple[str, str, str]  # (model, dtype, attn): the cells' model key
    data: tuple[Any, ...]  # (dataset, split, data_root, limit): the cells' data key
    images: list[tuple[str, Any]] = field(default_factory=list)  # (image id, image)
    items: list[tuple[int, int]] = field(default_factory=list)  # (cell index, sample index in the split)


def model_key(cell: Any) -> tuple[str, str, str]:
    return cell.model, cell.dtype, cell.attn


def data_key(cell: Any) -> tuple[Any, ...]:
    return cell.dataset, cell.split, cell.data_root, cell.limit


def plan(cells: Sequence[Any], datasets: dict[tuple[Any, ...], list[Any]], encoder_batch: int = ENCODER_BATCH,
         ) -> list[Block]:
    """Every item of the grid, in blocks (see the module docstring). `datasets` maps a cell's data key to its
    samples."""
    if encoder_batch < 1:
        raise ValueError(f"encoder batch must be at least 1 image, got {encoder_batch}")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault((model_key(cell), data_key(cell)), []).append(i)
    blocks = []
    for (mkey, dkey), members in groups.items():
        by_image: dict[str, list[int]] = {}
        first: dict[str, Any] = {}
        for si, s in enumerate(datasets[dkey]):
            by_image.setdefault(s.image_id, []).append(si)
            first.setdefault(s.image_id, s.image)
        ids = list(by_image)
        for start in range(0, len(ids), encoder_batch):
            chunk = ids[start:start + encoder_batch]
            blocks.append(Block(mkey, dkey, [(i, first[i]) for i in chunk],
                                [(c, si) for i in chunk for c in members for si in by_image[i]]))
    return blocks


def assign(blocks: Sequence[Block], count: int) -> list[int]:
    """The shard of each block: contiguous runs of blocks, each shard about 1/count of the items."""
    total = sum(len(b.items) for b in blocks)
    out, before = [], 0
    for b in blocks:
        out.append(min(count - 1, before * count // total) if total else 0)
        before += len(b.items)
    return out


def shard_blocks(blocks: Sequence[Block], shard: Shard) -> list[Block]:
    return [b for b, k in zip(blocks, assign(blocks, shard.count), strict=True) if k == shard.index]

"""`segprune viz`: per sample, the image with the ground truth, each method's mask, and the image tokens it kept at
each stage drawn on the patch grid (as LVLM_CSP's Figs. 3 and 5 do). One PNG per sample."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from harness.files import read_json
from harness.ledger import patch_shares


def patch_boxes(height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """(N, 4) box (x0, y0, x1, y1) of each patch in the original image's pixels: CLIP's processor resizes the
    shortest side and centre-crops a square, so the patches tile the centred min(H, W) square (row-major)."""
    side = min(height, width)
    top, left = (height - side) / 2, (width - side) / 2
    gh, gw = grid
    yy, xx = np.mgrid[:gh, :gw]
    boxes = np.stack([left + xx * side / gw, top + yy * side / gh, left + (xx + 1) * side / gw,
                      top + (yy + 1) * side / gh], -1)
    return boxes.reshape(-1, 4)


def token_map(codes: list[int], members: dict[int, list[tuple[int, float]]], n_patches: int) -> np.ndarray:
    """(N,) which token each patch belongs to most (its largest weight among the tokens' members; -1 for a patch no
    token carries): the superpixel map as the LLM sees it, for methods whose tokens stand for several patches."""
    owner, best = np.full(n_patches, -1), np.zeros(n_patches)
    for t, code in enumerate(codes):
        for p, w in (members[code] if code <= -2 else [(code, 1.0)] if code >= 0 else []):
            if w > best[p]:
                owner[p], best[p] = t, w
    return owner


def canonical_spec_or_none(spec: str) -> str | None:
    from harness.runner import canonical_spec

    try:
        return canonical_spec(spec)
    except ValueError:
        return None


def stages(segments: list[list[Any]], n_layers: int) -> list[tuple[int, int, list[int]]]:
    """(first layer, last layer, kept patches) of each stretch of layers with the same image tokens."""
    out = []
    for k, (first, patches) in enumerate(segments):
        last = segments[k + 1][0] - 1 if k + 1 < len(segments) else n_layers - 1
        out.append((first, last, patches))
    return out


def visualize(run_dir: str | Path, *, methods: list[str] | None = None, samples: list[str] | None = None,
              split: str | None = None, limit: int = 4, out: str | Path | None = None) -> list[Path]:
    """Write one PNG per sample: rows are methods (the unpruned model first), columns the ground truth, the
    predicted mask and each stage's kept tokens. Methods are matched by their table label or spec; samples by id
    (default: the first `limit` samples every chosen cell has); `split` ("dataset:split") picks the split (default:
    the run's first), and the first model and decode mode of the run are drawn."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    import harness
    from harness.analysis import decode_mask
    from harness.report import method_label
    from harness.runner import META_RECOVER, cell_records, load_run

    if limit < 1:
        raise ValueError(f"--limit must be at least 1 sample (got {limit})")
    run_dir = Path(run_dir)
    rows = [r for r in load_run(run_dir) if not r.get("missing")]
    if methods:
        wanted = set(methods) | {c for m in methods if (c := canonical_spec_or_none(m))}  # any parameter order
        rows = [r for r in rows if r["spec"] in wanted or method_label(r["spec"]) in wanted or r["spec"] == "none"]
        found = {method_label(r["spec"]) for r in rows} | {r["spec"] for r in rows}
        unknown = sorted(m for m in methods if m not in found and canonical_spec_or_none(m) not in found)
        if unknown:
            raise ValueError(f"no finished cell of {', '.join(unknown)} in {run_dir}; see `segprune table {run_dir}` "
                             f"for the methods it has")
    if not rows:
        raise ValueError(f"{run_dir} has no finished cell to draw")
    if split is not None:
        rows = [r for r in rows if f"{r['dataset']}:{r['split']}" == split]
        if not rows:
            raise ValueError(f"no finished cell on {split} in {run_dir}; give the split as dataset:split")
    first = rows[0]
    same = ("model", "fingerprint", "dtype", "attn", "decode", "dataset", "split")
    rows = [r for r in rows if all(r.get(k) == first.get(k) for k in same)]
    rows.sort(key=lambda r: r["spec"] != "none")
    recs = {r["cell"]: {x["sample_id"]: x for x in cell_records(run_dir, r["cell"], r.get("n"))} for r in rows}
    common = [sid for sid in recs[rows[0]["cell"]] if all(sid in recs[r["cell"]] for r in rows)]
    chosen = samples or common[:limit]
    missing = [s for s in chosen if s not in common]
    if missing:
        raise ValueError(f"sample(s) {', '.join(missing)} are not finished in every chosen cell; finished ones "
                         f"include {', '.join(common[:5])}")
    meta = read_json(run_dir / "cells" / f"{first['cell']}.json", META_RECOVER)
    data = {s.id: s for s in harness.load_dataset(first["dataset"], first["split"], root=meta.get("data_root"),
                                                  limit=meta.get("limit"))}
    out_dir = Path(out) if out else run_dir / "viz"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sid in chosen:
        sample = data[sid]
        image = np.asarray(harness.model.load_image(sample.image))
        gt = sample.gt_mask() == 1
        h, w = gt.shape
        n_layers = len(next(iter(recs[rows[0]["cell"]].values()))["image_tokens_per_layer"])
        per_row = [stages(recs[r["cell"]][sid]["kept_patches"], n_layers) for r in rows]
        merged = [any(c <= -2 for c in st[0][2]) for st in per_row]  # tokens standing for several patches
        n_cols = 2 + any(merged) + max(len(p) for p in per_row)
        fig = Figure(figsize=(1.6 * n_cols, 1.7 * len(rows) + 0.3))
        axes = fig.subplots(len(rows), n_cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, (r, row_stages) in enumerate(zip(rows, per_row, strict=True)):
            rec = recs[r["cell"]][sid]
            grid = tuple(read_json(run_dir / "cells" / f"{r['cell']}.json", META_RECOVER).get("grid") or
                         (math.isqrt(max(rec["image_tokens_per_layer"])),) * 2)
            boxes = patch_boxes(h, w, grid)
            members = {int(code): pairs for code, pairs in rec.get("merged_members", {}).items()}
            axes[i, 0].imshow(image)
            axes[i, 0].imshow(np.ma.masked_where(~gt, gt), cmap="summer", alpha=0.55, vmin=0, vmax=1)
            axes[i, 0].set_title("ground truth", fontsize=7)
            axes[i, 0].text(-0.08, 0.5, textwrap.fill(method_label(r["spec"]).replace(",", ", "), 24),
                            transform=axes[i, 0].transAxes, rotation=90, va="center", ha="right", fontsize=6)
            pred = decode_mask(rec["mask_rle"])
            axes[i, 1].imshow(image)
            axes[i, 1].imshow(np.ma.masked_where(~pred, pred), cmap="autumn", alpha=0.55, vmin=0, vmax=1)
            axes[i, 1].set_title(f"mask, IoU {rec['iou']:.2f}", fontsize=7)
            if merged[i]:  # the map of what each token stands for (superpixels, merged or pooled tokens)
                owner = token_map(row_stages[0][2], members, len(boxes)).reshape(grid).astype(float)
                side = min(h, w)
                top, left = (h - side) / 2, (w - side) / 2
                ax = axes[i, 2]
                ax.imshow(image)
                ax.imshow(np.ma.masked_less(owner, 0), cmap="tab20", alpha=0.6, interpolation="nearest",
                          extent=(left, left + side, top + side, top), vmin=0, vmax=max(owner.max(), 1))
                ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.6)
                ax.set_xlim(0, w)
                ax.set_ylim(h, 0)
                ax.set_title(f"{len(row_stages[0][2])} token regions", fontsize=7)
            for k, (a, b, patches) in enumerate(row_stages):
                ax = axes[i, 2 + any(merged) + k]
                ax.imshow(image)
                carried = np.zeros(len(boxes))  # how much of each patch the stage's tokens carry (merged: a share)
                for code in patches:
                    for p, share in patch_shares(code, members).items():
                        if p >= len(boxes):
                            raise ValueError(f"{r['cell']}: patch {p} is outside the {grid} grid of its cell")
                        carried[p] += share
                for (x0, y0, x1, y1), c in zip(boxes, np.minimum(carried, 1.0), strict=True):
                    if c < 1:  # dropped patches dark, patches only merged into other tokens in proportion
                        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color="black", alpha=0.65 * (1 - c), lw=0))
                ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.6)
                layers = f"layer {a}" if a == b else f"layers {a}-{b}"
                ax.set_title(f"{layers}: {len(patches)} tokens", fontsize=7)
        fig.suptitle(f"{sample.query}", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{sid}.png"
        fig.savefig(path, dpi=150)
        written.append(path)
    return written

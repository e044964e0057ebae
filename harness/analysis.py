"""Analyses stored with a run (`analysis.json`, `analysis.csv`): where the tokens went and what it cost.

For every cell with an unpruned counterpart (method `none`, same model, decode mode, dataset and split):
- `agreement`: mean IoU of the pruned mask with the unpruned mask, sample by sample (how much pruning changed the
  answer, independent of the ground truth);
- `gt_recall`: per LLM layer, the mean fraction of the ground-truth region's image tokens still present;
- `recall_vs_drop`: Spearman correlation, over samples (`recall_vs_drop_n` of them), of the mean recall across
  layers with the IoU drop (unpruned IoU - pruned IoU); negative when losing the target's tokens costs accuracy.
  A merged token counts only for the patch it is indexed by, so recall understates pre-LLM merging methods.
- `recall_vs_drop_by_layer`: the same correlation with each layer's recall (null where every sample kept the same
  fraction, e.g. the layers before an in-LLM method prunes): which layer's losses predict the damage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.files import write_atomic, write_json


def decode_mask(rle: dict) -> np.ndarray:
    """A mask stored in a record (pycocotools RLE with ASCII counts)."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def mask_agreement(a: dict, b: dict) -> float:
    """IoU of two stored masks (RLE); two empty masks agree fully."""
    ma, mb = decode_mask(a), decode_mask(b)
    union = int((ma | mb).sum())
    return 1.0 if union == 0 else int((ma & mb).sum()) / union


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks); None when either side is constant or n < 3."""
    import pandas as pd

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    ranks = pd.DataFrame({"x": x, "y": y}).rank()
    return float(ranks["x"].corr(ranks["y"]))


def analyze_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """Compute the analyses of a run folder and write `analysis.json` and `analysis.csv` into it."""
    import pandas as pd

    from harness.report import method_label
    from harness.runner import cell_records, load_run

    run_dir = Path(run_dir)
    rows = [r for r in load_run(run_dir) if not r.get("missing")]
    records = {r["cell"]: cell_records(run_dir, r["cell"], r.get("n")) for r in rows}
    def key(r: dict) -> tuple:  # the unpruned counterpart: same weights, dtype, attention, decode mode and split
        return r["model"], r.get("fingerprint"), r.get("dtype"), r.get("attn"), r["decode"], r["dataset"], r["split"]

    baseline = {key(r): r["cell"] for r in rows if r["spec"] == "none"}
    out = []
    for r in rows:
        base_id = baseline.get(key(r))
        mine = records[r["cell"]]
        entry: dict[str, Any] = {"cell": r["cell"], "model": r["model"], "decode": r["decode"],
                                 "method": method_label(r["spec"]), "dataset": r["dataset"], "split": r["split"],
                                 "n": len(mine)}
        recalls = [x["gt_recall"] for x in mine if x.get("gt_recall")]
        if recalls and len({len(x) for x in recalls}) == 1:
            entry["gt_recall"] = [round(float(v), 4) for v in np.mean(recalls, 0)]
        if base_id is not None and base_id != r["cell"]:
            base = {x["sample_id"]: x for x in records[base_id]}
            pairs = [(x, base[x["sample_id"]]) for x in mine if x["sample_id"] in base]
            if pairs:
                entry["agreement"] = float(np.mean([mask_agreement(x["mask_rle"], b["mask_rle"]) for x, b in pairs]))
                with_recall = [(x["gt_recall"], b["iou"] - x["iou"]) for x, b in pairs if x.get("gt_recall")]
                if len(with_recall) >= 3 and len({len(rec) for rec, _ in with_recall}) == 1:
                    per_layer = np.array([rec for rec, _ in with_recall], dtype=float)  # (samples, layers)
                    drop = np.array([d for _, d in with_recall], dtype=float)
                    overall = spearman(per_layer.mean(1), drop)
                    if overall is not None:
                        entry["recall_vs_drop"] = overall
                    entry["recall_vs_drop_by_layer"] = [spearman(col, drop) for col in per_layer.T]
                    entry["recall_vs_drop_n"] = len(with_recall)
        out.append(entry)
    write_json(run_dir / "analysis.json", out)
    flat = [{**{k: v for k, v in e.items() if k not in ("gt_recall", "recall_vs_drop_by_layer")},
             "gt_recall_mean": float(np.mean(e["gt_recall"])) if "gt_recall" in e else float("nan"),
             "gt_recall_last": e["gt_recall"][-1] if "gt_recall" in e else float("nan")} for e in out]
    write_atomic(run_dir / "analysis.csv", pd.DataFrame(flat).to_csv(index=False))
    return out

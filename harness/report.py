"""Plain-text and markdown tables of run summaries (pandas for the data, tabulate for text)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = [("method", "method"), ("data", "dataset:split"), ("n", "n"), ("giou", "gIoU"), ("ciou", "cIoU"),
           ("n_avg", "N_avg"), ("tflops", "TFLOPs (exact)"), ("llm_tflops", "LLM TFLOPs"),
           ("llm_total_ms", "LLM ms (+scoring)")]


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict[str, Any]], fmt: str = "text") -> str:
    """One line per cell; cells with no records say `missing`, unfinished ones `partial`."""
    out = []
    for r in rows:
        status = "missing" if r.get("missing") else ("" if r.get("complete", True) else "partial")
        method = r["spec"] if r["spec"] != r["method"] else r["method"]
        if r.get("decode") == "generate":  # and how often the answer held a [SEG] (no [SEG]: empty mask)
            seg = r.get("seg_rate")
            method += " [generate" + (f", [SEG] in {seg:.0%}]" if seg is not None else "]")
        out.append([method + (f" ({status})" if status else ""), f"{r['dataset']}:{r['split']}", r.get("n", 0),
                    _fmt(r.get("giou"), 4), _fmt(r.get("ciou"), 4), _fmt(r.get("n_avg"), 1),
                    _fmt(r.get("tflops"), 5), _fmt(r.get("llm_tflops"), 5), _fmt(r.get("llm_total_ms"), 1)])
    return tabulate(out, headers=[h for _, h in COLUMNS], tablefmt="github" if fmt == "markdown" else "simple",
                    disable_numparse=True)


# -- paper-style tables ----------------------------------------------------------------------------------------
GROUPS = ("baseline", "controls", "pre-LLM", "in-LLM", "multi-stage")
_GROUP_OF_STAGE = {"control": "controls", "pre-llm": "pre-LLM", "in-llm": "in-LLM", "multi-stage": "multi-stage"}
SPLIT_ORDER = ("val", "test", "testA", "testB", "reason")
BOOTSTRAP = 1000  # paired bootstrap resamples for the drop's 95% interval


def method_label(spec: str) -> str:
    """Short row label: the method name with the parameters that differ from its defaults, and the budget
    ("fastv@75%", "csp:cluster=cls@70%", "pdrop:ratio=0.3")."""
    from harness.method import METHODS, describe_params, parse_spec, resolve_params, split_budget

    head, budget = split_budget(spec)
    name, given = parse_spec(head)
    try:
        cls = METHODS.get(name)
        given = resolve_params(cls, given)
        defaults = {p.name: p.default for p in describe_params(cls)}
        name = cls.name
    except ValueError:  # a method this installation does not know (a run made elsewhere): show it as stored
        defaults = {}
    diff = {k: v for k, v in given.items() if defaults.get(k, object()) != v}
    text = name + (":" + ",".join(f"{k}={v}" for k, v in diff.items()) if diff else "")
    return text + (f"@{budget}" if budget is not None else "")


def method_group(spec: str) -> str:
    """The table group of a method spec: baseline, controls, pre-LLM, in-LLM or multi-stage (by its stage)."""
    from harness.method import METHODS, parse_spec, split_budget

    name = parse_spec(split_budget(spec)[0])[0]

    if name == "none":
        return "baseline"
    try:
        return _GROUP_OF_STAGE.get(METHODS.get(name).stage, "in-LLM")
    except ValueError:
        return "in-LLM"


def paired_drop(pairs: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> tuple[float, float, float]:
    """Mean over splits of gIoU(method) - gIoU(baseline), with a paired bootstrap 95% interval: each replicate
    resamples every split's samples (the same ones for both) and averages the splits' differences."""
    rng = np.random.default_rng(seed)
    diffs = [m - b for m, b in pairs]
    point = float(np.mean([d.mean() for d in diffs]))
    reps = np.zeros(BOOTSTRAP)
    for d in diffs:
        reps += d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(1)
    reps /= len(diffs)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return point, float(lo), float(hi)


def paper_frame(run_dir) -> tuple[pd.DataFrame, list[str]]:
    """One row per (model, decode, method spec) of a run: gIoU and cIoU per split, the mean over splits, N_avg,
    TFLOPs (exact and csp), LLM latency, and the gIoU drop against the unpruned baseline of the same model with its
    paired bootstrap 95% interval. Returns the frame and notes (missing and partial cells)."""
    import pandas as pd

    from harness.runner import cell_records, load_run

    rows = load_run(run_dir)
    notes = []
    by_key: dict[tuple, dict] = {}
    splits: list[str] = []
    ious: dict[tuple, dict[str, float]] = {}
    for r in rows:
        split = f"{r['dataset']}:{r['split']}"
        if split not in splits:
            splits.append(split)
        key = (r["model"], r["decode"], r["spec"])
        row = by_key.setdefault(key, {"model": r["model"], "decode": r["decode"], "spec": r["spec"],
                                      "method": method_label(r["spec"]), "group": method_group(r["spec"]),
                                      "_cells": []})
        if r.get("missing"):
            notes.append(f"{row['method']} on {split}: missing (no finished sample)")
            row[f"{split} gIoU"] = row[f"{split} cIoU"] = "missing"
            continue
        if not r.get("complete", True):
            notes.append(f"{row['method']} on {split}: partial ({r['n']} samples)")
            row["status"] = "partial"
        row[f"{split} gIoU"], row[f"{split} cIoU"] = r["giou"], r["ciou"]
        row["_cells"].append(r)
        ious[(*key, split)] = {x["sample_id"]: x["iou"] for x in cell_records(run_dir, r["cell"], r.get("n"))}
    splits.sort(key=lambda s: (s.split(":")[0], SPLIT_ORDER.index(s.split(":")[1])
                               if s.split(":")[1] in SPLIT_ORDER else len(SPLIT_ORDER)))
    out = []
    for key, row in by_key.items():
        cells = row.pop("_cells")
        if cells and row["decode"] == "generate":  # how often the answer held a [SEG] (no [SEG]: empty mask)
            row["seg_rate"] = float(np.mean([c.get("seg_rate", 1.0) for c in cells]))
        if cells:
            row["mean gIoU"] = float(np.mean([c["giou"] for c in cells]))
            row["N_avg"] = float(np.mean([c["n_avg"] for c in cells]))
            row["TFLOPs"] = float(np.mean([c["tflops"] for c in cells]))
            row["LLM TFLOPs (csp)"] = float(np.mean([c["llm_tflops_csp"] for c in cells]))
            row["LLM ms"] = float(np.mean([c["llm_total_ms"] for c in cells]))
        base_key = (row["model"], row["decode"], "none")
        pairs = []
        for split in splits:
            mine, base = ious.get((*key, split)), ious.get((*base_key, split))
            if mine and base and key != base_key:
                common = sorted(set(mine) & set(base))
                if common:
                    pairs.append((np.array([mine[s] for s in common]), np.array([base[s] for s in common])))
        if pairs:
            row["dgIoU"], row["dgIoU lo"], row["dgIoU hi"] = paired_drop(pairs)
        out.append(row)
    frame = pd.DataFrame(out)
    frame["group"] = pd.Categorical(frame["group"], GROUPS, ordered=True)
    frame = frame.sort_values(["model", "decode", "group", "N_avg"], ascending=[True, True, True, False],
                              kind="stable").reset_index(drop=True)
    return frame, notes


def _accuracy_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.endswith(("gIoU", "cIoU")) or c == "dgIoU"]


def _best(frame: pd.DataFrame) -> dict[str, set[int]]:
    """Row positions holding the best pruned value of each accuracy column, per (model, decode) block."""
    import pandas as pd

    best: dict[str, set[int]] = {}
    pruned = frame[frame["group"] != "baseline"]
    for col in _accuracy_columns(frame):
        for _, block in pruned.groupby(["model", "decode"], observed=True):
            values = pd.to_numeric(block[col], errors="coerce").dropna()  # "missing" cells are text
            if len(values):
                best.setdefault(col, set()).update(values.index[np.isclose(values, values.max())].tolist())
    return best


def render_paper_table(frame: pd.DataFrame, notes: list[str], fmt: str = "markdown") -> str:
    """The paper-style table as markdown, text, LaTeX (booktabs) or CSV (plain numbers, interval bounds as columns).
    Best pruned value per accuracy column in bold (markdown, LaTeX)."""
    import pandas as pd

    if fmt == "csv":
        return frame.to_csv(index=False)
    split_cols = [c for c in frame.columns if c.endswith((" gIoU", " cIoU")) and c != "mean gIoU"]
    datasets = {c.split(":")[0] for c in split_cols}
    rename = {c: c.split(":", 1)[1] for c in split_cols} if len(datasets) == 1 else {}
    lead = ["group", "method"] + [c for c in ("model", "decode") if frame[c].nunique() > 1]
    cols = lead + split_cols + ["mean gIoU", "dgIoU", "N_avg", "TFLOPs", "LLM ms"]
    best = _best(frame)
    digits = {"N_avg": 1, "TFLOPs": 5, "LLM ms": 1}

    def cell(i: int, col: str, bold: tuple[str, str]) -> str:
        v = frame.at[i, col] if col in frame.columns else None
        if col == "method":
            seg = frame.at[i, "seg_rate"] if "seg_rate" in frame.columns else float("nan")
            status = frame.at[i, "status"] if "status" in frame.columns else None
            return str(v) + (f" [generate, [SEG] in {seg:.0%}]" if not math.isnan(seg) else "") \
                + (" (partial)" if isinstance(status, str) else "")
        if col in lead:
            return str(v) if col != "group" or i == 0 or frame.at[i - 1, "group"] != v else ""
        if isinstance(v, str):  # "missing"
            return v
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-" if col != "dgIoU" or frame.at[i, "group"] != "baseline" else "0 (ref.)"
        text = f"{100 * v:.1f}" if col in best or col in split_cols or col == "mean gIoU" else \
            _fmt(float(v), digits.get(col, 2))
        if col == "dgIoU":
            text = f"{100 * v:+.1f} [{100 * frame.at[i, 'dgIoU lo']:+.1f}, {100 * frame.at[i, 'dgIoU hi']:+.1f}]"
        return f"{bold[0]}{text}{bold[1]}" if i in best.get(col, ()) else text

    heads = [rename.get(c, c) for c in cols]
    heads = [h.replace("dgIoU", "ΔgIoU [95% CI]") if fmt != "latex" else h.replace("dgIoU", r"$\Delta$gIoU [95\% CI]")
             for h in heads]
    if fmt == "latex":
        body = [[cell(i, c, (r"\textbf{", "}")) for c in cols] for i in range(len(frame))]
        table = pd.DataFrame(body, columns=heads)
        latex = table.style.hide(axis="index").to_latex(hrules=True, column_format="ll" + "r" * (len(cols) - 2))
        rows = latex.splitlines()
        first = rows.index("\\midrule") + 1  # the body follows the header's rule, one line per frame row
        out = rows[:first]
        for i, line in enumerate(rows[first:first + len(frame)]):
            if i > 0 and body[i][0]:  # a new group starts: a rule before it
                out.append("\\midrule")
            out.append(line)
        out += rows[first + len(frame):]
        text = "\n".join(out)
    else:
        body = [[cell(i, c, ("**", "**") if fmt == "markdown" else ("", "")) for c in cols] for i in range(len(frame))]
        text = tabulate(body, headers=heads, tablefmt="github" if fmt == "markdown" else "simple",
                        disable_numparse=True)
    foot = ["gIoU / cIoU in %, best pruned value in bold; ΔgIoU: mean over splits of the paired difference to the "
            f"unpruned model, 95% interval from {BOOTSTRAP} paired bootstrap resamples; N_avg: image tokens per LLM "
            "layer (LVLM_CSP eq. 9); TFLOPs: exact, whole pipeline; LLM ms: median LLM stage incl. method scoring."]
    foot += notes
    sep = "\n% " if fmt == "latex" else "\n"
    return text + "\n" + sep.lstrip("\n") + sep.join(foot) + "\n"


# -- trade-off plots --------------------------------------------------------------------------------------------
PLOT_AXES = (("TFLOPs", "TFLOPs (exact, whole model)"), ("LLM ms", "LLM latency (ms)"),
             ("N_avg", "N_avg (image tokens / layer)"))


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (lower or equal x and higher or equal y, one strictly), by x."""
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def plot_run(run_dir, out: str | None = None, metric: str = "mean gIoU") -> list[str]:
    """Accuracy vs TFLOPs, vs LLM latency and vs N_avg, one line per method across its budgets, the unpruned
    baseline marked, the Pareto front of the pruned points highlighted; PNG and PDF per (model, decode).
    Returns the written paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame, _ = paper_frame(run_dir)
    if metric not in frame.columns:
        raise ValueError(f"no column {metric!r} in this run; choose one of "
                         f"{', '.join(c for c in frame.columns if c.endswith('gIoU') or c.endswith('cIoU'))}")
    base = Path(out) if out else Path(run_dir) / "plots" / "tradeoff"
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    blocks = list(frame.groupby(["model", "decode"], observed=True))
    for (model, decode), block in blocks:
        block = block.dropna(subset=[metric, "TFLOPs"])
        family = block["method"].str.split("@").str[0]
        plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7})
        fig, axes = plt.subplots(1, 3, figsize=(7.0, 2.5), constrained_layout=True)
        colours = dict(zip(sorted(set(family[block["group"] != "baseline"])), plt.cm.tab10.colors * 3, strict=False))
        for ax, (col, label) in zip(axes, PLOT_AXES, strict=True):
            pruned = block[block["group"] != "baseline"].dropna(subset=[col])
            if len(pruned):
                front = pruned.iloc[pareto_front(pruned[col].to_numpy(float), pruned[metric].to_numpy(float))]
                ax.step(front[col], 100 * front[metric], where="post", color="0.8", lw=4, zorder=1,
                        label="Pareto front")
            for name, rows in pruned.groupby(family[pruned.index]):
                rows = rows.sort_values(col)
                ax.plot(rows[col], 100 * rows[metric], "o-", ms=3.5, lw=1.2, color=colours[name], label=name, zorder=3)
            for _, r in block[block["group"] == "baseline"].iterrows():
                ax.axhline(100 * r[metric], color="k", ls="--", lw=0.8, zorder=2)
                ax.plot([r[col]], [100 * r[metric]], "k*", ms=8, zorder=4, label="unpruned")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"{metric} (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        fig.suptitle(f"{model} ({decode})" if len(blocks) > 1 else str(model))
        stem = base if len(blocks) == 1 else base.with_name(f"{base.name}-{len(written) // 2}")
        for ext in ("png", "pdf"):
            path = stem.with_suffix(f".{ext}")
            fig.savefig(path, dpi=200)
            written.append(str(path))
        plt.close(fig)
    return written

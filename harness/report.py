"""Plain-text and markdown tables of run summaries (pandas for the data, tabulate for text)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

if TYPE_CHECKING:
    from pathlib import Path

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
        method = method_label(r["spec"])  # as the user wrote it; the resolved spec is in the run folder
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
BOOTSTRAP = 4000  # paired bootstrap resamples for the drop's 95% interval


def method_label(spec: str) -> str:
    """Short row label: the method name with the parameters that differ from its defaults, and the budget
    ("fastv@75%", "csp:cluster=cls@70%", "pdrop:ratio=0.3")."""
    from harness.method import METHODS, describe_params, parse_spec, pop_positions, resolve_params, split_budget

    head, budget = split_budget(spec)
    name, given = parse_spec(head)
    try:
        cls = METHODS.get(name)
        positions = pop_positions(cls, given)
        given = {**resolve_params(cls, given), **({"positions": positions} if positions else {})}
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


def paired_drop(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seed: int = 0) -> tuple[float, float, float]:
    """Mean over splits of gIoU(method) - gIoU(baseline), with a paired cluster-bootstrap 95% interval: each
    replicate resamples every split's images (all queries of an image together: RefCOCO-style splits ask several
    questions per image) and averages the splits' differences. `pairs`: (method IoU, baseline IoU, image ids) per
    split, aligned by sample."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([(m - b).mean() for m, b, _ in pairs]))
    reps = np.zeros(BOOTSTRAP)
    for m, b, images in pairs:
        _, group = np.unique(images, return_inverse=True)
        n_groups = group.max() + 1
        sums, counts = np.bincount(group, m - b, n_groups), np.bincount(group, minlength=n_groups)
        draw = rng.integers(0, n_groups, (BOOTSTRAP, n_groups))
        reps += sums[draw].sum(1) / counts[draw].sum(1)
    reps /= len(pairs)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return point, float(lo), float(hi)


def cell_block(row: dict[str, Any]) -> tuple:
    """What two cells must share to be paired: model, its weights, dtype, attention and decode mode."""
    return row["model"], row.get("fingerprint", ""), row.get("dtype"), row.get("attn"), row["decode"]


def sample_ious(run_dir: str | Path, rows: list[dict[str, Any]]) -> dict[tuple, dict[str, tuple[float, str]]]:
    """Per (block, spec, split) of a run's summary rows with samples: sample id -> (IoU, image id)."""
    from harness.runner import cell_records

    return {(*cell_block(r), r["spec"], f"{r['dataset']}:{r['split']}"):
            {x["sample_id"]: (x["iou"], x.get("image_id", x["sample_id"]))
             for x in cell_records(run_dir, r["cell"], r.get("n"))}
            for r in rows if not r.get("missing")}


def paired_pairs(samples: dict[tuple, dict[str, tuple[float, str]]], block: tuple, a: str, b: str,
                 splits: list[str]) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], list[str]]:
    """(IoU of a, IoU of b, image ids) on the samples both have, for each split where both ran; and those splits."""
    pairs, used = [], []
    for split in splits:
        mine, other = samples.get((*block, a, split)), samples.get((*block, b, split))
        common = sorted(set(mine) & set(other)) if mine and other else []
        if common:
            pairs.append((np.array([mine[k][0] for k in common]), np.array([other[k][0] for k in common]),
                          np.array([other[k][1] for k in common])))
            used.append(split)
    return pairs, used


def compare_frame(run_dir: str | Path, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Paired comparisons of a run's methods: for every (A, B) and every model block where both ran, the mean over
    the splits they share of gIoU(A), gIoU(B) and A - B, with the paired cluster-bootstrap 95% interval of
    `paired_drop` (the same images resampled for both)."""
    import pandas as pd

    from harness.runner import canonical_spec, load_run

    rows = load_run(run_dir)
    samples = sample_ious(run_dir, rows)
    splits = list(dict.fromkeys(f"{r['dataset']}:{r['split']}" for r in rows))
    known = {r["spec"] for r in rows}
    out = []
    for a, b in pairs:
        a, b = canonical_spec(a), canonical_spec(b)
        before = len(out)
        for spec in (a, b):
            if spec not in known:
                raise ValueError(f"{run_dir} has no cell of {spec}; its methods: {', '.join(sorted(known))}")
        for block in dict.fromkeys(cell_block(r) for r in rows):
            matched, used = paired_pairs(samples, block, a, b, splits)
            if not matched:
                continue
            d, lo, hi = paired_drop(matched)
            out.append({"model": block[0], "decode": block[4], "A": method_label(a), "B": method_label(b),
                        "splits": len(used), "n": sum(len(m) for m, _, _ in matched),
                        "gIoU A": float(np.mean([m.mean() for m, _, _ in matched])),
                        "gIoU B": float(np.mean([o.mean() for _, o, _ in matched])), "A - B": d, "lo": lo, "hi": hi})
        if len(out) == before:
            raise ValueError(f"{method_label(a)} and {method_label(b)} share no samples in {run_dir} (different "
                             f"models, splits or decode modes)")
    return pd.DataFrame(out)


def paper_frame(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per (model, its weights, dtype, attention, decode mode, method spec) of a run: gIoU and cIoU per split
    (NaN where missing, listed in `missing`), their mean (only when every split is there), N_avg, TFLOPs, LLM
    latency, and the gIoU drop against the unpruned model of the same row key, with its paired bootstrap 95%
    interval. Returns the frame and notes (missing, partial and unpaired cells)."""
    import pandas as pd

    from harness.runner import load_run

    rows = load_run(run_dir)
    notes: list[str] = []
    splits: list[str] = []
    for r in rows:
        if f"{r['dataset']}:{r['split']}" not in splits:
            splits.append(f"{r['dataset']}:{r['split']}")
    splits.sort(key=lambda s: (s.split(":")[0], SPLIT_ORDER.index(s.split(":")[1])
                               if s.split(":")[1] in SPLIT_ORDER else len(SPLIT_ORDER)))
    weights = {}  # model name -> the distinct (weights, dtype, attention) it was run with
    for r in rows:
        weights.setdefault(r["model"], set()).add((r.get("fingerprint", ""), r.get("dtype"), r.get("attn")))
    by_key: dict[tuple, dict] = {}
    for r in rows:
        split = f"{r['dataset']}:{r['split']}"
        block = cell_block(r)
        model = r["model"] if len(weights[r["model"]]) == 1 else \
            f"{r['model']} [{r.get('fingerprint', '')[:8]}, {r.get('dtype')}, {r.get('attn')}]"
        row = by_key.setdefault((*block, r["spec"]), {
            "model": model, "decode": r["decode"], "spec": r["spec"], "method": method_label(r["spec"]),
            "group": method_group(r["spec"]), "_block": block, "_cells": [], "missing": [], "partial": []})
        if f"{split} gIoU" in row:
            raise ValueError(f"{run_dir}: two cells of {row['method']} on {split} with the same model weights; the "
                             f"run folder's config.json lists a cell twice")
        if r.get("missing"):
            row["missing"].append(split)
            row[f"{split} gIoU"] = row[f"{split} cIoU"] = float("nan")
            notes.append(f"{row['method']} on {split}: missing (no finished sample)")
            continue
        if not r.get("complete", True):
            row["partial"].append(split)
            notes.append(f"{row['method']} on {split}: partial ({r['n']} samples)")
        row[f"{split} gIoU"], row[f"{split} cIoU"] = r["giou"], r["ciou"]
        row["_cells"].append(r)
    samples = sample_ious(run_dir, rows)
    out = []
    for row in by_key.values():
        cells, block = row.pop("_cells"), row.pop("_block")
        if cells and row["decode"] == "generate":  # how often the answer held a [SEG] (no [SEG]: empty mask)
            row["seg_rate"] = float(np.mean([c.get("seg_rate", 1.0) for c in cells]))
        if cells:
            row["mean gIoU"] = float(np.mean([c["giou"] for c in cells])) if not row["missing"] else float("nan")
            for col, key in (("N_avg", "n_avg"), ("TFLOPs", "tflops"), ("LLM TFLOPs (csp)", "llm_tflops_csp"),
                             ("LLM ms", "llm_total_ms")):
                row[col] = float(np.mean([c[key] for c in cells]))
        if row["spec"] != "none":
            pairs, used = paired_pairs(samples, block, row["spec"], "none", splits)
            for split in splits:
                if split not in used and samples.get((*block, row["spec"], split)):
                    notes.append(f"{row['method']} on {split}: no unpruned (`none`) cell to pair with; no drop")
            if pairs and len(pairs) == len([s for s in splits if samples.get((*block, row["spec"], s))]):
                row["dgIoU"], row["dgIoU lo"], row["dgIoU hi"] = paired_drop(pairs)
        row["missing"], row["partial"] = ",".join(row["missing"]), ",".join(row["partial"])
        out.append(row)
    frame = pd.DataFrame(out)
    for col in ("N_avg", "mean gIoU", "dgIoU", "dgIoU lo", "dgIoU hi", "TFLOPs", "LLM TFLOPs (csp)", "LLM ms"):
        if col not in frame.columns:
            frame[col] = float("nan")
    if frame.empty:
        raise ValueError(f"{run_dir} has no cells; run `segprune run --out {run_dir}` to make some")
    frame["group"] = pd.Categorical(frame["group"], GROUPS, ordered=True)
    frame = frame.sort_values(["model", "decode", "group", "N_avg"], ascending=[True, True, True, False],
                              kind="stable", na_position="last").reset_index(drop=True)
    if frame["spec"].astype(str).str.startswith("routing").any():
        notes.append("routing keeps every image token in every layer, so its N_avg is N: it saves FFN and answer-token "
                     "work instead; compare it with the pruning methods on the FLOPs and latency columns")
    return frame, notes


def _budget(spec: str) -> str:
    from harness.method import split_budget

    budget = split_budget(spec)[1]
    return str(budget) if budget is not None else ""


def _best(frame: pd.DataFrame, cols: list[str], shown: dict[tuple[int, str], str]) -> set[tuple[int, str]]:
    """Cells holding the best pruned value of each accuracy column, compared as shown (rounded), among the rows of
    one model block and one budget (rows without a budget form their own set)."""
    best: set[tuple[int, str]] = set()
    pruned = frame[frame["group"] != "baseline"]
    for _, rows in pruned.groupby([pruned["model"], pruned["decode"], pruned["spec"].map(_budget)], observed=True):
        for col in cols:
            values = {i: float(shown[i, col].split(" ")[0]) for i in rows.index
                      if shown.get((i, col), "-") not in ("-", "missing", "0 (ref.)")}
            if len(values) > 1:
                top = max(values.values())
                best.update((i, col) for i, v in values.items() if v == top)
    return best


def render_paper_table(frame: pd.DataFrame, notes: list[str], fmt: str = "markdown") -> str:
    """The paper-style table as markdown, text, LaTeX (booktabs) or CSV (plain numbers, interval bounds as columns).
    In markdown and LaTeX the best pruned value of each accuracy column is bold, among rows of the same budget."""
    import pandas as pd

    if fmt == "csv":
        return frame.to_csv(index=False)
    split_cols = [c for c in frame.columns if c.endswith((" gIoU", " cIoU")) and c != "mean gIoU"]
    datasets = {c.split(":")[0] for c in split_cols}
    rename = {c: c.split(":", 1)[1] for c in split_cols} if len(datasets) == 1 else {}
    lead = ["group", "method"] + [c for c in ("model", "decode") if frame[c].nunique() > 1]
    cols = lead + split_cols + ["mean gIoU", "dgIoU", "N_avg", "TFLOPs", "LLM TFLOPs (csp)", "LLM ms"]
    digits = {"N_avg": 1, "TFLOPs": 4, "LLM TFLOPs (csp)": 4, "LLM ms": 1}

    def shown(i: int, col: str) -> str:
        v = frame.at[i, col]
        if col == "method":
            seg = frame.at[i, "seg_rate"] if "seg_rate" in frame.columns else float("nan")
            marks = [f"partial: {frame.at[i, 'partial']}"] if frame.at[i, "partial"] else []
            marks += [f"missing: {frame.at[i, 'missing']}"] if frame.at[i, "missing"] else []
            return str(v) + (f" [generate, [SEG] in {seg:.0%}]" if not math.isnan(seg) else "") \
                + (f" ({'; '.join(marks)})" if marks else "")
        if col in lead:
            return str(v) if col != "group" or i == 0 or frame.at[i - 1, "group"] != v or \
                frame.at[i - 1, "model"] != frame.at[i, "model"] else ""
        if col in split_cols and col.rsplit(" ", 1)[0] in frame.at[i, "missing"].split(","):
            return "missing"
        if isinstance(v, float) and math.isnan(v):
            return "0 (ref.)" if col == "dgIoU" and frame.at[i, "spec"] == "none" else "-"
        if col == "dgIoU":
            return f"{100 * v:+.1f} [{100 * frame.at[i, 'dgIoU lo']:+.1f}, {100 * frame.at[i, 'dgIoU hi']:+.1f}]"
        return f"{100 * v:.1f}" if col in split_cols or col == "mean gIoU" else _fmt(float(v), digits[col])

    text = {(i, c): shown(i, c) for i in range(len(frame)) for c in cols}
    best = _best(frame, split_cols + ["mean gIoU", "dgIoU"], text) if fmt != "text" else set()
    names = {"dgIoU": "ΔgIoU [95% CI]", "TFLOPs": "TFLOPs (exact)"}
    heads = [names.get(c, rename.get(c, c)) for c in cols]
    if fmt == "latex":
        body = pd.DataFrame([[text[i, c] for c in cols] for i in range(len(frame))],
                            columns=heads)
        bold = pd.DataFrame([["font-weight: bold;" if (i, c) in best else "" for c in cols]
                             for i in range(len(frame))], columns=body.columns)
        latex = body.style.format(escape="latex").format_index(escape="latex", axis=1) \
            .apply(lambda _: bold, axis=None).hide(axis="index") \
            .to_latex(hrules=True, convert_css=True, column_format="ll" + "r" * (len(cols) - 2))
        lines = latex.replace("Δ", "$\\Delta$").splitlines()  # after escaping, which would print $ and \\ as text
        start = lines.index("\\midrule") + 1  # the body follows the header's rule, one line per frame row
        out = lines[:start]
        for i, line in enumerate(lines[start:start + len(frame)]):
            if i > 0 and text[i, "group"]:  # a new group: a rule before it
                out.append("\\midrule")
            out.append(line)
        table = "\n".join(out + lines[start + len(frame):])
    else:
        mark = ("**", "**") if fmt == "markdown" else ("", "")
        body = [[f"{mark[0]}{text[i, c]}{mark[1]}" if (i, c) in best else text[i, c] for c in cols]
                for i in range(len(frame))]
        table = tabulate(body, headers=heads, tablefmt="github" if fmt == "markdown" else "simple",
                         disable_numparse=True)
    foot = [("gIoU / cIoU in %" + (", best pruned value per budget in bold" if fmt != "text" else "") + "; ΔgIoU: "
             "mean over splits of the paired difference to the unpruned model, 95% interval from "
             f"{BOOTSTRAP} bootstrap resamples of images; N_avg: image tokens per LLM layer (LVLM_CSP eq. 9); "
             "TFLOPs (exact): whole model incl. SAM and a method's own models; LLM TFLOPs (csp): LVLM_CSP eq. 11 "
             "(x2); LLM ms: per split the median over samples of the LLM stage plus the method's own scoring "
             "or selection (an instance segmenter or superpixel generator excluded), averaged over splits."), *notes]
    if fmt == "latex":
        return table + "\n" + "".join(f"% {line}\n" for line in foot)
    return table + "\n\n" + "\n".join(foot) + "\n"


# -- trade-off plots --------------------------------------------------------------------------------------------
PLOT_AXES = (("TFLOPs", "TFLOPs (exact)"), ("LLM ms", "LLM ms (incl. scoring)"), ("N_avg", "N_avg"))
MARKERS = "os^vDP*Xph"  # a new marker each time the colours run out


def series_styles(names: list[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """(colour, marker) per series, all distinct: tab10 up to 10 series, else tab20 with the marker changing every
    20 (one legend can then tell up to 200 series apart)."""
    import matplotlib as mpl

    palette = mpl.colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return {name: (palette[i % len(palette)], MARKERS[i // len(palette) % len(MARKERS)])
            for i, name in enumerate(names)}


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (lower or equal x and higher or equal y, one strictly), by x."""
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def plot_run(run_dir: str | Path, out: str | Path | None = None, metric: str = "mean gIoU") -> list[str]:
    """Accuracy vs TFLOPs, vs LLM latency and vs N_avg, one line per method across its budgets, the unpruned
    baseline marked, the Pareto front of the pruned points highlighted; PNG and PDF per (model, decode).
    Returns the written paths."""
    from pathlib import Path

    import matplotlib as mpl
    from matplotlib.figure import Figure

    frame, notes = paper_frame(run_dir)
    choices = [c for c in frame.columns if c.endswith(("gIoU", "cIoU")) and c != "dgIoU"]
    if metric not in choices:
        raise ValueError(f"no column {metric!r} in this run; choose one of {', '.join(choices)}")
    if frame[metric].isna().all():
        raise ValueError(f"{run_dir} has no cell with a finished {metric} to plot; run or resume it first")
    unfinished = sum(": missing" in n or ": partial" in n for n in notes)
    partial = f" - partial: {unfinished} cell(s) unfinished" if unfinished else ""
    base = Path(out) if out else Path(run_dir) / "plots" / "tradeoff"
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    blocks = list(frame.groupby(["model", "decode"], observed=True))
    for k, ((model, decode), block) in enumerate(blocks):
        block = block.dropna(subset=[metric])
        family = block["method"].str.split("@").str[0]
        with mpl.rc_context({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7}):
            names = sorted(set(family[block["group"] != "baseline"]))
            ncols = 3 if max(map(len, names), default=0) <= 28 else 2
            legend_rows = math.ceil((len(names) + 2) / ncols)
            fig = Figure(figsize=(7.0, 2.4 + 0.16 * legend_rows), layout="constrained")
            axes = fig.subplots(1, 3)
            styles = series_styles(names)
            for ax, (col, label) in zip(axes, PLOT_AXES, strict=True):
                pruned = block[block["group"] != "baseline"].dropna(subset=[col])
                if len(pruned):
                    front = pruned.iloc[pareto_front(pruned[col].to_numpy(float), pruned[metric].to_numpy(float))]
                    ax.step(front[col], 100 * front[metric], where="post", color="0.8", lw=4, zorder=1,
                            label="Pareto front")
                for name, rows in pruned.groupby(family[pruned.index]):
                    rows = rows.sort_values(col)
                    colour, marker = styles[name]
                    ax.plot(rows[col], 100 * rows[metric], marker=marker, ls="-", ms=3.5, lw=1.2, color=colour,
                            label=name, zorder=3)
                for _, r in block[block["group"] == "baseline"].iterrows():
                    ax.axhline(100 * r[metric], color="k", ls="--", lw=0.8, zorder=2)
                    ax.plot([r[col]], [100 * r[metric]], "k*", ms=8, zorder=4, label="unpruned")
                ax.set_xlabel(label)
                ax.grid(alpha=0.3)
            axes[0].set_ylabel(f"{metric} (%)")
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False, fontsize=6)
            fig.suptitle((f"{model} ({decode})" if len(blocks) > 1 else str(model)) + partial)
            stem = base if len(blocks) == 1 else base.with_name(f"{base.name}-{k}")
            for ext in ("png", "pdf"):
                path = stem.with_suffix(f".{ext}")
                fig.savefig(path, dpi=200)
                written.append(str(path))
    return written

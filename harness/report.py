"""Plain-text and markdown tables of run summaries (pandas for the data, tabulate for text)."""

from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

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

"""Grid throughput: one process vs local shard workers, with each image's encoders reused or run for every query.

Runs the default grid (every default method) on the bundled model over the first `--limit` samples of a split,
once per mode, each into a fresh run folder through the CLI (`segprune grid`, so model loading and the summary are
included in the wall time), and prints samples per second, the encoders' time per query (CLIP + SAM image
encoder, from the records) and how far each mode's gIoU is from the first mode's (per cell, at most).

    uv run --locked python benchmarks/throughput.py --limit 40 > results/throughput.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {  # name: extra `segprune grid` options
    "1 process, encoders per query": ["--no-reuse"],
    "1 process, encoders once per image": [],
    "2 workers, encoders per query": ["--launcher", "local", "--workers", "2", "--no-reuse"],
    "2 workers, encoders once per image": ["--launcher", "local", "--workers", "2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="shapes-ref:val")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--model", default="lisa-tiny-shapes")
    args = ap.parse_args()

    from harness.runner import default_methods, load_run, read_cell

    methods = default_methods()
    print(f"default grid: {len(methods)} methods ({', '.join(methods)}) x {args.split}[:{args.limit}] on "
          f"{args.model}, CPU\n")
    print(f"{'mode':<38} {'samples':>7} {'wall s':>7} {'samples/s':>9} {'speedup':>7} {'encoders ms/query':>17} "
          f"{'max |dgIoU|':>11}")
    base_rate, base_giou = None, None
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.yaml"
        grid.write_text(json.dumps({"models": [args.model], "methods": methods, "datasets": [args.split],
                                    "limit": args.limit}))
        for k, (name, extra) in enumerate(MODES.items()):
            out = Path(tmp) / f"run{k}"
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "harness.cli", "grid", str(grid), "--out", str(out), *extra],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{name}: segprune grid failed: {done.stderr.strip().splitlines()[-1:]}")
            rows = load_run(out)
            records = [r for row in rows for r in read_cell(out / "cells", row["cell"])]
            encoders = sum(r["latency_s"].get("vision", 0.0) + r["latency_s"].get("sam_encoder", 0.0)
                           for r in records if r.get("encoded", True)) / len(records)  # where they ran
            giou = {row["spec"]: row["giou"] for row in rows}
            rate = len(records) / wall
            base_rate, base_giou = base_rate or rate, base_giou or giou
            drift = max(abs(giou[s] - base_giou[s]) for s in giou)
            print(f"{name:<38} {len(records):>7} {wall:>7.1f} {rate:>9.2f} {rate / base_rate:>6.2f}x "
                  f"{encoders * 1e3:>17.1f} {drift:>11.5f}")


if __name__ == "__main__":
    main()

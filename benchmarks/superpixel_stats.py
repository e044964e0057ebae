"""Superpixels per image and how well they separate objects, per source, on the bundled model.

For each image: the number of superpixels in the image's label map (tokens: those inside CLIP's crop, the same on
shapes-ref) and the object recall, the share of the dataset's instances matched by one superpixel at IoU >= 0.5.
Prints the figures and writes a histogram of the counts.

    uv run --locked python benchmarks/superpixel_stats.py --split val --images 100 --out results/superpixel/plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import harness
from harness.engine import Context
from harness.ledger import Ledger
from harness.method import create_method

SOURCES = ("superpixel", "superpixel:points=8", "superpixel:source=slic,segments=12", "superpixel:source=slic",
           "superpixel:source=oracle")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="folder for counts.png")
    args = ap.parse_args()
    model = harness.model.load_bundled()
    seen, samples = set(), []
    for s in harness.load_dataset("shapes-ref", args.split):
        if s.image_id not in seen and len(samples) < args.images:
            seen.add(s.image_id)
            samples.append(s)
    counts: dict[str, list[int]] = {}
    print(f"shapes-ref {args.split}, {len(samples)} images, {np.mean([len(s.instances()) for s in samples]):.2f} "
          f"objects per image")
    for spec in SOURCES:
        method = create_method(spec)
        n, recall = [], []
        for s in samples:
            ctx = Context(model=model, info=model.info, ledger=Ledger(), rng=torch.Generator(), image=s.image,
                          instances=s.instances)
            with torch.inference_mode():
                ctx.prepared = model.prepare(s.image)
                labels = method.label_map(ctx)
            inst = s.instances()
            regions = labels[None] == np.arange(labels.max() + 1)[:, None, None]  # (S, H, W)
            inter = (regions[:, None] & inst[None]).sum((-1, -2))
            union = (regions[:, None] | inst[None]).sum((-1, -2))
            recall.append(float(((inter / union).max(0) >= 0.5).mean()))
            n.append(len(regions))
        counts[spec] = n
        print(f"{spec:40s} superpixels mean {np.mean(n):5.2f} (min {min(n)}, max {max(n)})  "
              f"object recall@0.5 {np.mean(recall):.3f}")
    if args.out:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3))
        ax = fig.subplots()
        top = max(max(v) for v in counts.values())
        for spec in ("superpixel", "superpixel:source=slic,segments=12", "superpixel:source=oracle"):
            ax.hist(counts[spec], bins=np.arange(0.5, top + 1.5), histtype="step",
                    label=spec.replace("superpixel", "sp"))
        ax.set_xlabel("superpixels per image")
        ax.set_ylabel("images")
        ax.legend(fontsize=6)
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "counts.png", dpi=150)


if __name__ == "__main__":
    main()

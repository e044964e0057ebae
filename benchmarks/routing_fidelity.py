"""How well each training-free alpha of Token Routing predicts the FFN update of the tokens it routes.

    uv run --locked python benchmarks/routing_fidelity.py [--model lisa-tiny-shapes] [--split train] [--limit 32]

On a calibration split (never the one evaluated), every layer of the unrouted model is run as usual; at each layer
the image tokens are split into proxies and routed tokens as `routing` splits them, and for each alpha the routed
update sum_j alpha_ij dv_j is compared with the routed token's true FFN update dv_i:
- g*: the constant gate that fits best, sum <a, t> / sum |a|^2 (least squares over every routed token and layer);
- residual at g = g* and at g = 1 (w/o gate), as |g a - t|^2 / |t|^2 summed (0: exact; 1: as good as no update,
  Table 5's w/o FFN);
then end to end: mask IoU with the unrouted model's mask, per alpha, at g = 1 and g = g* rounded.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import harness
from harness.methods.routing import TokenRouting

ALPHAS = ("random", "attn")


class Probe(TokenRouting):
    """Runs the stock FFN for every token, and measures what each alpha would have predicted for the routed ones."""

    name = "routing"

    def __init__(self):
        super().__init__(mask_layer=0)
        self.stats = {a: np.zeros(3) for a in ALPHAS}  # sum <a, t>, sum |a|^2, sum |t|^2

    def ffn(self, i, mlp, x, state, ctx):
        out = mlp(x)
        img = state.image_rows
        proxies, rest = self.draw(img, self.n_proxies(len(img)), ctx)
        truth = out[0, rest].float()
        for alpha in ALPHAS:
            self.alpha = alpha
            pred = self.alpha_weights(i, x, state.hidden, proxies, rest, ctx) @ out[0, proxies].float()
            self.stats[alpha] += [float((pred * truth).sum()), float((pred * pred).sum()), float((truth**2).sum())]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lisa-tiny-shapes")
    ap.add_argument("--data", default="shapes-ref")
    ap.add_argument("--split", default="train")
    ap.add_argument("--limit", type=int, default=32)
    args = ap.parse_args()
    model = harness.load_model(args.model)
    samples = harness.load_dataset(args.data, args.split, limit=args.limit)
    probe = Probe()
    for s in samples:
        model.segment(s.image, s.query, probe, is_sentence=s.is_sentence, sample_key=s.id)
    print(f"{args.model} on {args.data}:{args.split}, {len(samples)} samples, default proxies, every layer")
    gates = {}
    for alpha, (at, aa, tt) in probe.stats.items():
        g = at / aa
        gates[alpha] = g
        print(f"  alpha={alpha:6s}  g* = {g:.3f}   residual at g*: {(tt - at * at / aa) / tt:.3f}   "
              f"at g=1: {(aa - 2 * at + tt) / tt:.3f}")
    print("end to end, mask IoU with the unrouted model (mean over samples):")
    base = [model.segment(s.image, s.query, "none", is_sentence=s.is_sentence).mask for s in samples]

    def agreement(spec: str) -> float:
        method, ious = harness.create_method(spec), []
        for s, b in zip(samples, base, strict=True):
            m = model.segment(s.image, s.query, method, is_sentence=s.is_sentence, sample_key=s.id).mask
            union = (m | b).sum()
            ious.append((m & b).sum() / union if union else 1.0)
        return float(np.mean(ious))

    for alpha in ALPHAS:
        for g in sorted({1.0, round(min(max(gates[alpha], 0.0), 1.0), 2)}):
            print(f"  alpha={alpha:6s} gate={g:.2f}: {agreement(f'routing:mask_layer=0,alpha={alpha},gate={g}'):.3f}")
    print(f"  image=skip (w/o FFN):      {agreement('routing:mask_layer=0,image=skip'):.3f}")

if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())

"""Token Routing's three analyses (AAAI'26, eq. 1-3), per LLM layer, on any model, data and method.

At the input of every decoder layer l (after the method's `before_layer`, so a pruned or routed state is what is
measured), with A the head-mean attention of that layer recomputed for every query row as the engine does
(`harness.engine.attention_rows`: no eager switch, charged to no FLOPs or latency stage):
- `mask2img` (eq. 1): the attention mass LISA's mask token puts on image tokens. LISA's mask token is the row whose
  final state becomes the mask embedding, the token before [SEG]; NaN in layers it is absent from (held back).
- `img_attn` (eq. 2): the attention mass on image tokens, averaged over every query row (each row sums to 1, so
  eq. 2's normalisation is the identity here).
- `entropy` (eq. 3), per token kind: sum over channels of log(std over that kind's tokens + 1e-5), from the layer's
  input hidden states; NaN for a kind with fewer than two tokens.
Each figure is the mean over samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from harness.engine import Context, attention_rows
from harness.method import Method, create_method
from harness.state import Kind, TokenState

EPS = 1e-5
METRICS = ("mask2img", "img_attn", "entropy")


class Observer(Method):
    """Wraps a method and measures eq. 1-3 at the input of every layer, after the method's own `before_layer`."""

    def __init__(self, inner: Method):
        self.inner = inner
        self.name, self.position_policy = inner.name, inner.position_policy
        self.seed = getattr(inner, "seed", 0)
        self.rows: list[dict[str, Any]] = []  # one per (layer, metric, kind) of the current sample
        self._carrier = -1

    def bind(self, info):
        self.inner.bind(info)

    def on_vision(self, feats, ctx):
        return self.inner.on_vision(feats, ctx)

    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        self._carrier = int(state.index[state.last_prompt_row])  # the [SEG]-predicting token, by sequence position
        return self.inner.on_sequence(state, ctx)

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        state = self.inner.before_layer(i, state, ctx)
        lm = ctx.model.language_model
        rows = torch.arange(len(state), device=state.index.device)
        probs = attention_rows(lm.layers[i], lm.rotary_emb, state.hidden, ctx.positions(state), rows)  # (n, n)
        on_image = probs[:, state.kind == Kind.IMAGE].sum(-1)  # (n,) attention mass on image keys per query
        carrier = (state.index == self._carrier).nonzero()
        self.rows.append({"layer": i, "metric": "mask2img", "kind": "mask",
                          "value": float(on_image[carrier[0, 0]]) if carrier.numel() else math.nan})
        self.rows.append({"layer": i, "metric": "img_attn", "kind": "all", "value": float(on_image.mean())})
        self._entropy(i, state)
        return state

    def ffn(self, i, mlp, x, state, ctx):
        return self.inner.ffn(i, mlp, x, state, ctx)

    def _entropy(self, layer: int, state: TokenState) -> None:
        h = state.hidden[0].float()
        for kind in Kind:
            rows = h[state.kind == kind]
            value = float(torch.log(rows.std(0) + EPS).sum()) if len(rows) >= 2 else math.nan
            self.rows.append({"layer": layer, "metric": "entropy", "kind": kind.name.lower(), "value": value})


def analyze_tokens(model, samples: list, methods: list[str]) -> Any:
    """Eq. 1-3 per method and layer, the mean over `samples` (a pandas DataFrame: method, layer, metric, kind,
    value, n)."""
    import pandas as pd

    rows = []
    for spec in methods:
        method = create_method(spec, info=model.info)
        for s in samples:
            observer = Observer(method)
            model.segment(s.image, s.query, observer, is_sentence=s.is_sentence, sample_key=s.id)
            rows += [{"method": spec, "sample": s.id, **r} for r in observer.rows]
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["method", "layer", "metric", "kind"], sort=False)["value"]
    out = grouped.mean().reset_index()
    out["n"] = grouped.count().to_numpy()
    return out


def plot_tokens(frame, out: Path) -> Path:
    """Two panels: eq. 2 (bars for the first method, lines otherwise) and eq. 1 per layer; eq. 3 per kind and layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(frame["method"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for j, m in enumerate(methods):
        sub = frame[frame["method"] == m]
        img = sub[sub["metric"] == "img_attn"]
        mask = sub[sub["metric"] == "mask2img"]
        if j == 0:
            ax1.bar(img["layer"], img["value"], color="tab:blue", alpha=0.35, label=f"{m}: attention to image (eq. 2)")
        else:
            ax1.plot(img["layer"], img["value"], "--", label=f"{m}: attention to image (eq. 2)")
        ax1.plot(mask["layer"], mask["value"], "o-", label=f"{m}: mask token to image (eq. 1)")
        ent = sub[sub["metric"] == "entropy"]
        for kind in ("system", "image", "query", "answer"):
            k = ent[ent["kind"] == kind]
            if k["value"].notna().any():
                ax2.plot(k["layer"], k["value"], "-" if j == 0 else "--", label=f"{m}: {kind}")
    ax1.set(xlabel="LLM layer", ylabel="attention mass", title="Attention to image tokens")
    ax2.set(xlabel="LLM layer (input of)", ylabel="sum log std", title="Token entropy (eq. 3)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

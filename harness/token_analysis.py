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
        self.name, self.position_policy = inner.name, inner.policy
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
    """Left: eq. 2 (solid) and eq. 1 (dashed, dots) per layer, one colour per method. Right: eq. 3 per layer, one
    colour per token kind, one line style per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(frame["method"]))
    kinds = ("system", "image", "query", "answer")
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for j, m in enumerate(methods):
        sub = frame[frame["method"] == m]
        img, mask = sub[sub["metric"] == "img_attn"], sub[sub["metric"] == "mask2img"]
        ax1.plot(img["layer"], img["value"], "-", color=colours[j % len(colours)])
        ax1.plot(mask["layer"], mask["value"], "--o", ms=3, color=colours[j % len(colours)])
        ent = sub[sub["metric"] == "entropy"]
        for c, kind in enumerate(kinds):
            k = ent[ent["kind"] == kind]
            ax2.plot(k["layer"], k["value"], linestyle=styles[j % len(styles)], color=colours[c])
    ax1.set(xlabel="LLM layer", ylabel="attention mass on image tokens", ylim=(0, 1.02),
            title="eq. 2 (solid): all tokens; eq. 1 (dashed): LISA's mask token")
    ax2.set(xlabel="LLM layer (its input)", ylabel="sum over channels of log std", title="Token entropy (eq. 3)")
    ax1.legend([Line2D([], [], color=colours[j % len(colours)]) for j in range(len(methods))], methods,
               fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    handles = [Line2D([], [], color=colours[c]) for c in range(len(kinds))] + \
        [Line2D([], [], color="grey", linestyle=styles[j % len(styles)]) for j in range(len(methods))]
    ax2.legend(handles, [*kinds, *methods], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out

"""PyramidDrop: drop image tokens in stages, each stage keeping a fraction lambda of the last.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction",
CVPR 2025 (github.com/Cooperx521/PyramidDrop). Follows `pdrop_rank_drop` (reference notes, section 2): at each
stage boundary b the first layer of the new stage (layer b) ranks the image tokens on its pre-drop input with its
own input_layernorm, q/k projections and RoPE at the current positions; the query is the last instruction token;
softmax over all keys in fp32, head mean; stage s keeps int(N0 lambda^s) image tokens (N0: the original count);
position ids are re-indexed 0..n-1 after every drop.
"""

from __future__ import annotations

import torch

from harness.engine import Context
from harness.method import BUDGET_TOLERANCE, Method, ModelInfo, achieved_n_avg, register, scale_layers
from harness.state import TokenState

OFFICIAL_LAYERS = (8, 16, 24)  # of LLaVA-1.5-7B's 32 layers
LOW_BUDGET_LAYERS = (2, 8, 16)  # the authors' advice for small budgets (PyramidDrop issues #10, #29)


@register("pdrop", aliases=("pyramiddrop",))
class PyramidDrop(Method):
    """PyramidDrop: at each boundary in `layer_list`, keep the top int(N0 ratio^s) image tokens by the attention of
    the last instruction token in the first layer of the new stage; positions re-indexed after each drop.

    Official defaults: layer_list [8, 16, 24] on 32 layers, ratio (lambda) 0.5, so 576 -> 288 -> 144 -> 72. On a
    model that is not 32 layers deep the default boundaries are scaled by depth: round(b L / 32) (8 layers:
    [2, 4, 6]). The query row is the last token of the prompt before the answer (in LISA's template the token that
    predicts [SEG]).

    Budget mapping: keeps the boundaries and solves lambda (bisection on the exact schedule, 4 decimals; the last
    stage keeps at least one token); when the official boundaries cannot reach the target it moves to the authors'
    low-budget boundaries [2, 8, 16] (scaled), as they advise.

    Args:
        layer_list: stage boundaries: tokens are dropped before these decoder layers (null: [8, 16, 24] scaled to
            the model's depth).
        ratio: lambda: each stage keeps this fraction of the original image-token count times the previous
            stage's fraction (stage s keeps int(N0 ratio^s)); 1 keeps all.
    """

    stage = "in-llm"
    position_policy = "reindex"
    needs_llm_attention = True
    citation = "Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual " \
               "Redundancy Reduction, CVPR 2025"
    keep_all = {"ratio": 1.0}
    budget_params = ("ratio",)
    deviations = ("on a model that is not 32 layers deep the default boundaries are scaled by depth; the ranking "
                  "query is projected for the one query row only (the official code projects every token) and "
                  "GQA keys are repeated (the official code assumes no GQA)")

    def __init__(self, layer_list: list[int] | None = None, ratio: float = 0.5):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"pdrop: ratio (lambda) must be in (0, 1], got {ratio}")
        if layer_list is not None and (not layer_list or any(b < 1 for b in layer_list)
                                       or sorted(set(layer_list)) != list(layer_list)):
            raise ValueError(f"pdrop: layer_list must be increasing layer indices >= 1, got {layer_list}")
        self.layer_list, self.ratio = layer_list, ratio

    def boundaries(self, info: ModelInfo) -> list[int]:
        return list(self.layer_list) if self.layer_list is not None else scale_layers(OFFICIAL_LAYERS, info.n_layers)

    def bind(self, info: ModelInfo) -> None:
        if self.boundaries(info)[-1] >= info.n_layers:
            raise ValueError(f"pdrop: layer_list {self.layer_list} goes beyond the model's {info.n_layers} layers; "
                             f"use boundaries in 1..{info.n_layers - 1}")

    def counts(self, n0: int, n_stages: int) -> list[int]:
        return [int(n0 * self.ratio ** s) for s in range(n_stages + 1)]  # official: int(N0 * ratio_list[s])

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        bounds = ctx.scratch.setdefault("pdrop_bounds", self.boundaries(ctx.info))
        if i not in bounds:
            return state
        img = state.image_rows
        if "pdrop_n0" not in ctx.scratch:
            ctx.scratch["pdrop_n0"] = len(img)
        keep = self.counts(ctx.scratch["pdrop_n0"], len(bounds))[bounds.index(i) + 1]
        if keep >= len(img):
            return state
        q = torch.tensor([state.last_prompt_row], device=img.device)  # the last instruction token
        probs = ctx.attention_rows(i, state, q)[0]  # (n,) layer i ranks on its own pre-drop input, head mean
        return state.keep_image(img[probs[img].topk(keep).indices])

    def image_schedule(self, info: ModelInfo) -> list[int]:
        bounds = self.boundaries(info)
        counts = self.counts(info.n_image_tokens, len(bounds))
        return [counts[sum(i >= b for b in bounds)] for i in range(info.n_layers)]

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> PyramidDrop:
        options = [fixed["layer_list"]] if fixed.get("layer_list") is not None else \
            [scale_layers(OFFICIAL_LAYERS, info.n_layers), scale_layers(LOW_BUDGET_LAYERS, info.n_layers)]
        best = None
        for bounds in options:  # the official boundaries when they can reach the target, else the low-budget ones
            lo, hi = 0.0, 1.0
            for _ in range(50):  # N_avg(lambda) is a non-decreasing step function
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if achieved_n_avg(cls(layer_list=bounds, ratio=mid), info) < n_avg else (lo, mid)
            for lam in (round(lo, 4), round(hi, 4)):
                m = cls(layer_list=bounds, ratio=max(lam, 1e-4))
                if m.counts(info.n_image_tokens, len(bounds))[-1] < 1:
                    continue  # a schedule that drops every image token is no PyramidDrop setting
                err = abs(achieved_n_avg(m, info) - n_avg)
                if best is None or err < best[0]:
                    best = (err, m)
            if best is not None and best[0] <= BUDGET_TOLERANCE * info.n_image_tokens:
                break
        if best is None:
            raise ValueError(f"pdrop: N_avg {n_avg:.1f} is out of reach on {info.n_layers} layers without dropping "
                             f"every image token")
        return best[1]


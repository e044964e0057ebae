"""DivPrune: keep a max-min diverse subset of the projected image tokens, before the LLM.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(github.com/vbdi/divprune; reference notes `methods-2025.md` section 2). The official code runs at the end of LLaVA's
splice: on the N projected image embeddings V, D = 1 - cos(V, V); the first token is the one whose nearest
neighbour is farthest (the second-smallest entry of its column of D: the smallest is its own distance 0), every
next one maximises the minimum distance to the tokens already chosen (greedy farthest-point selection), k =
round(SUBSET_RATIO N) tokens in all. The kept tokens enter the LLM sorted in raster order with contiguous position
ids; the LLM is unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from harness.engine import Context
from harness.method import Method, ModelInfo, register
from harness.state import TokenState


def max_min_diverse(v: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy selection (official `DivPrune`): k row numbers of `v` (n, d) in the order chosen.

    Step 0 takes the argmax of each column's second-smallest cosine distance; step i the argmax of the minimum
    distance to the rows chosen so far (kept as a running minimum, the same values the official code recomputes
    from all chosen rows). Ties go to the first index (torch.argmax).
    """
    x = F.normalize(v.float(), dim=-1)
    dist = 1.0 - x @ x.T  # (n, n) cosine distance
    chosen = torch.empty(k, dtype=torch.long, device=v.device)
    nearest = dist.topk(2, dim=0, largest=False).values[1]  # (n,) distance to the nearest other token
    chosen[0] = nearest.argmax()
    closest = dist[chosen[0]].clone()  # (n,) distance of every token to the chosen set
    closest[chosen[0]] = -torch.inf  # chosen tokens stay out (the official code relies on their ~0 self-distance)
    for i in range(1, k):
        chosen[i] = closest.argmax()
        closest = torch.minimum(closest, dist[chosen[i]])
        closest[chosen[i]] = -torch.inf
    return chosen


@register("divprune")
class DivPrune(Method):
    """DivPrune: keep the k projected image tokens chosen by greedy max-min cosine diversity, in raster order.

    Official defaults: SUBSET_RATIO 0.098 (56 of LLaVA-1.5's 576 tokens; 25 of the tiny model's 256), raster order,
    contiguous position ids. The paper's tables were made before the official code sorted the kept tokens (issue #8):
    `order=selection` feeds them in the greedy order instead.

    Budget mapping: a pre-LLM method's N_avg is its kept count, so keep = round(N_avg); exact.

    Args:
        subset_ratio: the fraction of image tokens kept (official SUBSET_RATIO): k = round(subset_ratio N).
        keep: keep exactly this many image tokens instead of using `subset_ratio`.
        order: raster (the official code: kept tokens sorted by patch) or selection (the greedy order, as in the
            paper's tables).
    """

    stage = "pre-llm"
    position_policy = "reindex"  # the official splice: contiguous ids over the shorter sequence
    citation = ("Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025 "
                "(github.com/vbdi/divprune)")
    keep_all = {"subset_ratio": 1.0}
    budget_params = ("subset_ratio", "keep")
    deviations = ("distances in fp32 whatever the model dtype (official: the model's fp16); a token already chosen is "
                  "excluded explicitly, where the official code relies on its self-distance being the smallest of its "
                  "column (the same choice unless two tokens are exact duplicates)")

    def __init__(self, subset_ratio: float | None = 0.098, keep: int | None = None,
                 order: Literal["raster", "selection"] = "raster"):
        if keep is None and (subset_ratio is None or not 0.0 < subset_ratio <= 1.0):
            raise ValueError(f"divprune: subset_ratio is the fraction kept and must be in (0, 1], got {subset_ratio}")
        if keep is not None and keep < 1:
            raise ValueError(f"divprune: keep must be >= 1 image token, got {keep}")
        self.subset_ratio = None if keep is not None else subset_ratio
        self.keep, self.order = keep, order

    def bind(self, info: ModelInfo) -> None:
        if self.keep is not None and self.keep > info.n_image_tokens:
            raise ValueError(f"divprune: keep={self.keep} exceeds the model's {info.n_image_tokens} image tokens")

    def keep_count(self, n: int) -> int:
        return min(self.keep, n) if self.keep is not None else max(1, int(round(self.subset_ratio * n)))

    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        img = state.image_rows
        k = self.keep_count(len(img))
        if k >= len(img) and self.order == "raster":
            return state
        v = state.hidden[0, img]  # (N, d): the projected image tokens as spliced in
        with ctx.overhead():
            chosen = max_min_diverse(v, k)
        ctx.ledger.add_method_matmul(len(img), v.shape[1], len(img))  # the cosine matrix
        if self.order == "raster":
            return state.keep_image(img[chosen])
        # the greedy order: the image block is rebuilt in that order, its rows renumbered as assembled this way
        rows = torch.cat([torch.arange(int(img[0]), device=img.device), img[chosen],
                          torch.arange(int(img[-1]) + 1, len(state), device=img.device)])
        out = state.select(rows)
        out.index = torch.arange(len(out), device=img.device)
        return out

    def image_schedule(self, info: ModelInfo) -> list[int]:
        return [self.keep_count(info.n_image_tokens)] * info.n_layers

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> DivPrune:
        keep = max(1, min(round(n_avg), info.n_image_tokens))
        return cls(**{**fixed, "keep": keep, "subset_ratio": None})

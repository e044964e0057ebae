"""PruMerge and PruMerge+: keep the patches the CLS token attends to unusually strongly, each merged with its
32 most similar patches (Shang et al., LLaVA-PruMerge, ICCV 2025, github.com/42Shawn/LLaVA-PruMerge; reference
notes section 3).

Both read the *last* CLIP layer's q and k, computed from the selected feature layer's output H (LLaVA's
hidden_states[-2], the layer after it is never run for LLaVA): full width, bias included, one "head", no q scaling
inside; A = softmax(q k^T / sqrt(C)) over all keys, CLS row a = A[0, 1:]. The adaptive ratio is the IQR outlier
rule over a (share of values above Q3 + 1.5 IQR, linear percentiles); k = int(N ratio); the kept set S is top-k of a
in descending order. Each kept token i becomes y_i = H_i + sum_j a_j H_j over its 32 most cosine-similar other
patches (keys L2-normalised; weights are raw, unnormalised attentions), and one extra token e = sum over the patches
not kept of a_j H_j is appended. PruMerge+ adds raster-stride patches 0, t, 2t, ... < N - 1 with
t = int(int(1 / ratio) / 3) that are not in S, after S, before merging.

Only the CLS query row is computed (the official code hooks q for every token); the keys are computed for all
tokens, as the merge needs them. The work is charged to the method (projections, the score row, the similarities
and the merge).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.engine import Context, VisionFeatures
from harness.method import BUDGET_TOLERANCE, Method, ModelInfo, register

KNN = 32  # neighbours merged into each kept token (hard-coded in the official code)
CITATION = "Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models, ICCV 2025"


def cls_attention(feats: VisionFeatures, ctx: Context) -> tuple[Tensor, Tensor]:
    """(a, keys): the CLS row of the layer after the feature layer, over the N patches, and that layer's patch keys
    (N, C), both in fp32, from that layer's q_proj / k_proj on layer_norm1(H)."""
    layers = feats.tower.encoder.layers
    if feats.layer + 1 >= len(layers):
        raise ValueError("prumerge reads the CLIP layer after the feature layer, but the tower's feature layer is its "
                         "last; use a model with vision_feature_layer -2 (LLaVA's default)")
    layer = layers[feats.layer + 1]
    h = torch.cat([feats.cls[:, None], feats.patches], 1)  # (1, 1 + N, C)
    with ctx.overhead():
        x = layer.layer_norm1(h)
        q = layer.self_attn.q_proj(x[:, :1]).float()  # (1, 1, C)
        k = layer.self_attn.k_proj(x).float()  # (1, 1 + N, C)
        c = k.shape[-1]
        a = (q @ k.transpose(1, 2) / math.sqrt(c)).softmax(-1)[0, 0, 1:]  # (N,)
    n1 = h.shape[1]
    ctx.ledger.add_method_matmul(1, c, c)
    ctx.ledger.add_method_matmul(n1, c, c)
    ctx.ledger.add_method_matmul(1, c, n1)
    return a, k[0, 1:]


def iqr_ratio(a: Tensor) -> float:
    """Share of values above the upper IQR fence Q3 + 1.5 (Q3 - Q1), percentiles with linear interpolation (numpy's
    default, as the official `outlier_dectection`)."""
    q1, q3 = torch.quantile(a.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=a.device))
    return int((a.double() > q3 + 1.5 * (q3 - q1)).sum()) / a.numel()


def merge(feats: VisionFeatures, a: Tensor, keys: Tensor, kept: Tensor, ctx: Context) -> VisionFeatures:
    """y_i = H_i + sum of a_j H_j over the KNN patches j != i most cosine-similar to i, for each kept i (in the given
    order), then e = sum of a_j H_j over the patches not kept. Every token is recorded as merged
    (`Ledger.merged_token`), with these weights."""
    h = feats.patches[0]  # (N, C)
    n, c = h.shape
    with ctx.overhead():
        kn = F.normalize(keys, dim=-1)
        sim = kn[kept] @ kn.T  # (k, N)
        sim[torch.arange(len(kept), device=sim.device), kept] = float("-inf")  # the others, not itself
        nbr = sim.topk(min(KNN, n - 1), dim=-1).indices  # (k, KNN)
        w = a[nbr].to(h.dtype)  # raw attentions: the official normalisation by their sum is commented out
        y = h[kept] + torch.einsum("kj,kjc->kc", w, h[nbr])
        rest = torch.ones(n, dtype=torch.bool, device=h.device)
        rest[kept] = False
        extra = a[rest].to(h.dtype)[None] @ h[rest]  # (1, C)
    ctx.ledger.add_method_matmul(len(kept), keys.shape[-1], n)  # similarities
    ctx.ledger.add_method_matmul(len(kept), nbr.shape[1], c)  # weighted neighbour sums
    ctx.ledger.add_method_matmul(1, int(rest.sum()), c)  # the extra token
    # y_i = H_i + sum_j a_j H_j: patch i at weight 1, its neighbours at their attention; e: the rest at theirs
    a_list, codes = a.tolist(), []
    for i, nb in zip(kept.tolist(), nbr.tolist(), strict=True):
        codes.append(ctx.ledger.merged_token([i, *nb], [1.0, *(a_list[j] for j in nb)]))
    others = rest.nonzero().squeeze(1).tolist()
    codes.append(ctx.ledger.merged_token(others, [a_list[j] for j in others]))
    index = torch.tensor(codes, dtype=torch.long, device=kept.device)
    return replace(feats, patches=torch.cat([y, extra])[None], patch_index=index)


@register("prumerge")
class PruMerge(Method):
    """PruMerge: the CLS-attention outliers of the last CLIP layer (IQR rule, adaptive per image), each merged with
    its 32 most similar patches by raw attention weights, plus one token summing the rest; order: descending
    attention, extra token last.

    Budget mapping: with a budget the IQR rule is replaced by the official fixed `ratio` (its non-adaptive mode):
    k = target - 1 attention picks plus the extra token, exact. Without one, the token count is adaptive; the run
    reports the achieved N_avg.

    Args:
        ratio: fraction of patches kept as centres, k = int(N ratio); null: the IQR outlier share (official default).
    """

    stage = "pre-llm"
    position_policy = "reindex"  # the official LLaVA splice: contiguous ids over the shorter sequence
    needs_vision_attention = True
    citation = CITATION
    deviations = ("only the CLS query row of the last CLIP layer is computed (the official code hooks q for all "
                  "tokens); the merge is vectorised (official: a Python loop), same neighbours and weights")
    budget_params = ("ratio",)

    def __init__(self, ratio: float | None = None):
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise ValueError(f"prumerge: ratio must be in (0, 1] (or null for the adaptive IQR rule), got {ratio}")
        self.ratio = ratio

    def centres(self, a: Tensor, ratio: float) -> Tensor:
        return a.topk(int(a.numel() * ratio)).indices  # descending attention, as torch.topk returns them

    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        a, keys = cls_attention(feats, ctx)
        ratio = self.ratio if self.ratio is not None else iqr_ratio(a)
        return merge(feats, a, keys, self.centres(a, ratio), ctx)

    def image_schedule(self, info: ModelInfo) -> list[int] | None:
        if self.ratio is None:
            return None
        return [int(info.n_image_tokens * self.ratio) + 1] * info.n_layers

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> PruMerge:
        n = info.n_image_tokens
        k = min(n, max(1, round(n_avg) - 1))
        return cls(**{**fixed, "ratio": min(1.0, (k + 0.5) / n)})  # int(N ratio) = k exactly


@register("prumerge+", aliases=("prumerge_plus",))
class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge's outlier centres plus raster-stride patches 0, t, 2t, ... < N - 1 (t =
    int(int(1 / ratio) / 3), a 1-D stride over the flattened grid) not already chosen, appended after them; then the
    same merge and extra token.

    Budget mapping: `ratio` replaces the IQR share in the same formulas; the budget picks the ratio whose count
    int(N ratio) + |stride set| + 1 is closest to the target. Stride patches that are also attention picks are not
    replaced (official), so the achieved count is at most that, and data-dependent: the run reports it.

    Args:
        ratio: share of patches picked by attention, and through it the stride; null: the IQR outlier share
            (official inference path).
    """

    deviations = (PruMerge.deviations + "; when no patch is an outlier (ratio 0, where the official code divides by "
                  "zero) one centre is kept (ratio 1/N), and a ratio above 1/3 (official stride 0, an error) uses "
                  "stride 1; a given `ratio` (and so a budget) runs the inference path's formulas with that ratio, "
                  "which the official code does not offer (its fixed-ratio training path strides from step/2 with "
                  "stride step and keeps duplicates)")

    def centres(self, a: Tensor, ratio: float) -> Tensor:
        n = a.numel()
        ratio = max(ratio, 1.0 / n)
        picked = a.topk(int(n * ratio)).indices
        t = max(1, int(int(1.0 / ratio) / 3))
        grid = torch.arange(0, n - 1, t, device=a.device)
        extra = grid[~torch.isin(grid, picked)]
        return torch.cat([picked, extra])

    def image_schedule(self, info: ModelInfo) -> list[int] | None:
        return None  # the stride set overlaps the attention picks by a data-dependent amount

    @staticmethod
    def upper_count(n: int, ratio: float) -> int:
        ratio = max(ratio, 1.0 / n)
        return int(n * ratio) + len(range(0, n - 1, max(1, int(int(1.0 / ratio) / 3)))) + 1

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> PruMergePlus:
        n = info.n_image_tokens
        best = min(((k + 0.5) / n for k in range(1, n + 1)), key=lambda r: abs(cls.upper_count(n, r) - n_avg))
        got = cls.upper_count(n, best)
        if abs(got - n_avg) > BUDGET_TOLERANCE * n:  # the stride is an integer: many counts are unreachable
            raise ValueError(f"prumerge+ cannot reach N_avg {n_avg:.1f} on this model: its closest ratio {best:g} "
                             f"gives at most {got} tokens; ask for that budget or give the ratio")
        return cls(**{**fixed, "ratio": min(1.0, best)})

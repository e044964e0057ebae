"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity, before the projector
(Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025,
github.com/dvlab-research/VisionZip; reference notes section 4).

Everything comes from the selected feature layer (LLaVA's hidden_states[-2], CLIP layer 22 of 24): its output H
(CLS included), its attention probabilities and its keys. The CLS row of the attention is recomputed per head from
the layer's input (layer_norm1, q_proj of the CLS row, k_proj of all tokens, softmax of q k^T / sqrt(head_dim) over
all keys), so sdpa, flash and eager towers give the same tokens; the metric is the keys averaged over heads.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.engine import Context, VisionFeatures, cls_attention_heads
from harness.method import Method, ModelInfo, register

OFFICIAL = (54, 10)  # the README's LLaVA-1.5 setting: 64 tokens


def cls_attention_and_metric(feats: VisionFeatures, ctx: Context) -> tuple[Tensor, Tensor]:
    """(score, metric): CLS attention to each patch summed over heads (N,) and the head-mean keys (1 + N, head_dim)
    of the feature layer, in fp32."""
    probs, keys = cls_attention_heads(feats.tower.encoder.layers[feats.layer], feats.layer_input, ctx)
    with ctx.overhead():
        return probs[:, 1:].sum(0), keys.mean(0)


@register("visionzip")
class VisionZip(Method):
    """VisionZip: `dominant` tokens (CLS plus the dominant - 1 patches with the most CLS attention, in raster order)
    and `contextual` tokens: targets spread uniformly over the remaining patches' list, every other remaining patch
    assigned to its most cosine-similar target (head-mean keys), each contextual token = target + mean of its
    members. Output: dominant then contextual, `dominant + contextual` tokens in all.

    Budget mapping: a target count T is split in the official 54:10 proportion, dominant = round(54 T / 64) (at
    least 1, the CLS) and contextual = T - dominant; exact.

    Args:
        dominant: dominant tokens, CLS included (official README: 54 for 64 tokens; function default 191).
        contextual: contextual (merged) tokens (official README: 10; function default 30).
    """

    stage = "pre-llm"
    position_policy = "reindex"  # the official LLaVA splice: contiguous ids over the shorter sequence
    needs_vision_attention = True
    citation = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025"
    deviations = ("the CLS attention row is recomputed from the feature layer's input instead of asking the tower "
                  "for every attention matrix; same probabilities, any attention backend")
    budget_params = ("dominant", "contextual")

    def __init__(self, dominant: int = OFFICIAL[0], contextual: int = OFFICIAL[1]):
        if dominant < 1:
            raise ValueError(f"visionzip: dominant counts the CLS token and must be >= 1, got {dominant}")
        if contextual < 0:
            raise ValueError(f"visionzip: contextual must be >= 0, got {contextual}")
        self.dominant, self.contextual = dominant, contextual

    def bind(self, info: ModelInfo) -> None:
        n = info.n_image_tokens
        if self.dominant - 1 + self.contextual > n:
            raise ValueError(f"visionzip: dominant - 1 + contextual = {self.dominant - 1 + self.contextual} exceeds "
                             f"the model's {n} patches")

    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        score, metric = cls_attention_and_metric(feats, ctx)
        h = torch.cat([feats.cls[:, None], feats.patches], 1)[0]  # (1 + N, C), CLS first
        n = score.numel()
        dev = h.device
        with ctx.overhead():
            top = score.topk(self.dominant - 1).indices + 1  # rows of H (CLS is row 0)
            keep = torch.zeros(n + 1, dtype=torch.bool, device=dev)
            keep[0] = True
            keep[top] = True
            dominant = keep.nonzero().squeeze(1)  # CLS, then patches in raster order
            rest = (~keep).nonzero().squeeze(1)  # remaining patches, raster order
            tokens, index = [h[dominant]], [dominant - 1]  # CLS -> patch index -1
            if self.contextual > 0:
                m = len(rest)
                step = max(1, m // self.contextual)
                targets = torch.arange(0, m, step, device=dev)[: self.contextual]
                is_target = torch.zeros(m, dtype=torch.bool, device=dev)
                is_target[targets] = True
                members = (~is_target).nonzero().squeeze(1)
                mn = F.normalize(metric[rest], dim=-1)
                owner = (mn[members] @ mn[targets].T).argmax(-1)  # (members,) -> target number
                hr = h[rest]
                total = torch.zeros(len(targets), h.shape[1], dtype=h.dtype, device=dev)
                total.index_add_(0, owner, hr[members])
                count = torch.bincount(owner, minlength=len(targets)).to(h.dtype)[:, None]
                ctx_tokens = hr[targets] + total / count.clamp(min=1)  # no members: total is 0
                tokens.append(ctx_tokens)
                # each contextual token: its target patch (weight 1) plus the mean of its members (1 / count each)
                patch = (rest - 1).tolist()
                groups: list[list[int]] = [[] for _ in range(len(targets))]
                for m, o in zip(members.tolist(), owner.tolist(), strict=True):
                    groups[o].append(patch[m])
                codes = [ctx.ledger.merged_token([patch[t], *mine], [1.0] + [1 / len(mine)] * len(mine))
                         if mine else patch[t] for t, mine in zip(targets.tolist(), groups, strict=True)]
                index.append(torch.tensor(codes, dtype=torch.long, device=dev))
                ctx.ledger.add_method_matmul(len(members), metric.shape[1], len(targets))
        return replace(feats, patches=torch.cat(tokens)[None], patch_index=torch.cat(index))

    def image_schedule(self, info: ModelInfo) -> list[int]:
        return [self.dominant + self.contextual] * info.n_layers

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> VisionZip:
        t = max(1, min(round(n_avg), info.n_image_tokens + 1))
        d = max(1, round(t * OFFICIAL[0] / sum(OFFICIAL)))
        return cls(**{**fixed, "dominant": d, "contextual": t - d})

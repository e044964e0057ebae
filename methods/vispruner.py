"""VisPruner: important tokens by CLIP's [CLS] attention, diverse ones by removing duplicates, before the LLM.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs", ICCV 2025
(github.com/Theia-4869/VisPruner; reference notes `methods-2025.md` section 3). From the selected CLIP feature layer
(LLaVA's hidden_states[-2]): its patch features F and its [CLS] attention row, averaged over heads. The T r patches
with the most attention are "important"; the rest, in descending attention, are de-duplicated in rounds: split
alternately into A and B, every a in A scored by its highest cosine similarity to B, the (at most 8) a's with the
highest scores dropped, until T (1 - r) remain. All tokens are projected; the kept ones enter the LLM in raster
order with contiguous position ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.engine import Context, VisionFeatures, cls_attention_heads
from harness.method import Method, ModelInfo, register
from harness.state import TokenState

ROUND = 8  # the official cap on tokens removed per de-duplication round


def remove_duplicates(feats: torch.Tensor, residual: torch.Tensor, target: int) -> tuple[torch.Tensor, list[int]]:
    """VisPruner's iterative matching and pruning: shrink `residual` (patch indices, in its current order) to
    `target` by rounds of bipartite de-duplication on L2-normalised `feats` (N, C). Returns the survivors and the
    residual count R of every round (a, b: the tokens at even and odd places of the current order; the r a's most
    similar to some b go; the new order is the kept a's by descending similarity, then every b)."""
    x = F.normalize(feats.float(), dim=-1)
    sizes = []
    while (r := min(ROUND, len(residual) - target)) > 0:
        sizes.append(len(residual))
        a, b = residual[0::2], residual[1::2]  # a has ceil(R / 2) tokens (the official code needs R even)
        best = (x[a] @ x[b].T).max(-1).values  # (|a|,) each a's closest match in b
        keep = best.sort(descending=True, stable=True).indices[r:]
        residual = torch.cat([a[keep], b])
    return residual, sizes


@register("vispruner")
class VisPruner(Method):
    """VisPruner: T image tokens, T r of them by [CLS] attention and T (1 - r) by duplicate removal, raster order.

    Official settings: the README's `128 0.5` (64 important + 64 diverse, the default here) and `64 0.75`; the CLI
    default T=576 keeps everything on LLaVA-1.5. T counts tokens, so on the tiny model 128 keeps half of its 256.

    Budget mapping: a pre-LLM method's N_avg is its kept count, so T = round(N_avg) with r kept (default 0.5); exact.

    Args:
        visual_token_num: T, the image tokens kept (official `--visual_token_num`; T >= N keeps all).
        important_ratio: r, the share of T chosen by [CLS] attention (official `--important_ratio`); the rest are
            diverse tokens.
    """

    stage = "pre-llm"
    position_policy = "reindex"  # the official splice: contiguous ids over the shorter sequence
    needs_vision_attention = True
    citation = ("Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in "
                "VLMs (VisPruner), ICCV 2025 (github.com/Theia-4869/VisPruner)")
    keep_all = {"visual_token_num": 1 << 20}
    budget_params = ("visual_token_num",)
    deviations = ("the [CLS] attention row is recomputed from the feature layer's input (any tower attention backend, "
                  "fp32); ties in attention and similarity are broken by index (stable sorts; the official argsort is "
                  "not stable); an odd residual count, where the official batched gather fails, splits into "
                  "ceil(R/2) a's and floor(R/2) b's; a round that must drop more tokens than A holds (fewer than 8 "
                  "diverse tokens wanted), where the official code fails too, drops all of A and goes on")

    def __init__(self, visual_token_num: int = 128, important_ratio: float = 0.5):
        if visual_token_num < 1:
            raise ValueError(f"vispruner: visual_token_num must be >= 1, got {visual_token_num}")
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio is a share of the kept tokens in [0, 1], got "
                             f"{important_ratio}")
        self.visual_token_num, self.important_ratio = visual_token_num, important_ratio

    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        n = feats.patches.shape[1]
        t = min(self.visual_token_num, n)
        if t >= n:
            return feats
        probs, _ = cls_attention_heads(feats.tower.encoder.layers[feats.layer], feats.layer_input, ctx)
        with ctx.overhead():
            attention = probs[:, 1:].mean(0)  # (N,) head mean of the [CLS] row over the patches
            order = attention.sort(descending=True, stable=True).indices
            t_imp = int(t * self.important_ratio)
            kept, residual, sizes = order[:t_imp], order[t_imp:], []
            if t - t_imp > 0:
                residual, sizes = remove_duplicates(feats.patches[0], residual, t - t_imp)
                kept = torch.cat([kept, residual])
        for size in sizes:  # a round scores ceil(R / 2) a's against floor(R / 2) b's
            ctx.ledger.add_method_matmul((size + 1) // 2, feats.patches.shape[2], size // 2)
        ctx.scratch["vispruner_kept"] = kept.sort().values
        return feats

    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        if "vispruner_kept" not in ctx.scratch:
            return state  # T >= N: everything kept
        img = state.image_rows  # the full image block, in patch order: the projector ran on every token (official)
        return state.keep_image(img[ctx.scratch.pop("vispruner_kept").to(img.device)])

    def image_schedule(self, info: ModelInfo) -> list[int]:
        return [min(self.visual_token_num, info.n_image_tokens)] * info.n_layers

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> VisPruner:
        return cls(**{**fixed, "visual_token_num": max(1, min(round(n_avg), info.n_image_tokens))})

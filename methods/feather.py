"""FEATHER: FastV's criterion without RoPE, protected by a uniform grid, applied in two stages.

Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model Acceleration", ICCV
2025 (github.com/markendo/FEATHER). Follows `FastVLlamaModel.forward` / `calculate_attention_weight` and
`eval_feather.sh` (`--fastv_k "[8, 16]" --fastv_ratio 0.7 --fastv_predefined_mask "no_rope_s=3"`; reference notes,
section 8.2): the score of an image token is the last token's attention in layer K-1, recomputed from that layer's
input *without RoPE* (RoPE's long-term decay biases FastV toward the bottom of the image), softmax over the image
keys only, head mean. Stage 1 keeps the top int(N (1 - R)) image tokens united with a stride-3 grid on the patch
grid; stage 2 keeps the top int(M (1 - R)^2) of the M survivors (grid tokens are not protected there). Original
position ids are kept.
"""

from __future__ import annotations

import torch

from harness.engine import Context
from harness.method import BUDGET_TOLERANCE, Method, ModelInfo, register, scale_layers
from harness.state import TokenState

OFFICIAL_LAYERS = (8, 16)  # of 32


@register("feather")
class Feather(Method):
    """FEATHER: two FastV-style drops scored without RoPE, the first one united with a uniform grid.

    Official defaults (eval_feather.sh): drops before layers [8, 16] of 32, R = 0.7, grid stride 3. On a model that
    is not 32 layers deep the boundaries are scaled by depth like PyramidDrop's: round(b L / 32) (8 layers: [2, 4]).
    The grid holds the patches whose row and column are multiples of the stride. The token count after stage 1
    depends on how much the top set overlaps the grid, so the schedule is known only per input (the ledger records
    it).

    Budget mapping: keeps the stride and solves R (bisection) for the expected N_avg, taking the grid's overlap with
    the top set as that of independent sets (t + g - t g / N); the official boundaries are kept when they can reach
    the target with stage 2 keeping a token, else the nearest pair that can (unless `layers` is given). The
    achieved N_avg is measured per image.

    Args:
        layers: the two decoder layers before which tokens are dropped (null: [8, 16] scaled to the model's depth).
        ratio: R: stage 1 keeps the top int(N (1 - R)) image tokens (plus the grid), stage 2 the top
            int(M (1 - R)^2) of the M left; 0 keeps all.
        stride: stride of the protected uniform grid on the patch grid (0: no grid).
    """

    stage = "in-llm"
    position_policy = "original"
    needs_llm_attention = True
    citation = "Endo et al., Feather the Throttle: Revisiting Visual Token Pruning for VLM Acceleration, ICCV 2025"
    keep_all = {"ratio": 0.0}
    budget_params = ("ratio",)
    deviations = ("on a model that is not 32 layers deep the boundaries are scaled by depth; the last token is "
                  "</s> of the teacher-forced answer in LISA's template mode (FastV's deviation note applies)")

    def __init__(self, layers: list[int] | None = None, ratio: float = 0.7, stride: int = 3):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"feather: ratio is the fraction dropped and must be in [0, 1), got {ratio}")
        if layers is not None and (len(layers) != 2 or not 1 <= layers[0] < layers[1]):
            raise ValueError(f"feather: layers must be two increasing layer indices >= 1, got {layers}")
        if stride < 0:
            raise ValueError(f"feather: stride must be >= 0 (0: no grid), got {stride}")
        self.layers, self.ratio, self.stride = layers, ratio, stride

    def boundaries(self, info: ModelInfo) -> list[int]:
        return list(self.layers) if self.layers is not None else scale_layers(OFFICIAL_LAYERS, info.n_layers)

    def bind(self, info: ModelInfo) -> None:
        if self.boundaries(info)[1] >= info.n_layers:
            raise ValueError(f"feather: layers {self.layers} go beyond the model's {info.n_layers} layers; use "
                             f"indices in 1..{info.n_layers - 1}")

    def grid_patches(self, grid: tuple[int, int]) -> torch.Tensor:
        """Row-major patch indices of the protected grid."""
        if self.stride == 0:
            return torch.zeros(0, dtype=torch.long)
        h, w = grid
        rows, cols = torch.arange(0, h, self.stride), torch.arange(0, w, self.stride)
        return (rows[:, None] * w + cols[None]).flatten()

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        first, second = ctx.scratch.setdefault("feather_bounds", self.boundaries(ctx.info))
        if i in (first, second):
            prev = ctx.scratch.pop("feather_input")  # layer i-1's input (after any drop before layer i-1)
            img = state.image_rows
            # official: int(N * (1 - R)) at stage 1, int(M * (1 - R)^2) of the M survivors at stage 2
            keep = int(len(img) * (1 - self.ratio)) if i == first else int(len(img) * (1 - self.ratio) ** 2)
            q = torch.tensor([len(prev) - 1], device=img.device)  # the last token
            probs = ctx.attention_rows(i - 1, prev, q, rope=False, keys=prev.image_rows)[0]  # (n_img,) no RoPE
            rows = img[probs.topk(keep).indices]  # the image rows are the same as in layer i-1's input
            if i == first and self.stride:
                on_grid = torch.isin(state.patch[img], self.grid_patches(ctx.info.grid).to(img.device))
                rows = torch.unique(torch.cat([rows, img[on_grid]]))
            state = state.keep_image(rows)
        if i + 1 in (first, second):
            ctx.scratch["feather_input"] = state  # layer i's input ranks the drop before layer i + 1
        return state

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> Feather:
        base = cls(**fixed)
        n, layers = info.n_image_tokens, info.n_layers
        g = len(base.grid_patches(info.grid))
        f0, s0 = base.boundaries(info)
        pairs = [(f0, s0)] if fixed.get("layers") is not None else sorted(
            ((a, b) for a in range(1, layers) for b in range(a + 1, layers)),
            key=lambda p: (abs(p[0] - f0) + abs(p[1] - s0), -p[0], -p[1]))  # the official pair, then its neighbours
        closest = None
        for first, second in pairs:
            lo, hi = 0.0, 0.9999
            for _ in range(50):  # expected N_avg decreases with R
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _expected(first, second, mid, n, g, layers)[0] > n_avg else (lo, mid)
            r = round(hi, 4)
            got, last = _expected(first, second, r, n, g, layers)
            if last >= 1 and abs(got - n_avg) <= BUDGET_TOLERANCE * n:  # stage 2 must keep a token
                return cls(**{**fixed, "layers": [first, second], "ratio": r})
            closest = got if closest is None else min(closest, got, key=lambda v: abs(v - n_avg))
        raise ValueError(f"feather: N_avg {n_avg:.1f} is out of reach on {layers} layers with a stride-{base.stride} "
                         f"grid (closest expected: {closest:.1f})")


def _expected(first: int, second: int, r: float, n: int, g: int, layers: int) -> tuple[float, int]:
    """Expected N_avg of a FEATHER setting and its stage-2 count, for a top set that overlaps the g grid tokens as
    an independent set would."""
    t = int(n * (1 - r))
    m1 = t + g - t * g / n
    m2 = int(m1 * (1 - r) ** 2)
    return (first * n + (second - first) * m1 + (layers - second) * m2) / layers, m2

"""Controls: the unpruned baseline, a seeded random drop, and grid pooling before the projector.

Controls are not methods from a paper; they bound what a method must beat. `random` drops image tokens the way
FastV does (before layer K, a fraction R, original position ids kept) but picks them uniformly at random;
`downsample` pools the patch grid before the projector, the simplest pre-LLM reduction.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from harness.engine import Context, VisionFeatures
from harness.method import Method, ModelInfo, register
from harness.state import TokenState


@register("none", aliases=("baseline",))
class NoReduction(Method):
    """The unpruned model."""

    stage = "control"
    reduces_tokens = False
    citation = "unpruned baseline"
    keep_all = {}

    def image_schedule(self, info: ModelInfo) -> list[int]:
        return [info.n_image_tokens] * info.n_layers


@register("random")
class RandomDrop(Method):
    """Drop a seeded random subset of image tokens before layer k, keeping original position ids.

    Args:
        k: decoder layer before which tokens are dropped (0 = before the first layer), like FastV's K.
        ratio: fraction of image tokens dropped, like FastV's R (0 keeps all).
        seed: seed of the random choice, combined with the sample so each image gets its own subset.
    """

    stage = "control"
    position_policy = "original"  # as FastV
    citation = "random-drop control (FastV-style K and R)"
    keep_all = {"ratio": 0.0}
    budget_params = ("ratio",)

    def __init__(self, k: int = 2, ratio: float = 0.5, seed: int = 0):
        if k < 0:
            raise ValueError(f"random: k must be >= 0, got {k}")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"random: ratio is the fraction dropped and must be in [0, 1), got {ratio}")
        self.k, self.ratio, self.seed = k, ratio, seed

    def bind(self, info: ModelInfo) -> None:
        if self.k >= info.n_layers:
            raise ValueError(f"random: k={self.k} is beyond the model's {info.n_layers} layers; "
                             f"use 0..{info.n_layers - 1}")

    def keep_count(self, n: int) -> int:
        return n - round(self.ratio * n)

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        if i != self.k:
            return state
        img = state.image_rows
        keep = torch.randperm(len(img), generator=ctx.rng)[: self.keep_count(len(img))].to(img.device)
        return state.keep_image(img[keep])

    def image_schedule(self, info: ModelInfo) -> list[int]:
        n = info.n_image_tokens
        return [n] * self.k + [self.keep_count(n)] * (info.n_layers - self.k)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> RandomDrop:
        """FastV's mapping: K kept (lowered only when K full layers leave no token, unless given), R from the keep
        count that makes N_avg = (K N + (L - K) keep) / L closest to the target."""
        n, layers = info.n_image_tokens, info.n_layers
        k = fixed.get("k", 2)
        while "k" not in fixed and k > 1 and (n_avg * layers - k * n) / (layers - k) < 1:
            k -= 1
        if not 0 < k < layers:
            raise ValueError(f"random: k={k} does not fit the model's {layers} layers; use 1..{layers - 1}")
        keep = max(1, min(n, round((n_avg * layers - k * n) / (layers - k))))
        return cls(**{**fixed, "k": k, "ratio": 1 - keep / n})


@register("downsample")
class Downsample(Method):
    """Pool the patch grid before the projector (stride x stride windows, edges padded by ceil mode).

    Args:
        stride: pooling window and stride on the patch grid (1 keeps all tokens).
        mode: average or max pooling.
    """

    stage = "control"
    position_policy = "reindex"  # pooled tokens as a shorter image block, contiguous ids
    citation = "grid-pooling control"
    keep_all = {"stride": 1}
    budget_params = ("stride",)

    def __init__(self, stride: int = 2, mode: Literal["avg", "max"] = "avg"):
        if stride < 1:
            raise ValueError(f"downsample: stride must be >= 1, got {stride}")
        self.stride, self.mode = stride, mode

    def bind(self, info: ModelInfo) -> None:
        if self.stride > min(info.grid):
            raise ValueError(f"downsample: stride={self.stride} exceeds the {info.grid[0]}x{info.grid[1]} patch grid")

    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        if self.stride == 1:
            return feats
        h, w = feats.grid
        s = self.stride
        x = feats.patches.transpose(1, 2).reshape(1, -1, h, w)  # (1, Dv, h, w)
        pool = F.avg_pool2d if self.mode == "avg" else F.max_pool2d
        y = pool(x, s, s, ceil_mode=True)  # (1, Dv, h', w')
        hh, ww = y.shape[-2:]
        codes = []  # each pooled token stands for the patches of its window (equal weights; max: per channel)
        for r in range(hh):
            for c in range(ww):
                window = [y0 * w + x0 for y0 in range(r * s, min(h, r * s + s))
                          for x0 in range(c * s, min(w, c * s + s))]
                codes.append(ctx.ledger.merged_token(window, [1.0] * len(window)) if len(window) > 1 else window[0])
        index = torch.tensor(codes, dtype=torch.long, device=x.device)
        return VisionFeatures(patches=y.flatten(2).transpose(1, 2), patch_index=index, grid=feats.grid,
                              cls=feats.cls, layer_input=feats.layer_input, layer=feats.layer, tower=feats.tower)

    def image_schedule(self, info: ModelInfo) -> list[int]:
        h, w = info.grid
        return [-(-h // self.stride) * -(-w // self.stride)] * info.n_layers

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> Downsample:
        """The stride whose pooled grid is closest to the target (strides are discrete: few budgets are reachable
        within the tolerance)."""
        best = min(range(1, min(info.grid) + 1),
                   key=lambda s: abs(cls(stride=s).image_schedule(info)[0] - n_avg))
        return cls(**{**fixed, "stride": best})

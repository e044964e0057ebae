"""Four small methods, one per capability of the contract, registered for the shared battery.

Each has a keep-everything setting and an independent reference in `tests/reference.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.engine import Context, VisionFeatures
from harness.method import Method, ModelInfo, register
from harness.state import TokenState


@register("test-replace")
class ReplacePatches(Method):
    """Replace the patches before the projector by every `every`-th patch, each averaged with its right neighbour.

    Args:
        every: keep every n-th patch (1 keeps all, unchanged).
    """

    stage = "pre-llm"
    position_policy = "original"  # GAP's unpruned positions: the contract tests check both policies
    citation = "contract test: replace tokens before the projector"
    keep_all = {"every": 1}

    def __init__(self, every: int = 3):
        if every < 1:
            raise ValueError(f"test-replace: every must be >= 1, got {every}")
        self.every = every

    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        if self.every == 1:
            return feats
        idx = torch.arange(0, feats.patches.shape[1], self.every, device=feats.patches.device)
        nxt = (idx + 1).clamp(max=feats.patches.shape[1] - 1)
        patches = (feats.patches[:, idx] + feats.patches[:, nxt]) / 2
        return VisionFeatures(patches=patches, patch_index=feats.patch_index[idx], grid=feats.grid, cls=feats.cls,
                              layer_input=feats.layer_input, layer=feats.layer, tower=feats.tower)


@register("test-drop")
class DropAtK(Method):
    """Drop image tokens before layer k, keeping those the last token attends to most at layer k-1 (FastV-like).

    Args:
        k: layer before which tokens are dropped (>= 1).
        keep: image tokens kept (-1 keeps all).
    """

    stage = "in-llm"
    position_policy = "original"
    needs_llm_attention = True
    citation = "contract test: drop image tokens before layer K"
    keep_all = {"keep": -1}

    def __init__(self, k: int = 2, keep: int = 40):
        if k < 1:
            raise ValueError(f"test-drop: k must be >= 1, got {k}")
        self.k, self.keep = k, keep

    def bind(self, info: ModelInfo) -> None:
        if self.k >= info.n_layers:
            raise ValueError(f"test-drop: k={self.k} is beyond the model's {info.n_layers} layers")

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        if self.keep < 0:
            return state
        if i == self.k - 1:
            last = torch.tensor([len(state) - 1], device=state.hidden.device)
            ctx.scratch["scores"] = ctx.attention_rows(i, state, last)[0, state.image_rows]
        if i == self.k:
            img = state.image_rows
            top = ctx.scratch.pop("scores").topk(min(self.keep, len(img))).indices
            return state.keep_image(img[top])
        return state


@register("test-drop-reindex")
class DropAtKReindex(DropAtK):
    """DropAtK with PyramidDrop-style positions: rows are renumbered 0..n-1 after the drop."""

    position_policy = "reindex"
    citation = "contract test: drop with re-indexed positions"


@register("test-hold")
class HoldBack(Method):
    """Hold the image tokens with odd patch index back before layer 0 and re-insert them before layer `at`.

    Args:
        at: layer before which the held tokens come back (0 holds nothing).
    """

    stage = "multi-stage"
    position_policy = "original"
    citation = "contract test: hold image tokens back and re-insert them"
    keep_all = {"at": 0}

    def __init__(self, at: int = 3):
        if at < 0:
            raise ValueError(f"test-hold: at must be >= 0, got {at}")
        self.at = at

    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        if self.at == 0:
            return state
        img = state.image_rows
        return state.hold("odd", img[state.patch[img] % 2 == 1])

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        return state.release("odd") if i == self.at and "odd" in state.held else state


class LowRank(nn.Module):
    """A fixed, seeded light FFN path: d -> r -> d."""

    def __init__(self, d: int, r: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.down = nn.Parameter(torch.randn(d, r, generator=g) / d**0.5, requires_grad=False)
        self.up = nn.Parameter(torch.randn(r, d, generator=g) / r**0.5, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.down) @ self.up


@register("test-ffn")
class LightFFN(Method):
    """Send image tokens with even patch index through a low-rank FFN instead of the stock MLP.

    Args:
        rank: rank of the light path (0 sends every token through the stock MLP).
    """

    stage = "in-llm"
    reduces_tokens = False
    citation = "contract test: a different FFN path for a subset of tokens"
    keep_all = {"rank": 0}
    exact_reference = False  # changes the FFN, not the token set: checked against hooked stock layers instead

    def __init__(self, rank: int = 8):
        if rank < 0:
            raise ValueError(f"test-ffn: rank must be >= 0, got {rank}")
        self.rank = rank
        self._paths: dict[int, LowRank] = {}

    def subset(self, state: TokenState) -> Tensor:
        img = state.image_rows
        return img[state.patch[img] % 2 == 0]

    def path(self, d: int) -> LowRank:
        if d not in self._paths:
            self._paths[d] = LowRank(d, self.rank)
        return self._paths[d]

    def ffn(self, i: int, mlp: nn.Module, x: Tensor, state: TokenState, ctx: Context) -> Tensor:
        if self.rank == 0:
            return mlp(x)
        light = self.subset(state)
        full = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        full[light] = False
        out = torch.empty_like(x)
        out[:, full] = mlp(x[:, full])
        out[:, light] = self.path(x.shape[-1]).to(x)(x[:, light])
        d = x.shape[-1]
        ctx.record.n_ffn = int(full.sum())
        ctx.record.light += [(len(light), d, self.rank), (len(light), self.rank, d)]
        return out

"""FastV: drop the image tokens the last token attends to least, once, after layer K-1.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024 (github.com/pkunlp-icler/FastV). Follows the
official in-place / HF code (reference notes, section 1): the score of an image token is the head-mean attention it
receives from the last token of the sequence in layer K-1 (softmax over all keys, causal), the top
round(N (1 - R)) image tokens are kept, all text stays, and kept tokens keep their original position ids.
"""

from __future__ import annotations

from typing import Literal

import torch

from harness.engine import Context
from harness.method import Method, ModelInfo, register
from harness.state import Kind, TokenState


def score_row(state: TokenState, which: str) -> int:
    """Row of the query token whose attention ranks the image tokens.

    "last": the last token of the sequence (FastV's code); "seg": the token that predicts [SEG] (LISA's [SEG]
    embedding source); "instruction": the last token of the prompt before the answer (PyramidDrop's "last
    instruction token"; in LISA's template the answer starts with [SEG], so it is the same row as "seg").
    """
    if which == "last":
        return len(state) - 1
    if which == "seg":
        return state.seg_source_row
    answer = ((state.kind == Kind.SEG) | (state.kind == Kind.ANSWER)).nonzero()
    return (int(answer[0, 0]) if answer.numel() else len(state)) - 1


def top_image_rows(scores: torch.Tensor, image_rows: torch.Tensor, keep: int) -> torch.Tensor:
    """Rows of the `keep` best-scored image tokens (ties broken toward the earlier token, as topk on CPU/CUDA)."""
    return image_rows[scores.topk(keep).indices]


@register("fastv")
class FastV(Method):
    """FastV: after layer K-1, keep the image tokens that the last token attends to most.

    Official defaults K=2, R=0.5 (paper headline). K=0 keeps a random subset (the official code has no attention
    before layer 0). Scores are recomputed for the one query row from layer K-1's input (input_layernorm, q/k, RoPE
    at the current positions, softmax over all keys, head mean), which equals the eager attention FastV reads,
    so the model keeps its fused attention backend.

    Budget mapping: keeps K (default 2) and solves the keep count from N_avg = (K N + (L - K) keep) / L; when K full
    layers leave less than one token for the rest, K is lowered to the largest value that reaches it.

    Args:
        k: FastV's K: tokens are dropped before decoder layer k, ranked by layer k-1's attention.
        ratio: FastV's R: the fraction of image tokens dropped (0 keeps all); ignored when `keep` is given.
        keep: keep exactly this many image tokens instead of using `ratio`.
        score: query row that ranks the image tokens: "last" (the last token, FastV) or "seg" (the token that
            predicts [SEG], LISA's mask source).
        seed: seed of the random subset when k=0.
    """

    stage = "in-llm"
    position_policy = "original"
    needs_llm_attention = True
    citation = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024"
    keep_all = {"ratio": 0.0}

    def __init__(self, k: int = 2, ratio: float | None = 0.5, keep: int | None = None,
                 score: Literal["last", "seg"] = "last", seed: int = 0):
        if k < 0:
            raise ValueError(f"fastv: k must be >= 0, got {k}")
        if keep is None and (ratio is None or not 0.0 <= ratio < 1.0):
            raise ValueError(f"fastv: ratio is the fraction dropped and must be in [0, 1), got {ratio}")
        if keep is not None and keep < 1:
            raise ValueError(f"fastv: keep must be >= 1 image token, got {keep}")
        self.k, self.ratio, self.keep, self.score, self.seed = k, None if keep is not None else ratio, keep, score, seed

    def bind(self, info: ModelInfo) -> None:
        if self.k >= info.n_layers:
            raise ValueError(f"fastv: k={self.k} is beyond the model's {info.n_layers} layers; "
                             f"use 0..{info.n_layers - 1}")
        if self.keep is not None and self.keep > info.n_image_tokens:
            raise ValueError(f"fastv: keep={self.keep} exceeds the model's {info.n_image_tokens} image tokens")

    def keep_count(self, n: int) -> int:
        return min(self.keep, n) if self.keep is not None else round(n * (1 - self.ratio))

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        if i == self.k - 1:
            ctx.scratch["fastv_input"] = state  # layer K-1's input: its attention ranks the tokens
        if i != self.k:
            return state
        img = state.image_rows
        keep = self.keep_count(len(img))
        if keep >= len(img):
            return state
        if self.k == 0:
            rows = img[torch.randperm(len(img), generator=ctx.rng)[:keep].to(img.device)]
        else:
            prev = ctx.scratch.pop("fastv_input")
            q = score_row(prev, self.score)
            probs = ctx.attention_rows(self.k - 1, prev, torch.tensor([q], device=img.device))[0]
            rows = top_image_rows(probs[prev.image_rows], img, keep)  # rows are unchanged before layer K
        return state.keep_image(rows)

    def image_schedule(self, info: ModelInfo) -> list[int]:
        n = info.n_image_tokens
        return [n] * self.k + [self.keep_count(n)] * (info.n_layers - self.k)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> FastV:
        k, keep = one_drop_budget(cls.name, info, n_avg, fixed.get("k", 2), lower_k="k" not in fixed)
        return cls(**{**fixed, "k": k, "keep": keep, "ratio": None})


def one_drop_budget(name: str, info: ModelInfo, n_avg: float, k: int, lower_k: bool = True) -> tuple[int, int]:
    """(K, keep count) of a single drop before layer K that make N_avg = (K N + (L - K) keep) / L closest to the
    target; unless K was fixed by the user, K is lowered (not below 1) when K full layers alone exceed it."""
    n, layers = info.n_image_tokens, info.n_layers
    while lower_k and k > 1 and (n_avg * layers - k * n) / (layers - k) < 1:  # K full layers leave no token
        k -= 1
    if k >= layers:
        raise ValueError(f"{name}: k={k} is beyond the model's {layers} layers")
    keep = round((n_avg * layers - k * n) / (layers - k))
    if keep < 1:
        raise ValueError(f"{name}: N_avg {n_avg:.1f} is out of reach on {layers} layers: the {k} full layer(s) "
                         f"before the drop already average {k * n / layers:.1f} image tokens")
    return k, min(keep, n)

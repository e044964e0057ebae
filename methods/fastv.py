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
from harness.state import TokenState


@register("fastv")
class FastV(Method):
    """FastV: after layer K-1, keep the image tokens that the last token attends to most.

    Official defaults K=2, R=0.5 (paper headline). K=0 keeps a random subset (the official code has no attention
    before layer 0). Scores are recomputed for the one query row from layer K-1's input (input_layernorm, q/k, RoPE
    at the current positions, softmax over all keys, head mean), so the model keeps its fused attention backend.
    In fp32 this equals the eager attention FastV reads; in bf16 or fp16 the scores stay fp32, where the official
    code rounds the probabilities to the model dtype before the head mean (an independent review measured at most
    one kept token differing in bf16).

    Budget mapping: keeps K (default 2) and solves the keep count from N_avg = (K N + (L - K) keep) / L; when K full
    layers leave less than one token for the rest, K is lowered to the largest value that reaches it.

    Args:
        k: FastV's K: tokens are dropped before decoder layer k, ranked by layer k-1's attention.
        ratio: FastV's R: the fraction of image tokens dropped (0 keeps all); ignored when `keep` is given.
        keep: keep exactly this many image tokens instead of using `ratio`.
        score: query row that ranks the image tokens: "last" (the last token, FastV) or "seg" (the token that
            predicts [SEG], LISA's mask source; in generate mode's prefill, the prompt's last token).
        seed: seed of the random subset when k=0.
    """

    stage = "in-llm"
    position_policy = "original"
    needs_llm_attention = True
    citation = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024"
    keep_all = {"ratio": 0.0}
    budget_params = ("ratio", "keep")
    deviations = ("score=last is the last token of the sequence, as in the official code; in LISA's template mode "
                  "that sequence ends with the teacher-forced answer '[SEG].</s>', so the row is </s> (in generate "
                  "mode's prefill it is the last prompt token); score=seg ranks with the [SEG]-predicting token; "
                  "scores are fp32 in every model dtype (official: probabilities rounded to the model dtype before "
                  "the head mean; in bf16 at most one kept token differed)")

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
        return min(self.keep, n) if self.keep is not None else round(n * (1 - self.ratio))  # official HF: round

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        if i == self.k - 1:
            ctx.scratch["fastv_input"] = state  # layer K-1's input: its attention ranks the tokens
        if i != self.k:
            return state
        img = state.image_rows
        keep = self.keep_count(len(img))
        if keep >= len(img):
            return state
        if self.k == 0:  # no attention before layer 0: the official code keeps a random subset
            return state.keep_image(img[torch.randperm(len(img), generator=ctx.rng)[:keep].to(img.device)])
        prev = ctx.scratch.pop("fastv_input")
        q = len(prev) - 1 if self.score == "last" else prev.last_prompt_row  # predicts [SEG], in both modes
        probs = ctx.attention_rows(self.k - 1, prev, torch.tensor([q], device=img.device))[0]  # (n,) head mean
        return state.keep_image(img[probs[prev.image_rows].topk(keep).indices])  # rows unchanged since K-1

    def image_schedule(self, info: ModelInfo) -> list[int]:
        n = info.n_image_tokens
        return [n] * self.k + [self.keep_count(n)] * (info.n_layers - self.k)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> FastV:
        # N_avg = (K N + (L - K) keep) / L (LVLM_CSP eq. 9 for one drop)
        n, layers = info.n_image_tokens, info.n_layers
        k = fixed.get("k", 2)
        while "k" not in fixed and k > 1 and (n_avg * layers - k * n) / (layers - k) < 1:
            k -= 1  # K full layers leave less than one token for the rest
        if not 0 < k < layers:
            raise ValueError(f"fastv: k={k} does not fit the model's {layers} layers; use 1..{layers - 1}")
        keep = round((n_avg * layers - k * n) / (layers - k))
        if keep < 1:
            lowest = (k * n + layers - k) / layers
            raise ValueError(f"fastv: N_avg {n_avg:.1f} is out of reach with k={k} on {layers} layers (the lowest is "
                             f"{lowest:.1f}, {1 - lowest / n:.0%} reduction); ask for less or lower k")
        return cls(**{**fixed, "k": k, "keep": min(keep, n), "ratio": None})

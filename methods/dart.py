"""DART: keep the image tokens least duplicated by a few pivot tokens, once, before decoder layer K.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More", EMNLP 2025
(github.com/ZichenWen1/DART; reference notes `methods-2025.md` section 1). No attention map: after layer K-1, the
pivots are the 4 image tokens and the 4 tokens after the image with the largest L1 norm of layer K-1's post-RoPE
keys; each pivot in turn takes the t image tokens least cosine-similar to it (on layer K-1's output under the LLM's
final RMSNorm) out of the pool of candidates. The image pivots and every pick are kept (4 + 8 t tokens), in raster
order, with their original position ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harness.engine import Context
from harness.method import Method, ModelInfo, register
from harness.state import TokenState


def post_rope_keys(ctx: Context, layer: int, state: TokenState) -> torch.Tensor:
    """(n, H_kv * head_dim) keys of decoder layer `layer` after RoPE, recomputed from its input `state` (what the
    official code reads from the layer's outputs; with GQA it uses the repeated keys, whose L1 norms are the same up
    to the group size, so the ranking is the same)."""
    lm = ctx.model.language_model
    attn = lm.layers[layer].self_attn
    hd, n = attn.head_dim, len(state)
    with ctx.overhead():
        x = lm.layers[layer].input_layernorm(state.hidden)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)  # (1, H_kv, n, hd)
        cos, sin = lm.rotary_emb(x, ctx.positions(state)[None])
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    ctx.ledger.add_method_matmul(n, x.shape[-1], k.shape[1] * hd)
    return k[0].transpose(0, 1).reshape(n, -1)


@register("dart")
class DART(Method):
    """DART: before layer k, keep the image pivots and the tokens least duplicated by each pivot.

    Official defaults (scripts/v1_5): K=2, 4 image and 4 text pivots, `max_num_trunction` M=128; the README's
    `0.778 128` (the ratio is unused when M is given). Each pivot takes t = floor(M / 8) tokens, so the official code
    keeps 4 + 8 t image tokens: 132 for M=128 (68 for 64, 196 for 192). This overshoot is kept, because it is what
    the published numbers ran with; the budget mapping counts the tokens actually kept.

    Faithful to the official selection in every detail that decides the kept set: text pivots among every token
    after the image (in LISA's template mode that includes the teacher-forced answer "[SEG].</s>", as FastV's last
    token does; in generate mode's prefill the prompt only); pivots visited in CPython set order of their sequence
    positions (`list(set(image_pivots + text_pivots))`, which the greedy pool makes matter); candidates in set order
    of the remaining image positions; each pick leaves the pool.

    Budget mapping: keeps K (default 2) and solves t from N_avg = (K N + (L - K)(4 + 8 t)) / L, rounded; when K full
    layers leave no room K is lowered (to 1 at least: DART reads layer K-1). The kept count moves in steps of 8, so
    N_avg in steps of 8 (L - K) / L.

    Args:
        k: DART's K (`--pruned_layer`): tokens are dropped before decoder layer k, chosen from layer k-1 (>= 1).
        truncation: the official `max_num_trunction` M; each pivot takes floor(M / (pivot_image + pivot_text)).
        pivot_image: image pivots (`--pivot_image_token`), kept themselves.
        pivot_text: text pivots (`--pivot_text_token`), among the tokens after the image; not kept as image tokens.
    """

    stage = "in-llm"
    position_policy = "original"
    citation = ("Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More "
                "(DART), EMNLP 2025 (github.com/ZichenWen1/DART)")
    keep_all = None  # 4 + 8 t kept tokens: no setting keeps exactly every token of every model
    budget_params = ("truncation",)
    deviations = ("in LISA's template mode the tokens after the image, where the text pivots are chosen, include the "
                  "teacher-forced answer '[SEG].</s>' (generate mode's prefill: the prompt only, as in the official "
                  "generation); keys recomputed from layer K-1's input (k_proj, RoPE) and counted as method work, "
                  "where the official code returns them from the patched layer; cosine similarities in fp32 "
                  "(official: the model's fp16); a pool too small for the picks, or fewer tokens after the image "
                  "than text pivots, is refused up front or with a message (the official topk raises)")

    def __init__(self, k: int = 2, truncation: int = 128, pivot_image: int = 4, pivot_text: int = 4):
        if k < 1:
            raise ValueError(f"dart: k must be >= 1 (DART chooses from layer k-1's outputs), got {k}")
        if truncation < 0:
            raise ValueError(f"dart: truncation must be >= 0, got {truncation}")
        if pivot_image < 1 or pivot_text < 0:
            raise ValueError(f"dart: needs pivot_image >= 1 and pivot_text >= 0, got {pivot_image}, {pivot_text}")
        self.k, self.truncation, self.pivot_image, self.pivot_text = k, truncation, pivot_image, pivot_text

    @property
    def picks(self) -> int:
        """t: tokens each pivot takes (official TOKEN_TOPK = ceil(M // (P_img + P_txt)), a floor)."""
        return self.truncation // (self.pivot_image + self.pivot_text)

    def keep_count(self) -> int:
        return self.pivot_image + (self.pivot_image + self.pivot_text) * self.picks

    def bind(self, info: ModelInfo) -> None:
        if self.k >= info.n_layers:
            raise ValueError(f"dart: k={self.k} is beyond the model's {info.n_layers} layers; "
                             f"use 1..{info.n_layers - 1}")
        if self.keep_count() > info.n_image_tokens:
            raise ValueError(f"dart: {self.pivot_image} + {self.pivot_image + self.pivot_text} x {self.picks} = "
                             f"{self.keep_count()} tokens exceed the model's {info.n_image_tokens} image tokens; lower "
                             f"truncation")

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        if i == self.k - 1:
            ctx.scratch["dart_input"] = state  # layer K-1's input: its keys choose the pivots
        if i != self.k:
            return state
        prev = ctx.scratch.pop("dart_input")
        img = state.image_rows  # rows unchanged since layer K-1
        s, n = int(img[0]), len(img)
        keys = post_rope_keys(ctx, self.k - 1, prev)
        lm = ctx.model.language_model
        with ctx.overhead():
            h = F.normalize(lm.norm(state.hidden[0]).float(), dim=-1)  # (L, d) layer K-1's output, final RMSNorm
            norms = keys.float().abs().sum(-1)  # (L,) L1 norm of each key row
            image_pivots = (norms[s:s + n].topk(self.pivot_image).indices + s).tolist()
            after = norms[s + n:]
            if len(after) < self.pivot_text:
                raise ValueError(f"dart: pivot_text={self.pivot_text} but only {len(after)} tokens follow the image; "
                                 f"lower pivot_text")
            text_pivots = (after.topk(self.pivot_text).indices + s + n).tolist()
            chosen = set(image_pivots + text_pivots)  # the official visiting order: CPython set order
            pool = set(range(s, s + n)) - set(image_pivots)
            candidates = list(pool)
            for pivot in list(chosen):
                sim = h[pivot][None] @ h[candidates].T  # (1, |pool|) cosine similarities
                picked = [candidates[j] for j in (-sim[0]).topk(self.picks).indices.tolist()]
                ctx.ledger.add_method_matmul(1, h.shape[1], len(candidates))
                chosen.update(picked)
                pool.difference_update(picked)
                candidates = list(pool)
            chosen.difference_update(text_pivots)
        return state.keep_image(torch.tensor(sorted(chosen), device=img.device))

    def image_schedule(self, info: ModelInfo) -> list[int]:
        n = info.n_image_tokens
        return [n] * self.k + [self.keep_count()] * (info.n_layers - self.k)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> DART:
        n, layers = info.n_image_tokens, info.n_layers
        p_img, p_txt = fixed.get("pivot_image", 4), fixed.get("pivot_text", 4)
        k = fixed.get("k", 2)
        while "k" not in fixed and k > 1 and (n_avg * layers - k * n) / (layers - k) < p_img:
            k -= 1  # K full layers leave less than the image pivots for the rest
        if not 0 < k < layers:
            raise ValueError(f"dart: k={k} does not fit the model's {layers} layers; use 1..{layers - 1}")
        keep = (n_avg * layers - k * n) / (layers - k)
        t = max(0, min(round((keep - p_img) / (p_img + p_txt)), (n - p_img) // (p_img + p_txt)))
        return cls(**{**fixed, "k": k, "truncation": t * (p_img + p_txt)})

"""Per-sample record of the work done, from which every FLOPs figure is computed (see `harness.flops`).

The loop appends one `LayerRecord` per decoder layer (`generate` mode keeps its decode steps apart); the vision
tower, projector and SAM record their token counts; methods record their own extra matmuls (scoring work) as
`method` overhead. FLOPs are therefore exact for data-dependent budgets (adaptive token counts, per-image
superpixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerRecord:
    """One decoder layer.

    Attributes:
        n: tokens in the layer (attention queries and keys).
        n_image: image tokens among them.
        n_ffn: tokens through the stock FFN (n unless a method routes some tokens elsewhere).
        light: extra matmuls of a lighter FFN path, as (rows, in_dim, out_dim).
        patches: vision-patch code of each image token in the layer (the trace of where tokens went): the patch
            index (row-major) for a token that is one patch, -1 for one that stands for none (CLIP's CLS), and a
            code <= -2 for a merged token, whose patches and weights are `Ledger.members[code]`.
        kv: keys each of the `n` queries attends to, for a decode step against the KV cache (None: the layer's own
            `n` tokens, causal, counted over the full n x n matrix).
        routed: tokens a proxy-guided FFN (Token Routing) updated through its light path, and `routed_dims` that
            path's d_p + d_g: what Token Routing's own FLOPs formula counts for them, 4 routed D (d_p + d_g) (the
            `routing` convention; `light` holds the exact matmuls).
    """

    n: int
    n_image: int
    n_ffn: int
    light: list[tuple[int, int, int]] = field(default_factory=list)
    patches: list[int] = field(default_factory=list)
    kv: int | None = None
    routed: int = 0
    routed_dims: int = 0


@dataclass
class Ledger:
    vision_tokens: int = 0  # tokens through the vision tower (patches + CLS)
    vision_layers: int = 0  # encoder layers run
    projector_tokens: int = 0
    layers: list[LayerRecord] = field(default_factory=list)
    method: list[tuple[int, int, int]] = field(default_factory=list)  # method matmuls as (m, k, n)
    method_flops: int = 0  # FLOPs of whole models a method runs (LVLM_CSP's YOLO-seg), counted by `harness.flops`
    seg_prompts: int = 0  # [SEG] embeddings decoded by SAM
    sam_images: int = 0  # images through the SAM image encoder
    decode_layers: list[LayerRecord] = field(default_factory=list)  # generate mode: one per decode step and layer
    lm_head_rows: int = 0  # generate mode: rows through lm_head (one per generated token)
    members: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # merged token code -> (patch, weight)

    def merged_token(self, patches: list[int], weights: list[float]) -> int:
        """A code (<= -2) for an image token made from several patches: a merged, pooled or recycled token.

        Args:
            patches: the vision patches it was made from.
            weights: each patch's weight in the sum that made it (the token is sum_p w_p x_p, up to a common
                factor); recall and `viz` read a patch's share as w_p / sum(w).
        """
        code = -2 - len(self.members)
        self.members[code] = [(int(p), float(w)) for p, w in zip(patches, weights, strict=True)]
        return code

    def add_method_matmul(self, m: int, k: int, n: int, times: int = 1) -> None:
        """Record `times` matmuls of an (m, k) by (k, n) product done by a method (scoring, merging)."""
        self.method.extend([(int(m), int(k), int(n))] * int(times))

    @property
    def image_tokens_per_layer(self) -> list[int]:
        return [r.n_image for r in self.layers]

    @property
    def tokens_per_layer(self) -> list[int]:
        return [r.n for r in self.layers]

    @property
    def n_avg(self) -> float:
        """Average image tokens per LLM layer (LVLM_CSP eq. 9)."""
        return sum(self.image_tokens_per_layer) / max(len(self.layers), 1)


def patch_shares(code: int, members: dict[int, list[tuple[int, float]]]) -> dict[int, float]:
    """How much of each vision patch one image token carries: {p: 1} for the single patch p, w_p / sum(w) for each
    patch of a merged token (`Ledger.merged_token`), nothing for a token that stands for no patch (-1, CLS)."""
    if code >= 0:
        return {code: 1.0}
    pairs = members.get(code, [])
    total = sum(w for _, w in pairs)
    out: dict[int, float] = {}
    for patch, w in pairs if total > 0 else []:
        out[patch] = out.get(patch, 0.0) + w / total
    return out

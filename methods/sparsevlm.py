"""SparseVLM: text-guided pruning of image tokens inside the LLM, with recycling of the pruned ones.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025
(github.com/Gumpest/SparseVLMs, https://arxiv.org/abs/2410.04417). Follows the v1.0 default (`USE_VERSION=1_0`) of
`modelling_sparse_llama.py`, `score.py` and `utils.py` (reference notes, section 8.1):

1. text raters, once, on the LLM input embeddings: image tokens V (m, d) and the prompt's tokens after the image
   T (t, d);
   score = mean over V of softmax over T of V T^T; raters = the text tokens scoring above the mean score;
2. at each pruning layer (0-based [2, 6, 15] of 32) the layer runs on all tokens; the head-mean softmax attention of
   that layer (rows: raters, columns: the current image tokens), averaged over the raters, is each image token's
   relevance; the layer's output keeps the top-k image tokens (k from the RETAIN_TOKN schedules);
3. recycling: the top int(0.3 p) + 1 of the p pruned tokens by relevance are clustered with DPC-kNN
   (int(n / 10) + 1 clusters), each cluster is averaged and the merged tokens go right after the kept image tokens;
4. position ids are re-indexed 0..n-1 after every drop.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from harness.engine import Context
from harness.ledger import Ledger, patch_shares
from harness.method import BUDGET_TOLERANCE, Method, ModelInfo, achieved_n_avg, register, scale_layers
from harness.state import Kind, TokenState

OFFICIAL_LAYERS = (2, 6, 15)  # `pruning_loc` of LLaVA-1.5-7B's 32 layers (0-based)
OFFICIAL_TOKENS = 576  # LLaVA-1.5's image tokens, which the official schedules are given for
SCHEDULES = {  # RETAIN_TOKN -> image tokens kept after each pruning layer (score.py, v1.0)
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
RECYCLE_FRACTION = 0.3  # the top 30% (+1) of the pruned tokens are recycled (modelling_sparse_llama.py)


def scale_pruning_layers(n_layers: int) -> list[int]:
    """The official pruning layers scaled so that each stage keeps its official share of the depth.

    A pruning layer's *output* is pruned, so the stage boundaries (the first layer at each smaller count) are p + 1:
    3, 7 and 16 of 32, i.e. stages of 3, 4, 9 and 16 layers. The boundaries are scaled (`scale_layers`:
    round(b L / 32), strictly increasing) and the pruning layers are the layers before them: 8 layers ->
    boundaries [1, 2, 4], pruning layers [0, 1, 3] (stages of 1, 1, 2 and 4 layers); 32 -> [2, 6, 15]; 40 ->
    [3, 8, 19].
    """
    return [b - 1 for b in scale_layers([p + 1 for p in OFFICIAL_LAYERS], n_layers)]


def recycled_count(pruned: int) -> tuple[int, int]:
    """(candidates, clusters) for `pruned` dropped tokens: int(0.3 p) + 1 candidates, int(n / 10) + 1 clusters."""
    candidates = int(pruned * RECYCLE_FRACTION) + 1
    return candidates, int(candidates / 10) + 1


def text_raters(state: TokenState, ledger: Ledger | None = None) -> Tensor:
    """Offsets (within the prompt tokens after the image) of SparseVLM's text raters, from the LLM input embeddings.

    Args:
        state: the assembled sequence before layer 0 (hidden = input embeddings).
        ledger: where the scoring matmul is recorded (None: not recorded).

    Returns:
        (r,) sorted offsets of the raters among the rows after the last image row.
    """
    img = state.image_rows
    v = state.hidden[0, img].float()  # (m, d)
    # (t, d) the prompt after the image: what the official prefill holds (not the teacher-forced answer)
    t = state.hidden[0, int(img[-1]) + 1:state.last_prompt_row + 1].float()
    if ledger is not None:
        ledger.add_method_matmul(len(v), v.shape[1], len(t))
    score = (v @ t.T).softmax(-1).mean(0)  # (t,) softmax over text, mean over image tokens (no scaling, as official)
    raters = (score > score.mean()).nonzero().squeeze(1)
    if raters.numel() == 0:  # all scores equal (e.g. one text token): the official code would average no rows (NaN)
        raters = torch.arange(len(t), device=t.device)
    return raters


def cluster_and_merge(x: Tensor, n_clusters: int, ledger: Ledger | None = None) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of `x`, each cluster averaged (official `cluster_and_merge`, after TCFormer's DPC-kNN).

    distance = L2 / sqrt(C); density = exp(-mean of the squared distances to the n_clusters nearest tokens (itself
    included)); delta = distance to the nearest denser token (the largest distance for the densest); centres = top
    n_clusters by density x delta, in that order; every token joins its nearest centre, a centre joins itself.

    Args:
        x: (m, C) tokens, m >= n_clusters.
        n_clusters: number of clusters (also the neighbourhood size of the density, as in the official code).
        ledger: where the distance matmul is recorded (None: not recorded).

    Returns:
        (n_clusters, C) the mean of each cluster, in centre order, in fp32; (m,) the cluster of each token.
    """
    m, c = x.shape
    x = x.float()
    sq = (x * x).sum(-1)  # (m,)
    if ledger is not None:
        ledger.add_method_matmul(m, c, m)
    dist = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0).sqrt() / c ** 0.5  # (m, m) L2 / sqrt(C)
    dist.fill_diagonal_(0)
    nearest = dist.topk(n_clusters, dim=-1, largest=False).values  # (m, k) includes the token itself
    density = (-(nearest ** 2).mean(-1)).exp()  # (m,)
    denser = density[None, :] > density[:, None]  # (m, m): column j is denser than row i
    delta = dist.masked_fill(~denser, float(dist.max())).min(-1).values  # (m,)
    centres = (delta * density).topk(n_clusters).indices  # (k,) by score, descending
    assign = dist[centres].argmin(0)  # (m,) nearest centre of every token
    assign[centres] = torch.arange(n_clusters, device=x.device)
    total = x.new_zeros(n_clusters, c).index_add_(0, assign, x)  # (k, C)
    count = torch.bincount(assign, minlength=n_clusters).to(x.dtype)  # (k,) >= 1: each centre is in its cluster
    return total / count[:, None], assign


@register("sparsevlm")
class SparseVLM(Method):
    """SparseVLM v1.0: at three layers, keep the image tokens the text raters attend to most; recycle the pruned
    ones into a few merged tokens; positions re-indexed after each drop.

    Official defaults: pruning layers [2, 6, 15] of 32 (0-based; the layer runs on all tokens and its output is
    pruned, so layers 0..2 see all 576 tokens), RETAIN_TOKN 192 -> keep [300, 200, 110] of 576, recycling on. On a
    model that is not 32 layers deep each stage keeps its official share of the depth (`scale_pruning_layers`: the
    boundaries p + 1 scaled by round(b L / 32); 8 layers: [0, 1, 3]). On a model with N image tokens the keep
    counts of a schedule are scaled by round(k N / 576) (N = 256, retain 192: [133, 89, 49]). The number of merged
    tokens follows from the counts alone (int(0.3 p) + 1 candidates of the p pruned, int(n / 10) + 1 clusters), so
    the per-layer image-token schedule, merged tokens included, is known before the input is.

    Budget mapping: scales the retain-192 schedule's keep fractions by one factor s (keep_j = round(s N k_j / 576),
    clipped to 1..N; bisection on s) so that N_avg, counted as the ledger counts it (the pruning layer at its full
    size, merged tokens included when recycling is on), is closest to the target.

    Args:
        retain: RETAIN_TOKN, the official schedule (192, 128, 96 or 64 average tokens on LLaVA-1.5); ignored when
            `keep` is given.
        keep: image tokens kept after each pruning layer, one count per layer, not increasing (-1 keeps every image
            token at that layer); overrides `retain`.
        layers: the pruning layers (0-based; tokens are dropped from their output; null: [2, 6, 15] scaled to the
            model's depth, stage by stage).
        recycle: merge the best of the pruned tokens back in (v1.0); false drops them.
    """

    stage = "in-llm"
    position_policy = "reindex"
    needs_llm_attention = True
    exact_reference = False  # recycled tokens are new rows (means of pruned hidden states)
    citation = ("Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference, "
                "ICML 2025")
    keep_all = {"keep": [-1, -1, -1], "recycle": False}
    budget_params = ("retain", "keep")
    deviations = (
        "follows the official code's fixed schedules (RETAIN_TOKN -> keep counts at fixed layers), not the paper's "
        "rank-based adaptive count of tokens to keep; "
        "layers and keep counts are scaled to the model's depth (each stage its official share of the layers) and "
        "image-token count; a keep count >= the current "
        "image tokens keeps them all (the official top-k takes at most current - 1, so it always drops one); the "
        "official 1e-6 random noise on the DPC-kNN density (a tie-breaker) is left out, so runs are deterministic; "
        "pairwise distances come from the Gram matrix in fp32 (official: all pairwise differences, model dtype); "
        "raters and cluster means are computed in fp32 and the means are exact (official: divide by count + 1e-6); "
        "raters are the prompt tokens after the image (with <im_end>), not LISA's teacher-forced answer "
        "'[SEG].</s>', which the official prefill never holds; when no text token scores above the mean (all "
        "equal) every text token is a rater (official: no raters, NaN scores); the pruning layer's attention is "
        "recomputed for the rater rows only, in fp32, from its input (official: the full matrix), and GQA keys are "
        "repeated"
    )

    def __init__(self, retain: Literal[192, 128, 96, 64] | None = 192, keep: list[int] | None = None,
                 layers: list[int] | None = None, recycle: bool = True):
        if keep is None and retain not in SCHEDULES:
            raise ValueError(f"sparsevlm: retain must be one of {', '.join(map(str, SCHEDULES))}, got {retain}; or "
                             f"give explicit keep counts (keep=[300,200,110])")
        if keep is not None:
            if not keep or any(k < 1 and k != -1 for k in keep):
                raise ValueError(f"sparsevlm: keep must be image-token counts >= 1 (or -1 to keep all), got {keep}")
            inf = [float("inf") if k == -1 else k for k in keep]
            if any(b > a for a, b in zip(inf[:-1], inf[1:], strict=True)):
                raise ValueError(f"sparsevlm: keep counts must not increase from one pruning layer to the next (-1 "
                                 f"counts as all), got {keep}")
        if layers is not None and (not layers or layers[0] < 0 or sorted(set(layers)) != list(layers)):
            raise ValueError(f"sparsevlm: layers must be increasing layer indices >= 0, got {layers}")
        if keep is not None and layers is not None and len(keep) != len(layers):
            raise ValueError(f"sparsevlm: give one keep count per pruning layer ({len(layers)} layers {layers}), "
                             f"got {keep}")
        self.retain, self.keep, self.layers, self.recycle = None if keep is not None else retain, keep, layers, recycle

    def pruning_layers(self, info: ModelInfo) -> list[int]:
        return list(self.layers) if self.layers is not None else scale_pruning_layers(info.n_layers)

    def keep_counts(self, info: ModelInfo) -> list[int]:
        """Image tokens kept after each pruning layer on this model (-1: all)."""
        if self.keep is not None:
            return list(self.keep)
        return [max(1, round(k * info.n_image_tokens / OFFICIAL_TOKENS)) for k in SCHEDULES[self.retain]]

    def bind(self, info: ModelInfo) -> None:
        layers = self.pruning_layers(info)  # scale_layers raises if the model is too shallow for the default
        if layers[-1] >= info.n_layers - 1:
            raise ValueError(f"sparsevlm: pruning layer {layers[-1]} leaves no layer to drop tokens before on the "
                             f"model's {info.n_layers} layers; use layers in 0..{info.n_layers - 2}")
        keep = self.keep_counts(info)
        if len(keep) != len(layers):
            raise ValueError(f"sparsevlm: keep has {len(keep)} counts for the {len(layers)} pruning layers {layers}; "
                             f"give one count per layer")
        if max(keep) > info.n_image_tokens:
            raise ValueError(f"sparsevlm: keep={keep} exceeds the model's {info.n_image_tokens} image tokens; use -1 "
                             f"to keep all")

    # -- events ----------------------------------------------------------------------------------------------------
    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        if any(k != -1 for k in self.keep_counts(ctx.info)) and state.n_image:
            with ctx.overhead():
                ctx.scratch["sparsevlm_raters"] = text_raters(state, ctx.ledger)
        return state

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        layers = ctx.scratch.setdefault("sparsevlm_layers", self.pruning_layers(ctx.info))
        if i - 1 in layers:  # drop from the output of pruning layer i - 1 first: it may also be pruning layer i
            keep = self.keep_counts(ctx.info)[layers.index(i - 1)]
            saved = ctx.scratch.pop("sparsevlm_input")
            if keep != -1 and keep < state.n_image:
                with ctx.overhead():
                    state = self.prune(i - 1, saved, state, keep, ctx)
        if i in layers:
            ctx.scratch["sparsevlm_input"] = state  # layer i's input: its attention scores the image tokens
        return state

    def prune(self, layer: int, saved: TokenState, state: TokenState, keep: int, ctx: Context) -> TokenState:
        """Keep the top `keep` image tokens of `state` (the output of `layer`) by the raters' attention in `layer`
        (recomputed from its input `saved`, which has the same rows) and insert the recycled tokens."""
        img = state.image_rows  # (m,) the same rows as in `saved`: the layer does not change the row set
        raters = int(img[-1]) + 1 + ctx.scratch["sparsevlm_raters"]  # (r,) rows of the raters after the image
        probs = ctx.attention_rows(layer, saved, raters)  # (r, n) head mean, softmax over all keys, causal
        relevance = probs[:, img].mean(0)  # (m,) mean over raters (score.py, attn_postprocess_topk)
        order = relevance.argsort(descending=True)  # (m,) best first
        out = state.keep_image(img[order[:keep]])
        if not self.recycle:
            return out
        pruned = img[order[keep:]]  # (p,) by relevance, descending
        n_cand, n_clusters = recycled_count(len(pruned))
        candidates = state.hidden[0, pruned[:n_cand]]  # (n, d) output of the pruning layer, best first
        merged, assign = cluster_and_merge(candidates, n_clusters, ctx.ledger)  # (c, d), (n,)
        pairs = list(zip(assign.tolist(), state.patch[pruned[:n_cand]].tolist(), strict=True))  # (cluster, code)
        codes = [merged_members(ctx.ledger, [code for a, code in pairs if a == k]) for k in range(n_clusters)]
        return insert_after_image(out, merged.to(state.hidden.dtype), codes)

    # -- schedules and budgets -------------------------------------------------------------------------------------
    def image_schedule(self, info: ModelInfo) -> list[int]:
        """Image tokens per layer: the pruning layer at its full size, merged tokens included when recycling."""
        layers, keep = self.pruning_layers(info), self.keep_counts(info)
        current, out = info.n_image_tokens, []
        for i in range(info.n_layers):
            if i - 1 in layers:
                k = keep[layers.index(i - 1)]
                if k != -1 and k < current:
                    current = k + (recycled_count(current - k)[1] if self.recycle else 0)
            out.append(current)
        return out

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> SparseVLM:
        n = info.n_image_tokens
        base = SCHEDULES[192]
        layers = fixed.get("layers") or scale_pruning_layers(info.n_layers)
        if len(layers) != len(base):
            raise ValueError(f"sparsevlm: the budget mapping scales the 3-layer retain-192 schedule; give 3 layers, "
                             f"got {layers}")

        def build(s: float) -> SparseVLM:
            keep = [min(n, max(1, round(s * n * k / OFFICIAL_TOKENS))) for k in base]
            return cls(**{**fixed, "keep": keep, "retain": None})

        lo, hi = 0.0, OFFICIAL_TOKENS / base[-1]  # s = hi keeps every token at every layer
        for _ in range(50):  # N_avg(s) is a non-decreasing step function (merged tokens included)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if achieved_n_avg(build(mid), info) < n_avg else (lo, mid)
        best = min((build(lo), build(hi)), key=lambda m: abs(achieved_n_avg(m, info) - n_avg))
        got = achieved_n_avg(best, info)
        if abs(got - n_avg) > BUDGET_TOLERANCE * n:
            low, high = achieved_n_avg(build(0.0), info), achieved_n_avg(build(hi), info)
            raise ValueError(f"sparsevlm: N_avg {n_avg:.1f} is out of reach on this model: keep counts from 1 to all "
                             f"give N_avg {low:.1f} to {high:.1f} with pruning layers {layers}"
                             f"{' and recycling' if best.recycle else ''}; ask for a budget in that range")
        return best


def merged_members(ledger: Ledger, codes: list[int]) -> int:
    """The code of a token that is the mean of the image tokens `codes`: each one's patches at its share."""
    patches: dict[int, float] = {}
    for code in codes:
        for patch, share in patch_shares(code, ledger.members).items():
            patches[patch] = patches.get(patch, 0.0) + share / len(codes)
    return ledger.merged_token(list(patches), list(patches.values()))


def insert_after_image(state: TokenState, merged: Tensor, codes: list[int]) -> TokenState:
    """Insert synthetic image tokens (kind IMAGE, patch code `codes`: `Ledger.merged_token`) right after the last
    image row.

    Their `index` is that of the last kept image token: rows stay ordered by index (non-decreasing), text indices
    stay unique, so the [SEG] lookup (which compares its predecessor's index) is unaffected; under the "reindex"
    policy RoPE positions are 0..n-1 whatever the index, so the merged tokens sit at the positions right after the
    kept image tokens, as in the official code; under `positions=original` they take that token's position.

    Args:
        state: the sequence after the drop.
        merged: (c, d) hidden states of the inserted tokens.
        codes: their patch codes.
    """
    at = int(state.image_rows[-1]) + 1
    c, dev = merged.shape[0], state.index.device
    return TokenState(
        hidden=torch.cat([state.hidden[:, :at], merged[None], state.hidden[:, at:]], 1),  # (1, n + c, d)
        index=torch.cat([state.index[:at], state.index[at - 1].repeat(c), state.index[at:]]),
        kind=torch.cat([state.kind[:at], torch.full((c,), int(Kind.IMAGE), dtype=state.kind.dtype, device=dev),
                        state.kind[at:]]),
        patch=torch.cat([state.patch[:at], torch.tensor(codes, dtype=state.patch.dtype, device=dev),
                         state.patch[at:]]),
        position=torch.cat([state.position[:at], state.position[at - 1].repeat(c), state.position[at:]]),
        held=state.held,
    )


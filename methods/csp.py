"""LVLM_CSP: clustering, scattering and pruning of image tokens for reasoning segmentation.

Chen et al., "LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and Pruning for
Reasoning Segmentation", 2025 (arxiv.org/abs/2504.10854). The paper (sections 3.1-3.4, Tables 4-6) is the only
specification; it has no public code. Three stages over the decoder layers:

1. **Clustering** (layers 0..L_c-1): all N image tokens are projected, but only N_c representatives enter the
   LLM, keeping their original position ids (eq. 6); the other N - N_c are held back with their layer-0 embeddings.
   The representatives come from one of four modules: `random`, `uniform` (eq. 2), `cls` (eq. 3) or `seg_first`
   (eq. 4-5: instance masks, tokens per instance by relative area, at least one each, sampled uniformly inside).
2. **Scattering** (layers L_c..L_c+L_s-1, eq. 7): the held-back tokens re-enter in original order with their
   layer-0 embeddings next to the representatives, which carry their layer-L_c states.
3. **Pruning** (the remaining L_p layers, eq. 8): the top N_p image tokens by the [SEG] token's attention in the last
   scattering layer stay.

N_avg = (N_c L_c + N L_s + N_p L_p) / L (eq. 9) comes out of the ledger; the `csp` FLOPs convention (eq. 10-11) is
in `harness.flops`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from harness.engine import Context, VisionFeatures, cls_attention_heads
from harness.method import Method, ModelInfo, register
from harness.state import Kind, TokenState

REFERENCE = (32, 256)  # the paper's LLaVA-1.5-7B at 224 px: 32 decoder layers, 256 image tokens
TABLE1 = (8, 64, 6, 16)  # (L_c, N_c, L_s, N_p) of Table 1 and the Table 4 ablation (about 70% pruning)
PRESETS = {  # Table 6, LLaVA-1.5-7B 224 px: pruning ratio (%) -> (L_c, N_c, L_s, N_p)
    65: (6, 96, 8, 8), 70: (7, 80, 7, 8), 75: (8, 64, 6, 4), 80: (10, 48, 4, 8), 85: (11, 32, 3, 8),
    90: (12, 32, 2, 2),
}
TABLE6 = {  # Table 6's own blocks, by (decoder layers, image tokens): used as given on a model of that layout
    REFERENCE: PRESETS,
    (32, 576): {65: (6, 128, 9, 32), 70: (6, 32, 9, 16), 75: (7, 64, 7, 16), 80: (8, 24, 6, 8), 85: (9, 32, 4, 8),
                90: (11, 32, 3, 2)},  # LLaVA-1.5-7B at 336 px
    (40, 256): {65: (5, 64, 11, 16), 70: (6, 64, 10, 8), 75: (7, 32, 9, 8), 80: (9, 16, 7, 8), 85: (11, 16, 5, 8),
                90: (12, 32, 2, 8)},  # LLaVA-1.5-13B at 224 px
}
HELD = "csp"  # name of the held-back tokens in the token state


def preset(ratio: int, info: ModelInfo) -> tuple[int, int, int, int]:
    """Table 6's (L_c, N_c, L_s, N_p) for a pruning ratio: the block of the model's layout if the paper has one,
    else the LLaVA-1.5-7B 224-px block scaled to the model."""
    block = TABLE6.get((info.n_layers, info.n_image_tokens))
    return block[ratio] if block else scale_config(PRESETS[ratio], info)


def layer_pairs(config: tuple[int, int, int, int], info: ModelInfo) -> list[tuple[float, int, int]]:
    """(distance, L_c, L_s) for the model, nearest first to the configuration's layers scaled by L / 32: both at
    least 1, L_c + L_s <= L, in the configuration's order of L_s and L_c (the paper's L_s < L_c, or Table 6's equal
    or larger L_s at 70 and 65%)."""
    l_c, _, l_s, _ = config
    layers = info.n_layers
    order = (l_s > l_c) - (l_s < l_c)
    want_c, want_s = l_c * layers / REFERENCE[0], l_s * layers / REFERENCE[0]
    pairs = [(abs(lc - want_c) + abs(ls - want_s), lc, ls) for lc in range(1, layers)
             for ls in range(1, layers - lc + 1) if (ls > lc) - (ls < lc) == order]
    return sorted(pairs)


def scaled_tokens(k: int, n: int) -> int:
    """A token count given for 256 image tokens on a model with n: round(k n / 256), in 1..n."""
    return max(1, min(n, round(k * n / REFERENCE[1])))


def scale_config(config: tuple[int, int, int, int], info: ModelInfo) -> tuple[int, int, int, int]:
    """A (L_c, N_c, L_s, N_p) given for 32 layers and 256 image tokens, scaled to the model so that it keeps its
    pruning ratio (eq. 9) and its stage order.

    Rule: N_p scales by N / 256; (L_c, L_s) is the nearest of `layer_pairs`, and N_c is solved from eq. 9 for the
    configuration's own N_avg / N (rounded). Pairs are taken by distance, ties by how close N_c comes to
    N_c N / 256, until N_c lies in 1..N. (Rounding L_c and L_s separately instead ran Table 1's default at 65.6%
    instead of 71.5% on 8 layers, with L_s = L_c.) Raises ValueError when no pair keeps the ratio (90% on 8
    layers: one scattering layer already averages N / 8).
    """
    l_c, n_c, l_s, n_p = config
    layers, n = info.n_layers, info.n_image_tokens
    if (layers, n) == REFERENCE:
        return config
    target = n_avg(l_c, n_c, l_s, n_p, REFERENCE[1], REFERENCE[0]) / REFERENCE[1] * n  # N_avg at the same ratio
    np_ = scaled_tokens(n_p, n)
    options = []
    for distance, lc, ls in layer_pairs(config, info):
        nc = round((target * layers - n * ls - np_ * (layers - lc - ls)) / lc)  # eq. 9 solved for N_c
        if 1 <= nc <= n:
            options.append((distance, abs(nc - n_c * n / REFERENCE[1]), lc, nc, ls))
    if not options:
        raise ValueError(f"csp: ({l_c}, {n_c}, {l_s}, {n_p}) prunes {100 * (1 - target / n):.1f}% of the tokens on "
                         f"32 layers, which no (L_c, N_c, L_s) keeps on the model's {layers} layers; give l_c, n_c, "
                         f"l_s and n_p, or a budget")
    _, _, lc, nc, ls = min(options)
    return lc, nc, ls, np_


def n_avg(l_c: int, n_c: int, l_s: int, n_p: int, n: int, layers: int) -> float:
    """Eq. 9 (the paper's tables print it truncated)."""
    return (n_c * l_c + n * l_s + n_p * (layers - l_c - l_s)) / layers


def uniform_indices(n: int, n_c: int) -> Tensor:
    """Eq. 2 as written: S[i] = i floor(N / N_c), a stride over the raster order (not a 2-D grid)."""
    return torch.arange(n_c) * (n // n_c)


def cls_scores(feats: VisionFeatures, ctx: Context) -> Tensor:
    """Eq. 3: softmax(q_cls K_img / sqrt(d)) of CLIP's last layer, per head over all keys (CLS included), averaged
    over heads; (N,) scores of the patches. The last layer's input is the feature layer's output (LLaVA feeds the
    penultimate layer), so the one extra layer's CLS row is recomputed from it."""
    layers = feats.tower.encoder.layers
    if feats.layer + 1 < len(layers):
        layer, x = layers[feats.layer + 1], torch.cat([feats.cls[:, None], feats.patches], 1)
    else:
        layer, x = layers[feats.layer], feats.layer_input
    probs, _ = cls_attention_heads(layer, x, ctx)
    return probs[:, 1:].mean(0)


def seg_first_indices(coverage: Tensor, n_c: int, rng: torch.Generator) -> Tensor:
    """Eq. 4-5: S_o[i] = max(1, floor(N_c area_i / sum_j area_j)) tokens drawn uniformly without replacement from
    instance i's patches (those at least half covered; the most covered one for an instance smaller than a patch),
    capped at the instance's patch count; S is the union. Background is never chosen, and what the caps, the floors
    and overlapping instances leave of N_c stays unused, as in the paper (its Table 4 N_avg of Seg-First is below
    eq. 9's with the nominal N_c); the at-least-one rule can also take |S| above N_c when there are more instances
    than N_c."""
    area = coverage.sum(1)
    coverage, area = coverage[area > 0], area[area > 0]
    chosen: list[Tensor] = []
    for cov, a in zip(coverage, area, strict=True):
        members = (cov >= 0.5).nonzero().squeeze(1)
        if members.numel() == 0:
            members = cov.argmax()[None]
        count = min(max(1, math.floor(n_c * float(a) / float(area.sum()))), members.numel())
        chosen.append(members[torch.randperm(members.numel(), generator=rng)[:count]])
    return torch.cat(chosen).unique() if chosen else torch.zeros(0, dtype=torch.long)


@register("csp")
class LVLMCSP(Method):
    """LVLM_CSP: N_c representatives for L_c layers, all N tokens for L_s layers, the top N_p by the [SEG] token's
    attention for the rest.

    Unset (L_c, N_c, L_s, N_p) take the `preset`'s (Table 6), else Table 1's (8, 64, 6, 16). Table 6 has blocks for
    LLaVA-1.5-7B at 224 and 336 px and 13B at 224 px; a model with one of those layouts (32 or 40 layers, 256 or 576
    tokens) gets that block as printed, any other model the 7B 224-px values scaled so that each keeps its pruning
    ratio and its order of L_s and L_c (`scale_config`: layers near l L / 32, N_p by N / 256, N_c solved from eq. 9;
    on 8 layers Table 1's default becomes (2, 124, 1, 16) at 71.5%). N_c or N_p at or above N keep every token in
    that stage.

    Pruning ranks the image tokens by the head-mean attention of the [SEG] row (eq. 8) in the last scattering layer
    (L_c + L_s - 1), recomputed from that layer's input; `prune_row=seg_source` ranks with the token before [SEG]
    (LISA's mask source) instead. Seg-First's realised token count |S| depends on the image: below N_c when the
    instances cover fewer patches than their shares (each takes at most its own patches, background is never
    chosen) or the floors of eq. 4 leave a remainder, above it when more instances than N_c each take their one
    token; an image with no instance falls back to `uniform`. The paper leaves the difference unused; `fill=prune`
    moves it to the pruning stage (see Args), so the image's N_avg is eq. 9's to within rounding unless the pruning
    count reaches 1 or N. Its instance segmenter runs in a latency stage of its own ("instances"); its FLOPs (the
    network at its letterboxed input, plus the mask prototypes' matmul per detection) are method overhead.

    Budget mapping: starts from the Table 6 preset nearest the target reduction (the model's own block, else scaled),
    keeps its L_c, L_s and N_p and solves N_c from eq. 9 (rounded); when N_c would exceed N it keeps N_c = N and
    solves N_p; if neither fits, the neighbouring presets are tried. With Seg-First the mapping also sets
    `fill=prune` (unless fill is given), so an image meets the target whatever its instances leave unused (the
    paper's rule ran `csp@50%` at N_avg 74 instead of 128 on the bundled model); with N_c < N it then only takes a
    setting whose pruning stage can absorb the whole clustering budget (L_p >= 1 and N_p + (N_c - 1) L_c / L_p <=
    N; every preset passes on 8 or more layers). A mild budget solved with N_c = N clusters nothing, so it is met
    as it is.

    Args:
        l_c: L_c, decoder layers of the clustering stage.
        n_c: N_c, representative image tokens in the clustering stage.
        l_s: L_s, decoder layers of the scattering stage (all N image tokens).
        n_p: N_p, image tokens kept for the pruning stage (the remaining L - L_c - L_s layers).
        preset: a Table 6 pruning ratio (65, 70, 75, 80, 85 or 90) whose (L_c, N_c, L_s, N_p) fill the unset ones.
        cluster: clustering module: random, uniform (eq. 2), cls (eq. 3) or seg_first (eq. 4-5).
        instances: Seg-First's instance source: yolo (the bundled shapes-ref YOLO-seg, or `yolo_weights`) or oracle
            (the dataset's own instance annotations, for analysis).
        yolo_weights: a YOLO-seg checkpoint (e.g. yolo11n-seg.pt) instead of the bundled one.
        conf: YOLO confidence threshold (the paper gives none; ultralytics' default).
        prune_row: the attention row that ranks tokens for pruning: seg (the [SEG] token, eq. 8; in generate mode's
            prefill, which has no [SEG] yet, the prompt's last token) or seg_source (the token before [SEG]).
        fill: what becomes of the clustering budget Seg-First leaves unused, N_c - |S| tokens in each of the L_c
            layers: none (the paper: unused, the image runs below the nominal N_avg) or prune (spent in the pruning
            stage, whose count becomes N_p + round((N_c - |S|) L_c / L_p), at least 1 and at most N; fewer than N_p when
            |S| > N_c). No effect on the other modules, whose |S| is N_c.
        seed: seed of random clustering and of Seg-First's sampling inside instances.
    """

    stage = "multi-stage"
    position_policy = "original"
    needs_llm_attention = True
    needs_vision_attention = True
    citation = ("Chen et al., LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and "
                "Pruning for Reasoning Segmentation, 2025 (no public code)")
    keep_all = {"n_c": 1 << 20, "n_p": 1 << 20, "cluster": "uniform"}
    deviations = ("no official code: implemented from the paper's equations. Read as: eq. 2's `k` as `i`; CLS "
                  "attention (eq. 3) from CLIP's last layer, one layer after LLaVA's features, as the mean of per-head "
                  "softmaxes over all keys; pruning attention (eq. 8) as the head mean; an instance owns the patches "
                  "it covers at least half (its most covered one if none); YOLO at ultralytics' default thresholds; "
                  "no instance found -> uniform clustering; a budget (@70%) with seg_first spends the clustering "
                  "budget its instances leave unused in the pruning stage (fill=prune) so every image meets it, "
                  "where the paper leaves it unused (fill=none, the default when no budget is given)")
    budget_params = ("l_c", "n_c", "l_s", "n_p", "preset")

    def __init__(self, l_c: int | None = None, n_c: int | None = None, l_s: int | None = None,
                 n_p: int | None = None, preset: Literal[65, 70, 75, 80, 85, 90] | None = None,
                 cluster: Literal["random", "uniform", "cls", "seg_first"] = "seg_first",
                 instances: Literal["yolo", "oracle"] = "yolo", yolo_weights: str | None = None, conf: float = 0.25,
                 prune_row: Literal["seg", "seg_source"] = "seg", fill: Literal["none", "prune"] = "none",
                 seed: int = 0):
        for name, v in (("l_c", l_c), ("n_c", n_c), ("l_s", l_s), ("n_p", n_p)):
            if v is not None and v < 1:
                raise ValueError(f"csp: {name} must be >= 1, got {v}")
        if not 0.0 < conf < 1.0:
            raise ValueError(f"csp: conf is a detection confidence in (0, 1), got {conf}")
        self.l_c, self.n_c, self.l_s, self.n_p, self.preset = l_c, n_c, l_s, n_p, preset
        self.cluster, self.instances, self.yolo_weights, self.conf = cluster, instances, yolo_weights, conf
        self.prune_row, self.fill, self.seed = prune_row, fill, seed
        self._yolo = None
        self._configs: dict[ModelInfo, tuple[int, int, int, int]] = {}

    def config(self, info: ModelInfo) -> tuple[int, int, int, int]:
        """(L_c, N_c, L_s, N_p) on this model: given values, the preset's (else Table 1's, scaled) for the rest,
        counts capped at N (resolved once per model)."""
        if info in self._configs:
            return self._configs[info]
        given = (self.l_c, self.n_c, self.l_s, self.n_p)
        if None not in given:
            default = given
        else:
            default = preset(self.preset, info) if self.preset is not None else scale_config(TABLE1, info)
        l_c, n_c, l_s, n_p = (d if v is None else v for v, d in zip(given, default, strict=True))
        self._configs[info] = l_c, min(n_c, info.n_image_tokens), l_s, min(n_p, info.n_image_tokens)
        return self._configs[info]

    def bind(self, info: ModelInfo) -> None:
        l_c, _, l_s, _ = self.config(info)
        if l_c + l_s > info.n_layers:
            raise ValueError(f"csp: l_c + l_s = {l_c + l_s} exceeds the model's {info.n_layers} layers")

    # -- clustering --------------------------------------------------------------------------------------------
    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        n = feats.patches.shape[1]
        n_c = self.config(ctx.info)[1]
        if n_c >= n:
            chosen = torch.arange(n)
        elif self.cluster == "random":
            chosen = torch.randperm(n, generator=ctx.rng)[:n_c]
        elif self.cluster == "uniform":
            chosen = uniform_indices(n, n_c)
        elif self.cluster == "cls":
            chosen = cls_scores(feats, ctx).topk(n_c).indices.cpu()
        else:
            masks = self.instance_masks(ctx)
            chosen = seg_first_indices(ctx.model.patch_coverage(masks), n_c, ctx.rng) if len(masks) else \
                torch.zeros(0, dtype=torch.long)
            if chosen.numel() == 0:  # nothing detected: eq. 4 is undefined; fall back to eq. 2
                chosen = uniform_indices(n, n_c)
        ctx.scratch["csp_selected"] = chosen.sort().values
        return feats

    def instance_masks(self, ctx: Context) -> np.ndarray:
        """(K, H, W) instance masks of the image: the dataset's (oracle) or the YOLO-seg's at the image's size, made
        in the "instances" latency stage; YOLO's FLOPs go to the ledger as method work."""
        if self.instances == "oracle":
            if ctx.instances is None:
                raise ValueError("csp: instances=oracle needs a dataset with instance annotations (refer-format, "
                                 "e.g. shapes-ref or RefCOCO); use instances=yolo")
            with ctx.watch("instances"):
                return np.asarray(ctx.instances() if callable(ctx.instances) else ctx.instances, dtype=bool)
        if ctx.image is None:
            raise ValueError("csp: seg_first with YOLO needs the image; pass it to segment()")
        from harness.model import load_image
        from harness.yolo import load_yolo, run_yolo, yolo_flops

        if self._yolo is None:
            self._yolo = load_yolo(self.yolo_weights, device=str(ctx.model.device))
        with ctx.watch("instances"):
            det = run_yolo(self._yolo, load_image(ctx.image), conf=self.conf, device=str(ctx.model.device))
        ctx.ledger.method_flops += yolo_flops(self._yolo, det)
        return det.masks

    # -- scattering and pruning --------------------------------------------------------------------------------
    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        if "csp_selected" not in ctx.scratch:
            raise ValueError("csp: on_sequence without on_vision's selection; run both with the same Context")
        img = state.image_rows
        selected = ctx.scratch["csp_selected"].to(img.device)
        held = torch.ones(len(img), dtype=torch.bool, device=img.device)
        held[selected] = False  # rows of the image block are in patch order
        return state.hold(HELD, img[held]) if bool(held.any()) else state

    def pruned_count(self, ctx: Context) -> int:
        """N_p of this image: the configured one, plus with `fill=prune` the clustering budget left unused."""
        l_c, n_c, l_s, n_p = self.config(ctx.info)
        l_p = ctx.info.n_layers - l_c - l_s
        if self.fill == "none" or l_p < 1:
            return n_p
        unused = (n_c - len(ctx.scratch["csp_selected"])) * l_c
        return min(max(1, n_p + round(unused / l_p)), ctx.info.n_image_tokens)

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        l_c, _, l_s, _ = self.config(ctx.info)
        if i == l_c and HELD in state.held:
            state = state.release(HELD)
        prune_at = l_c + l_s
        if prune_at >= ctx.info.n_layers or i not in (prune_at - 1, prune_at):
            return state
        n_p = self.pruned_count(ctx)
        if n_p >= state.n_image:
            return state
        if i == prune_at - 1:
            ctx.scratch["csp_input"] = state  # the last scattering layer's input: its attention ranks the tokens
            return state
        img = state.image_rows
        prev = ctx.scratch.pop("csp_input")
        seg = prev.row_of(Kind.SEG)
        row = prev.last_prompt_row if self.prune_row == "seg_source" or seg.numel() == 0 else int(seg[0])
        probs = ctx.attention_rows(prune_at - 1, prev, torch.tensor([row], device=img.device))[0]
        return state.keep_image(img[probs[prev.image_rows].topk(n_p).indices])

    # -- budgets -----------------------------------------------------------------------------------------------
    def image_schedule(self, info: ModelInfo) -> list[int] | None:
        if self.cluster == "seg_first" and self.config(info)[1] < info.n_image_tokens:
            return None  # Seg-First's per-layer counts depend on the image (with fill=prune their mean does not)
        return self.nominal_schedule(info)

    def nominal_schedule(self, info: ModelInfo) -> list[int]:
        """Eq. 9's schedule with |S| = N_c: exact for the other clustering modules, and what the paper's Table 6
        prints for Seg-First, whose realised count depends on the image."""
        l_c, n_c, l_s, n_p = self.config(info)
        return [n_c] * l_c + [info.n_image_tokens] * l_s + [n_p] * (info.n_layers - l_c - l_s)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg_target: float, **fixed) -> LVLMCSP:
        n, layers = info.n_image_tokens, info.n_layers
        if cls(**fixed).cluster == "seg_first":  # the given parameters, defaults for the rest
            fixed = {"fill": "prune", **fixed}  # meet the budget per image (see the class docstring)
        fill = cls(**fixed).fill == "prune"
        reduction = 100 * (1 - n_avg_target / n)
        no_room = False
        block = TABLE6.get((layers, n))
        for ratio in sorted(PRESETS, key=lambda r: abs(r - reduction)):
            if block:  # the model's own Table 6 block: its layers and N_p as printed
                candidates = [(block[ratio][0], block[ratio][2], block[ratio][3])]
            else:  # the 7B 224-px preset's layers scaled, nearest pair first (`layer_pairs`)
                n_p0 = scaled_tokens(PRESETS[ratio][3], n)
                candidates = [(lc, ls, n_p0) for _, lc, ls in layer_pairs(PRESETS[ratio], info)]
            for l_c, l_s, n_p in candidates:
                l_p = layers - l_c - l_s
                n_c = round((n_avg_target * layers - n * l_s - n_p * l_p) / l_c)
                if n_c > n and l_p > 0:  # a mild budget: every token in clustering, solve the pruning count
                    n_c, n_p = n, round((n_avg_target * layers - n * (l_c + l_s)) / l_p)
                if not (1 <= n_c <= n and 1 <= n_p <= n):
                    continue
                if fill and n_c < n and (l_p < 1 or n_p + math.ceil((n_c - 1) * l_c / l_p) > n):
                    no_room = True  # an image with one selected token would leave budget the pruning stage cannot take
                    continue
                return cls(**{**fixed, "l_c": l_c, "n_c": n_c, "l_s": l_s, "n_p": n_p})
        if no_room:
            raise ValueError(f"csp: N_avg {n_avg_target:.1f} cannot be met on every image with seg_first's "
                             f"fill=prune (its pruning stage cannot take the whole clustering budget); ask for a "
                             f"larger reduction, or give fill=none (the paper's rule, below the budget)")
        lowest = (n + layers - 1) / layers  # one scattering layer, one token everywhere else
        raise ValueError(f"csp: N_avg {n_avg_target:.1f} is out of reach of the Table 6 presets on {layers} layers "
                         f"(reachable: {lowest:.1f} to {n}, a scattering layer alone costing N / L); ask for a budget "
                         f"in that range or give l_c, n_c, l_s and n_p")

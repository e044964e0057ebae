"""VisPruner against an independent re-implementation of the official selection (Theia-4869/VisPruner,
llava/model/llava_arch.py `encode_images`, batch 1) on the tiny model.

The reference runs the whole HF CLIP tower on the eager model (same weights) with `output_attentions`, takes the
feature layer's output patches F = hidden_states[-2][0, 1:] and that same layer's CLS-row attention over the patches
(attentions[-2][0, :, 0, 1:]), keeps the int(T * r) patches with the largest head-mean attention, and reduces the
rest to T - int(T * r) patches with the official loop: split the residual list (in its current order) into even
positions a and odd positions b, drop the min(8, R - diverse) a's whose best cosine match in b is largest, and
continue with the kept a's (descending score) followed by all b's. Odd R: a is the ceil(R / 2) even positions.
Sorts are stable descending (ties keep index order). The kept patches reach the LLM in raster order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.method import create_method
from tests.conftest import QUERY

N = 256


def desc(x) -> list[int]:
    return [int(i) for i in np.argsort(-np.asarray(x, dtype=np.float64), kind="stable")]


@pytest.fixture(scope="module")
def tower(tiny_eager, image):
    """F and the per-head CLS-row attention of the feature layer, plus two wrong inputs used to show the test bites."""
    model = tiny_eager
    with torch.no_grad():
        out = model.vision_tower(model.prepare(image).clip_pixels, output_hidden_states=True, output_attentions=True)
    fl = model.config.vision_feature_layer
    layer = len(out.hidden_states) + fl - 1  # the layer whose output is hidden_states[fl]
    probs = out.attentions[layer][0].float()  # (heads, 1 + N, 1 + N)
    return {"feats": out.hidden_states[fl][0, 1:].float(), "attn": probs[:, 0, 1:],
            "attn_last": out.attentions[-1][0, :, 0, 1:].float(),  # bug: the last layer's attention
            "attn_col": probs[:, 1:, 0],  # bug: the CLS column (patches attending to CLS) instead of the CLS row
            "feats_last": out.hidden_states[-1][0, 1:].float()}  # bug: the last layer's features


def reference(feats, attn, T, r, raster_pairs=False, sorted_keep=False, raw=False) -> list[int]:
    """The official selection; the flags switch on plausible bugs (to check that the comparisons can fail)."""
    important_num = int(T * r)
    diverse_num = T - important_num
    order = desc(attn.mean(0))
    important, residual = order[:important_num], order[important_num:]
    normed = feats if raw else feats / feats.norm(dim=-1, keepdim=True)
    while diverse_num > 0:
        step = min(8, len(residual) - diverse_num)
        if step <= 0:
            break
        if raster_pairs:
            residual = sorted(residual)
        tokens = normed[residual]
        scores = (tokens[::2] @ tokens[1::2].T).max(dim=-1).values
        distinct = desc(scores)[step:]
        if sorted_keep:
            distinct = sorted(distinct)
        residual = [residual[::2][i] for i in distinct] + residual[1::2]
    return sorted(important + (residual if diverse_num > 0 else []))


def kept(model, image, method) -> list[int]:
    r = model.segment(image, QUERY, method)
    layers = r.trace.kept_patches
    assert layers and all(layer == layers[0] for layer in layers)  # pruned once, before the LLM
    return layers[0]


SETTINGS = [
    (128, 0.5),  # README setting: 64 important + 64 diverse (16 full rounds of 8)
    (64, 0.75),  # README setting: 48 important + 16 diverse (24 full rounds)
    (64, 1.0),  # important only: catches a diverse loop that still runs, or r read as the diverse share
    (64, 0.0),  # diverse only: every patch enters the loop (R = 256)
    (100, 0.5),  # R = 206, diverse 50: 19 rounds of 8 then one of 4 (catches a fixed step of 8 overshooting)
    (90, 0.5),  # R = 211 odd: a has 106 rows; the generalised loop, 20 rounds of 8 then one of 6
]


@pytest.mark.parametrize("T, r", SETTINGS)
def test_kept_patches_match_the_official_selection(tiny, image, tower, T, r):
    want = reference(tower["feats"], tower["attn"], T, r)
    assert len(want) == T
    got = kept(tiny, image, f"vispruner:visual_token_num={T},important_ratio={r}")
    # exact list, not set: the tokens are spliced in raster order; a wrong count (e.g. the odd-R case dropping
    # too many / too few) or any of the bugs in test_reference_discriminates shows up here
    assert got == want, (len(got), sorted(set(want) - set(got))[:10], sorted(set(got) - set(want))[:10])


def test_reference_discriminates(tower):
    """The comparisons above can fail: each plausible bug changes the expected set in some tested setting."""
    f, a = tower["feats"], tower["attn"]

    def differs(T, r, **kw):
        feats, attn = kw.pop("feats", f), kw.pop("attn", a)
        return reference(feats, attn, T, r, **kw) != reference(f, a, T, r)

    assert differs(64, 1.0, attn=tower["attn_last"])  # attention of the last layer, not the feature layer
    assert differs(64, 1.0, attn=tower["attn_col"])  # CLS column instead of CLS row
    assert not differs(64, 1.0, attn=a * a.shape[0])  # (head sum vs mean is harmless: same ranks)
    assert differs(128, 0.5, raster_pairs=True)  # a/b paired in raster order instead of residual order
    assert differs(64, 0.0, sorted_keep=True)  # kept a's re-sorted by position instead of descending score
    assert differs(64, 0.0, raw=True)  # dot product of raw features instead of cosine similarity
    assert differs(64, 0.0, feats=tower["feats_last"])  # similarity on the last layer's features
    assert reference(f, a, 64, 0.25) != reference(f, a, 64, 0.75)  # important_ratio read as the diverse share


def test_the_llm_gets_the_projected_feature_layer_patches(tiny, image, tower):
    """The projector sees the feature layer's patches and only the kept ones reach the LLM (catches pruning after
    projecting the wrong features, or splicing tokens out of order)."""
    T, r = 90, 0.5
    seen = []
    handle = tiny.projector.register_forward_hook(lambda mod, args, out: seen.append(out.reshape(-1, out.shape[-1])))
    try:
        got = kept(tiny, image, f"vispruner:visual_token_num={T},important_ratio={r}")
    finally:
        handle.remove()
    out = seen[0]
    assert out.shape[0] in (N, T)
    if out.shape[0] == N:  # projected everything, then masked
        out = out[got]
    with torch.no_grad():
        want = tiny.projector(tower["feats"][got][None])[0]
    assert torch.allclose(out.float(), want.float(), atol=1e-4, rtol=1e-4)


def test_budget_75_percent_keeps_64_tokens(tiny, image, tower):
    got = kept(tiny, image, create_method("vispruner@75%", info=tiny.info))
    # T = round(0.25 * 256) = 64 at the default r = 0.5 (catches a budget mapped onto r, or T read as dropped count)
    assert len(got) == 64
    assert got == reference(tower["feats"], tower["attn"], 64, 0.5)

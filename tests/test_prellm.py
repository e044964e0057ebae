"""PruMerge, PruMerge+ and VisionZip against independent computations on the tiny model.

The references run the whole CLIP tower the way the official code does (every layer, forward hooks on the last
layer's q_proj / k_proj for PruMerge, eager `output_attentions` for VisionZip) and implement the selection and the
merges with plain loops over tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.method import create_method
from tests.conftest import QUERY


def projector_input(model, image, spec):
    """The tokens the method hands to the projector, and the segment result."""
    seen = []
    handle = model.projector.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].clone()))
    try:
        r = model.segment(image, QUERY, create_method(spec, info=model.info))
    finally:
        handle.remove()
    return seen[0], r


def full_tower(model, image, attentions=False):
    """Every CLIP layer run by HF (as LLaVA's tower does), with hooks on the last layer's q/k projections."""
    tower = model.vision_tower
    last = tower.encoder.layers[-1].self_attn
    got = {}
    hooks = [last.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o[0])),
             last.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o[0]))]
    try:
        with torch.no_grad():
            out = tower(model.prepare(image).clip_pixels, output_hidden_states=True, output_attentions=attentions)
    finally:
        for h in hooks:
            h.remove()
    return out, got


def prumerge_reference(model, image, plus=False, ratio=None):
    out, got = full_tower(model, image)
    feats = out.hidden_states[model.config.vision_feature_layer][0, 1:]  # (N, C), LLaVA's features
    q, k = got["q"].double(), got["k"].double()
    attn = torch.softmax(q @ k.T / np.sqrt(q.shape[-1]), -1)
    a = attn[0, 1:].numpy()  # CLS row
    n = len(a)
    if ratio is None:
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        ratio = float(np.sum(a > q3 + 1.5 * (q3 - q1))) / n
    if plus:
        ratio = max(ratio, 1 / n)  # the documented deviation for ratio 0
    kept = list(np.argsort(-a, kind="stable")[: int(n * ratio)])
    if plus:
        t = max(1, int(int(1 / ratio) / 3))
        kept += [i for i in range(0, n - 1, t) if i not in kept]
    keys = k[1:]
    h = feats.double()
    tokens = []
    for i in kept:
        others = [j for j in range(n) if j != i]
        sims = [float(F.cosine_similarity(keys[i], keys[j], dim=0)) for j in others]
        nbrs = [others[j] for j in np.argsort(sims, kind="stable")[::-1][:32]]
        tokens.append(h[i] + sum(a[j] * h[j] for j in nbrs))
    tokens.append(sum(a[j] * h[j] for j in range(n) if j not in kept))
    return kept, torch.stack(tokens).float(), int(np.sum(a > np.percentile(a, 75) + 1.5 * (
        np.percentile(a, 75) - np.percentile(a, 25))))


def visionzip_reference(model, image, dominant, contextual):
    out, _ = full_tower(model, image, attentions=True)
    layer = len(out.hidden_states) + model.config.vision_feature_layer - 1  # the feature layer (hidden_states[-2])
    h = out.hidden_states[layer + 1][0].double()  # (1 + N, C): its output, CLS included
    probs = out.attentions[layer][0].double()  # (heads, 1 + N, 1 + N)
    score = probs[:, 0, 1:].sum(0).numpy()
    top = sorted(int(i) + 1 for i in np.argsort(-score, kind="stable")[: dominant - 1])
    dom = [0] + top
    attn = model.vision_tower.encoder.layers[layer].self_attn
    x = model.vision_tower.encoder.layers[layer].layer_norm1(out.hidden_states[layer][0])
    metric = attn.k_proj(x).double().view(x.shape[0], attn.num_heads, -1).mean(1)
    rest = [i for i in range(h.shape[0]) if i not in dom]
    step = max(1, len(rest) // max(contextual, 1))
    targets = list(range(0, len(rest), step))[:contextual]
    groups = {t: [] for t in targets}
    for pos, row in enumerate(rest):
        if pos in groups or not targets:
            continue
        sims = [float(F.cosine_similarity(metric[row], metric[rest[t]], dim=0)) for t in targets]
        groups[targets[int(np.argmax(sims))]].append(row)
    ctx = [h[rest[t]] + (torch.stack([h[m] for m in groups[t]]).mean(0) if groups[t] else 0) for t in targets]
    return dom, [rest[t] for t in targets], torch.cat([h[dom], *[c[None] for c in ctx]]).float()


def images(n):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        y, x = rng.integers(10, 60, 2)
        img[y:y + 40, x:x + 50] = rng.integers(0, 255, 3)
        out.append(img)
    return out


def centres(r) -> list[int]:
    """Each input token's own patch: a merged token's first member (PruMerge's centre, VisionZip's target)."""
    return [r.trace.members[c][0][0] if c <= -2 else c for c in r.trace.kept_patches[0]]


def check_prumerge_members(r, kept, n=256):
    """Every PruMerge token is recorded as merged: a centre at weight 1 with its 32 neighbours at their attention
    (a sum below 1: CLS attention over all patches sums to 1), and the extra token over every patch not kept."""
    codes = r.trace.kept_patches[0]
    for code in codes[:-1]:
        pairs = r.trace.members[code]
        assert len(pairs) == 33 and pairs[0][1] == 1.0 and sum(w for _, w in pairs[1:]) < 1
        assert len({p for p, _ in pairs}) == 33  # distinct neighbours, not the centre itself
    assert sorted(p for p, _ in r.trace.members[codes[-1]]) == sorted(set(range(n)) - {int(i) for i in kept})


@pytest.mark.parametrize("k", range(3))
def test_prumerge_adaptive_k_is_the_iqr_count_and_tokens_follow_the_formulas(tiny, k):
    image = images(3)[k]  # 9, 2 and 2 outliers
    got, r = projector_input(tiny, image, "prumerge")
    kept, want, outliers = prumerge_reference(tiny, image)
    assert outliers > 0 and len(kept) == outliers and got.shape[0] == outliers + 1  # centres plus the extra token
    assert centres(r)[:-1] == [int(i) for i in kept]  # descending attention, extra last
    check_prumerge_members(r, kept)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    got, r = projector_input(tiny, image, "prumerge+")
    kept, want, _ = prumerge_reference(tiny, image, plus=True)
    assert centres(r)[:-1] == [int(i) for i in kept]
    check_prumerge_members(r, kept)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_prumerge_fixed_ratio_and_prumerge_plus_follow_the_formulas(tiny, image):
    got, r = projector_input(tiny, image, "prumerge:ratio=0.1")
    kept, want, _ = prumerge_reference(tiny, image, ratio=0.1)
    assert len(kept) == int(tiny.info.n_image_tokens * 0.1) and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    for spec, ratio in (("prumerge+", None), ("prumerge+:ratio=0.05", 0.05)):
        got, r = projector_input(tiny, image, spec)
        kept, want, _ = prumerge_reference(tiny, image, plus=True, ratio=ratio)
        assert centres(r)[:-1] == [int(i) for i in kept]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), spec


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (20, 7), (1, 5), (40, 0)])
def test_visionzip_dominant_set_and_contextual_merge(tiny, tiny_eager, image, dominant, contextual):
    got, r = projector_input(tiny, image, f"visionzip:dominant={dominant},contextual={contextual}")
    dom, targets, want = visionzip_reference(tiny_eager, image, dominant, contextual)  # the same weights, eager
    assert centres(r) == [i - 1 for i in dom] + [t - 1 for t in targets]  # CLS is patch -1
    # the contextual tokens partition the patches outside the dominant set: each patch is in exactly one token
    covered = [p for c in r.trace.kept_patches[0] if c <= -2 for p, _ in r.trace.members[c]]
    covered += [c for c in r.trace.kept_patches[0] if c >= 0]
    assert sorted(covered) == list(range(256)) if contextual else len(covered) == dominant - 1
    assert got.shape[0] == dominant + contextual == r.trace.image_tokens_per_layer[-1]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["prumerge", "prumerge+", "visionzip"])
def test_sdpa_and_eager_towers_give_the_same_tokens(spec, tiny, tiny_eager, image):
    a, ra = projector_input(tiny, image, spec)
    b, rb = projector_input(tiny_eager, image, spec)
    assert ra.trace.kept_patches == rb.trace.kept_patches
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_budgets(tiny):
    info = tiny.info
    vz = create_method("visionzip@75%", info=info)
    assert (vz.dominant, vz.contextual) == (54, 10)  # 64 tokens of 256: the official split
    assert create_method("visionzip@navg=128", info=info).params() == {"dominant": 108, "contextual": 20}
    pm = create_method("prumerge@navg=40", info=info)
    assert pm.image_schedule(info)[0] == 40
    plus = create_method("prumerge+@75%", info=info)
    assert abs(plus.upper_count(info.n_image_tokens, plus.ratio) - 64) <= 0.02 * info.n_image_tokens
    with pytest.raises(ValueError, match="prumerge\\+ cannot reach"):
        create_method("prumerge+@50%", info=info)


def test_bad_parameters_are_one_line_errors(tiny, image):
    with pytest.raises(ValueError, match="ratio must be in"):
        create_method("prumerge:ratio=0")
    with pytest.raises(ValueError, match="exceeds the model's 256 patches"):
        tiny.segment(image, QUERY, "visionzip:dominant=250,contextual=10")

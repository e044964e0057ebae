"""DivPrune (Alvar et al., CVPR'25, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models")
against an independent reference.

The reference takes V, the projected image embeddings the LLM receives, from stock pieces: the whole HF CLIP tower run
with `output_hidden_states=True`, LLaVA's features `hidden_states[vision_feature_layer][0, 1:]` (CLS dropped), then the
model's projector. It transcribes the official `DivPrune` loop (vbdi/divprune, LLaVA/llava/model/llava_arch.py) in
float64: D = 1 - pairwise cosine similarity of V's rows; step 0 scores each token by its nearest-neighbour distance
(the 2nd smallest entry of its column, the smallest being its zero distance to itself), every later step by its
distance to the nearest selected token; each step takes the argmax. It keeps int(round(subset_ratio * N)) tokens, or
`keep`. The kept image tokens reach the LLM in ascending patch order (the official `sorted`) or, under
`order=selection`, in the greedy selection order (as the paper's numbers were produced).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.method import create_method
from tests.conftest import QUERY


def other_image():
    """Noise, a blue block and a copied region (repeated content)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    img[20:80, 30:70] = (40, 90, 220)
    img[70:110, 100:150] = img[10:50, 0:50]
    return img


@pytest.fixture(scope="module", params=["fixture", "other"])
def picture(request, image):
    return image if request.param == "fixture" else other_image()


def projected(model, image):
    """V (N, D): the projector's output for LLaVA's CLIP features, and those features (N, Dv)."""
    with torch.no_grad():
        out = model.vision_tower(model.prepare(image).clip_pixels, output_hidden_states=True)
        feats = out.hidden_states[model.config.vision_feature_layer][0, 1:]
        return model.projector(feats[None])[0], feats


def divprune_reference(v, k, nearest=True, aggregate="min"):
    """Greedy selection (patch indices, in selection order). `nearest=False` and `aggregate="sum"` are bugs."""
    x = v.double()
    x = x / x.norm(dim=1, keepdim=True)
    d = 1.0 - x @ x.T
    s = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(d, 2, dim=0, largest=False).values[1 if nearest else 0]
        elif aggregate == "min":
            scores = d[s].min(0).values
        else:
            scores = d[s].sum(0)
        s.append(int(torch.argmax(scores)))
    return s


def run(model, image, spec):
    return model.segment(image, QUERY, create_method(spec, info=model.info))


def kept(model, r):
    """The image tokens' patches, checked to be the same in every LLM layer (DivPrune prunes before the LLM)."""
    layers = r.trace.kept_patches
    assert len(layers) == model.info.n_layers and all(p == layers[0] for p in layers)
    assert r.trace.image_tokens_per_layer == [len(layers[0])] * model.info.n_layers
    return [int(p) for p in layers[0]]


@pytest.mark.parametrize("spec, k", [
    ("divprune:keep=1", 1),
    ("divprune:keep=25", 25),
    ("divprune:keep=64", 64),
    ("divprune:keep=200", 200),
    ("divprune", 25),  # default subset_ratio 0.098: int(round(25.088))
    ("divprune:subset_ratio=0.098", 25),
    ("divprune:subset_ratio=0.1", 26),  # round(25.6); truncating with int() would keep 25
    ("divprune:subset_ratio=0.048828125", 12),  # 12.5: Python's round (official int(round(...))) goes to even
    ("divprune:subset_ratio=0.5,keep=40", 40),  # keep overrides subset_ratio
])
def test_raster_order_keeps_the_sorted_greedy_selection(tiny, picture, spec, k):
    v, _ = projected(tiny, picture)
    want = divprune_reference(v, k)
    assert len(set(want)) == k
    assert kept(tiny, run(tiny, picture, spec)) == sorted(want)


@pytest.mark.parametrize("k", [40, 200])
def test_selection_order_keeps_the_greedy_order(tiny, picture, k):
    v, _ = projected(tiny, picture)
    want = divprune_reference(v, k)
    assert want != sorted(want)  # a raster-order (sorted) trace would fail
    assert kept(tiny, run(tiny, picture, f"divprune:keep={k},order=selection")) == want


def test_budget_keeps_a_quarter(tiny, image):
    r = run(tiny, image, "divprune@75%")
    assert r.trace.image_tokens_per_layer == [64] * tiny.info.n_layers  # round(0.25 * 256)
    v, _ = projected(tiny, image)
    assert kept(tiny, r) == sorted(divprune_reference(v, 64))


def test_plausible_bugs_give_other_selections(tiny, picture):
    """The greedy order is the reference's, and each plausible mistake would have produced another one: on both
    images, scoring step 0 by the smallest distance (a token's zero distance to itself: the argmax of rounding noise),
    selecting on the CLIP features instead of the projected
    embeddings, or scoring later steps by the summed distance to the selected set (max-sum instead of max-min)."""
    v, feats = projected(tiny, picture)
    got = kept(tiny, run(tiny, picture, "divprune:keep=40,order=selection"))
    assert got == divprune_reference(v, 40)
    assert got[:1] != divprune_reference(v, 1, nearest=False)
    assert got != divprune_reference(feats, 40)
    assert got != divprune_reference(v, 40, aggregate="sum")

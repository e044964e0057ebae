"""In-LLM methods (FastV, PyramidDrop, FEATHER) against independent references built from stock eager attention,
and the budget mappings."""

from __future__ import annotations

import pytest
import torch

from harness.engine import causal_mask
from harness.method import BUDGET_TOLERANCE, create_method
from harness.state import Kind
from tests.conftest import QUERY
from tests.reference import assembled_sequence


def _eager_weights(layer, rotary, h, positions):
    """(H, n, n) attention probabilities of a stock eager LlamaAttention on hidden states `h`."""
    mask = causal_mask(h.shape[1], h.dtype, h.device)
    _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rotary(h, positions[None]),
                           attention_mask=mask)
    return w[0]


def _eager_kept(model, image, method, boundaries, keep_counts, query_row, policy):
    """Kept vision patches at each boundary, recomputed layer by layer with stock eager layers.

    At a boundary b the tokens are ranked by the eager attention of layer `b - 1` (FastV: the last layer before the
    drop, on its own input) or of layer `b` on its pre-drop input (PyramidDrop), head mean, query row chosen by
    `query_row(kind)`.
    """
    lm = model.language_model
    state = assembled_sequence(model, image, QUERY, method)
    h, kind, patch, index = state.hidden, state.kind, state.patch, state.index
    kept, prev_w = {}, None
    with torch.inference_mode():
        for i, layer in enumerate(lm.layers):
            pos = torch.arange(h.shape[1]) if policy == "reindex" else index
            if i in boundaries:
                w = prev_w if policy == "original" else _eager_weights(layer, lm.rotary_emb, h, pos)
                img = (kind == Kind.IMAGE).nonzero().squeeze(1)
                scores = w.mean(0)[query_row(kind), img]
                top = img[scores.topk(keep_counts[boundaries.index(i)]).indices]
                keep = (kind != Kind.IMAGE)
                keep[top] = True
                h, kind, patch, index = h[:, keep], kind[keep], patch[keep], index[keep]
                pos = torch.arange(h.shape[1]) if policy == "reindex" else index
                kept[i] = sorted(patch[kind == Kind.IMAGE].tolist())
            prev_w = _eager_weights(layer, lm.rotary_emb, h, pos)
            h = layer(h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device),
                      position_embeddings=lm.rotary_emb(h, pos[None]))
    return kept


def _before_seg(kind):
    return int((kind == Kind.SEG).nonzero()[0, 0]) - 1


def test_fastv_schedule_and_kept_tokens_equal_eager_attention(tiny_eager, image):
    m = create_method("fastv:k=2,ratio=0.5")
    r = tiny_eager.segment(image, QUERY, m)
    assert r.trace.image_tokens_per_layer == [256, 256] + [128] * 6
    ref = _eager_kept(tiny_eager, image, m, [2], [128], lambda kind: len(kind) - 1, "original")
    assert sorted(r.trace.kept_patches[2]) == ref[2]


def test_fastv_seg_row_option_ranks_with_the_seg_predicting_token(tiny_eager, image):
    m = create_method("fastv:k=3,keep=40,score=seg")
    r = tiny_eager.segment(image, QUERY, m)
    ref = _eager_kept(tiny_eager, image, m, [3], [40], _before_seg, "original")
    assert sorted(r.trace.kept_patches[3]) == ref[3]
    last = _eager_kept(tiny_eager, image, m, [3], [40], lambda kind: len(kind) - 1, "original")
    assert ref[3] != last[3]  # the option changes the choice (otherwise this test could not tell them apart)


def test_pdrop_default_is_scaled_to_depth_and_matches_eager_reference(tiny_eager, image):
    m = create_method("pdrop")
    r = tiny_eager.segment(image, QUERY, m)
    assert r.trace.image_tokens_per_layer == [256, 256, 128, 128, 64, 64, 32, 32]  # [8,16,24] of 32 -> [2,4,6]
    ref = _eager_kept(tiny_eager, image, m, [2, 4, 6], [128, 64, 32], _before_seg, "reindex")
    for b in (2, 4, 6):
        assert sorted(r.trace.kept_patches[b]) == ref[b]


def test_pdrop_official_schedule_on_32_layers():
    from harness.method import ModelInfo

    info = ModelInfo(n_layers=32, n_image_tokens=576, grid=(24, 24), hidden_size=4096, n_heads=32, n_kv_heads=32,
                     head_dim=128, intermediate_size=11008, vision_layers=23, vision_hidden_size=1024)
    sched = create_method("pdrop").image_schedule(info)
    assert sched == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert sum(sched) / 32 == 270  # the reference notes' 576 * 15 / 32


@pytest.mark.parametrize("spec", ["fastv@50%", "fastv@75%", "fastv@navg=100", "pdrop@50%", "pdrop@65%",
                                  "pdrop@75%", "random@70%", "fastv:score=seg@80%", "dart@50%", "dart@75%",
                                  "dart:positions=reindex@80%", "divprune@75%", "divprune@90%", "vispruner@50%",
                                  "vispruner@90%"])
def test_budget_mappings_hit_the_target_on_the_model(spec, tiny, image):
    from harness.method import split_budget

    method = create_method(spec, info=tiny.info)
    target = split_budget(spec)[1].target(tiny.info)
    r = tiny.segment(image, QUERY, method)
    assert abs(r.trace.n_avg - target) <= BUDGET_TOLERANCE * tiny.info.n_image_tokens
    if spec.startswith("fastv:"):
        assert method.score == "seg"  # fixed parameters stay fixed


def test_budget_errors_say_how_to_fix(tiny, image):
    with pytest.raises(ValueError, match="depends on the model"):
        create_method("fastv@75%")
    with pytest.raises(ValueError, match="out of reach"):
        create_method("fastv@95%", info=tiny.info)  # one full layer of 8 already averages 32 of 256
    with pytest.raises(ValueError, match="no budget mapping"):
        create_method("none@50%", info=tiny.info)
    with pytest.raises(ValueError, match="write @75%, @0.75"):
        create_method("fastv@lots", info=tiny.info)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        create_method("fastv@150%", info=tiny.info)
    with pytest.raises(ValueError, match="cannot reach"):
        create_method("downsample@60%", info=tiny.info)  # strides give 256, 64, 36, ...: nothing near 102
    with pytest.raises(ValueError, match="keep is what @75% solves for"):
        create_method("fastv:keep=40@75%", info=tiny.info)
    with pytest.raises(ValueError, match="ratio is what @50%"):
        create_method("pdrop:ratio=0.9@0.5", info=tiny.info)
    with pytest.raises(ValueError, match="cannot reach"):
        create_method("dart@90%", info=tiny.info)  # DART reads layer K-1 >= 0: one full layer of 8 is 32 > 25.6
    with pytest.raises(ValueError, match="lower truncation"):
        tiny.segment(None, QUERY, "dart:truncation=256")  # 4 + 8 x 32 = 260 > 256 tokens
    with pytest.raises(ValueError, match="lower pivot_text"):  # the schedule would count pivots that do not exist
        tiny.segment(image, QUERY, "dart:pivot_text=400,truncation=0")


def test_budget_specs_are_canonical_and_parse_back(tiny):
    from harness.runner import canonical_spec

    assert canonical_spec("pdrop:layer_list=[1, 2, 4]@0.75") == "pdrop:layer_list=[1,2,4]@75%"
    assert canonical_spec("fastv:k=1.0 @ 75%") == canonical_spec("fastv:k=1@75%") == "fastv:k=1@75%"
    assert canonical_spec("fastv@navg=64") == "fastv@navg=64.0"
    for spec in ("pdrop:layer_list=[1,2,4]@75%", "fastv:k=1@75%", "fastv@navg=64.0"):
        create_method(spec, info=tiny.info)
    with pytest.raises(ValueError, match="solves for"):
        canonical_spec("fastv:keep=null@75%")


def test_grid_keeps_budget_specs_and_resolves_them_per_model(tmp_path):
    import json

    from harness.runner import expand_grid, load_run, run_grid

    cells = expand_grid(["random:tiny"], ["fastv:score=seg@75%"], ["shapes-ref:val"], limit=2)
    assert cells[0].method == "fastv:score=seg@75%"
    with pytest.raises(ValueError, match="unknown parameter"):
        expand_grid(["random:tiny"], ["fastv:kk=2@75%"], ["shapes-ref:val"])
    rows = run_grid(cells, tmp_path)
    assert rows[0]["resolved"].startswith("fastv:k=1,") and rows[0]["n_avg"] == pytest.approx(64, abs=5.2)
    assert load_run(tmp_path)[0]["resolved"] == rows[0]["resolved"]
    meta = tmp_path / "cells" / f"{rows[0]['cell']}.json"  # as if the mapping had changed since the records were made
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "resolved_method": "fastv:k=2,keep=10"}))
    with pytest.raises(ValueError, match="was made with fastv:k=2,keep=10"):
        run_grid(cells, tmp_path)


def _no_rope_image_scores(model, h, layer_idx, q_row, img):
    """Head mean of the stock eager attention of one layer with RoPE switched off (cos 1, sin 0), each head's
    probabilities renormalised over the image keys (FEATHER's softmax over image keys only)."""
    layer = model.language_model.layers[layer_idx]
    hd = layer.self_attn.head_dim
    ident = (torch.ones(1, h.shape[1], hd), torch.zeros(1, h.shape[1], hd))
    _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=ident,
                           attention_mask=causal_mask(h.shape[1], h.dtype, h.device))
    p = w[0][:, q_row, img]
    return (p / p.sum(-1, keepdim=True)).mean(0)


@pytest.mark.parametrize("layers", [None, [2, 3]])  # default: [8, 16] of 32 -> [2, 4]; adjacent drops too
def test_feather_two_stages_equal_an_eager_no_rope_reference(tiny_eager, image, layers):
    first, second = layers or (2, 4)
    m = create_method("feather", layers=layers)  # R = 0.7; stride 3
    r = tiny_eager.segment(image, QUERY, m)
    lm = tiny_eager.language_model
    state = assembled_sequence(tiny_eager, image, QUERY, m)
    h, kind, patch, index = state.hidden, state.kind, state.patch, state.index
    grid = {r_ * 16 + c for r_ in range(0, 16, 3) for c in range(0, 16, 3)}
    expected, prev_h = {}, None
    with torch.inference_mode():
        for i, layer in enumerate(lm.layers):
            if i in (first, second):
                img = (kind == Kind.IMAGE).nonzero().squeeze(1)
                scores = _no_rope_image_scores(tiny_eager, prev_h, i - 1, len(kind) - 1, img)
                keep_n = int(len(img) * 0.3) if i == first else int(len(img) * 0.3 ** 2)
                top = set(img[scores.topk(keep_n).indices].tolist())
                if i == first:
                    top |= {int(row) for row in img if int(patch[row]) in grid}
                keep = kind != Kind.IMAGE
                keep[sorted(top)] = True
                h, kind, patch, index = h[:, keep], kind[keep], patch[keep], index[keep]
                expected[i] = sorted(patch[kind == Kind.IMAGE].tolist())
            prev_h = h
            h = layer(h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device),
                      position_embeddings=lm.rotary_emb(h, index[None]))
    assert sorted(r.trace.kept_patches[first]) == expected[first]
    assert sorted(r.trace.kept_patches[second]) == expected[second]
    n1 = len(expected[first])
    assert 76 <= n1 <= 76 + 36
    assert r.trace.image_tokens_per_layer == [256] * first + [n1] * (second - first) + [int(n1 * 0.09)] * (8 - second)


def test_feather_budget_mapping_is_close_on_an_image(tiny, image):
    m = create_method("feather@75%", info=tiny.info)
    r = tiny.segment(image, QUERY, m)
    assert abs(r.trace.n_avg - 64) <= 0.05 * 256  # data-dependent: the grid's overlap with the top set varies

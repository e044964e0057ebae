"""SparseVLM against an independent layer-by-layer reference built from stock eager attention, an independent
DPC-kNN, the official schedules and the budget mapping."""

from __future__ import annotations

import pytest
import torch

from harness.engine import causal_mask
from harness.ledger import patch_shares
from harness.method import BUDGET_TOLERANCE, ModelInfo, create_method, split_budget
from harness.methods.sparsevlm import SparseVLM
from harness.state import Kind
from tests.conftest import QUERY
from tests.reference import assembled_sequence

LLAVA_7B = ModelInfo(n_layers=32, n_image_tokens=576, grid=(24, 24), hidden_size=4096, n_heads=32, n_kv_heads=32,
                     head_dim=128, intermediate_size=11008, vision_layers=23, vision_hidden_size=1024)
TINY_LAYERS = [0, 1, 3]  # [2, 6, 15] of 32 scaled to 8 layers stage by stage: 3/4/9/16 of 32 -> 1/1/2/4 of 8
TINY_KEEP = [133, 89, 49]  # retain 192: [300, 200, 110] of 576 scaled to 256


class Spy(SparseVLM):
    """SparseVLM that records its raters and the state it hands to every layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.raters, self.states = None, {}

    def on_sequence(self, state, ctx):
        out = super().on_sequence(state, ctx)
        self.raters = ctx.scratch.get("sparsevlm_raters")
        return out

    def before_layer(self, i, state, ctx):
        out = super().before_layer(i, state, ctx)
        self.states[i] = out
        return out


def _reference_raters(hidden, kind):
    """Offsets (after the image) of the text tokens whose mean-over-image softmax-over-text score beats the mean."""
    img = (kind == Kind.IMAGE).nonzero().squeeze(1)
    answer = int(((kind == Kind.SEG) | (kind == Kind.ANSWER)).nonzero()[0, 0])  # the prompt ends before it
    v, t = hidden[0, img], hidden[0, int(img[-1]) + 1:answer]
    score = torch.softmax(torch.einsum("md,td->mt", v, t), dim=1).mean(0)
    return torch.where(score > score.mean())[0]


def _reference_dpc_knn(x, k):
    """The official `cluster_and_merge` for one sample, written out: direct pairwise differences, no noise."""
    n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / c ** 0.5
    nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).to(x.dtype)
    parent, _ = (dist * mask + dist.max() * (1 - mask)).min(dim=-1)
    _, centres = torch.topk(parent * density, k=k)
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(k)
    merged = torch.stack([x[assign == j].mean(0) for j in range(k)])
    return merged, [sorted((assign == j).nonzero().squeeze(1).tolist()) for j in range(k)]


def _eager_head_mean(layer, rotary, h, positions):
    """(n, n) head-mean attention probabilities of a stock eager LlamaAttention on hidden states `h`."""
    _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rotary(h, positions[None]),
                           attention_mask=causal_mask(h.shape[1], h.dtype, h.device))
    return w[0].mean(0)


def _reference_run(model, image, layers, keep, recycle):
    """Layer by layer with stock eager layers and re-indexed positions: the pruning layer runs on all tokens, its
    head-mean attention (rows: raters, columns: image tokens, mean over raters) ranks the image tokens, its output
    keeps the top k, and (recycling) the top 30% + 1 pruned tokens are DPC-kNN merged and inserted after the kept
    image tokens.

    Returns:
        kept patches per layer after each drop, merged tokens per layer (with the candidates' hidden states and the
        cluster members), and the final normed hidden state of the [SEG] source token.
    """
    lm = model.language_model
    state = assembled_sequence(model, image, QUERY, SparseVLM())
    h, kind, patch = state.hidden, state.kind, state.patch
    raters = _reference_raters(h, kind)
    kept, merged_at = {}, {}
    with torch.inference_mode():
        for i, layer in enumerate(lm.layers):
            pos = torch.arange(h.shape[1])
            w = _eager_head_mean(layer, lm.rotary_emb, h, pos) if i in layers else None
            h = layer(h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device),
                      position_embeddings=lm.rotary_emb(h, pos[None]))
            if w is None:
                continue
            img = (kind == Kind.IMAGE).nonzero().squeeze(1)
            rel = w[int(img[-1]) + 1 + raters][:, img].mean(0)
            k = keep[layers.index(i)]
            top = rel.topk(k).indices
            keep_rows = kind != Kind.IMAGE
            keep_rows[img[top]] = True
            new_h, new_kind, new_patch = h[:, keep_rows], kind[keep_rows], patch[keep_rows]
            if recycle:
                pruned = torch.ones(len(img), dtype=torch.bool)
                pruned[top] = False
                pruned = pruned.nonzero().squeeze(1)
                n_cand = int(len(pruned) * 0.3) + 1
                cand = pruned[rel[pruned].topk(n_cand).indices]
                x = h[0, img[cand]]
                merged, members = _reference_dpc_knn(x, int(n_cand / 10) + 1)
                at = int((new_kind == Kind.IMAGE).nonzero()[-1, 0]) + 1
                c = len(merged)
                new_h = torch.cat([new_h[:, :at], merged[None], new_h[:, at:]], 1)
                new_kind = torch.cat([new_kind[:at], torch.full((c,), int(Kind.IMAGE), dtype=kind.dtype),
                                      new_kind[at:]])
                new_patch = torch.cat([new_patch[:at], torch.full((c,), -1), new_patch[at:]])
                merged_at[i + 1] = (merged, x, members, patch[img[cand]].tolist())
            h, kind, patch = new_h, new_kind, new_patch
            kept[i + 1] = sorted(patch[kind == Kind.IMAGE].tolist())
        src = int((kind == Kind.SEG).nonzero()[0, 0]) - 1
        return kept, merged_at, lm.norm(h[:, src])


# -- raters ---------------------------------------------------------------------------------------------------------
def test_raters_equal_an_independent_computation_from_the_embeddings(tiny, image):
    spy = Spy()
    tiny.segment(image, QUERY, spy)
    state = assembled_sequence(tiny, image, QUERY, spy)
    expected = _reference_raters(state.hidden, state.kind)
    n_text = state.last_prompt_row - int(state.image_rows[-1])
    assert spy.raters.tolist() == expected.tolist()
    assert 0 < len(expected) < n_text  # a strict subset: the test could tell "all text" from the raters


# -- schedules ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("retain", "kept"), [(192, [300, 200, 110]), (128, [303, 110, 36]), (96, [238, 48, 26]),
                                              (64, [66, 30, 17])])
def test_official_schedules_on_32_layers(retain, kept):
    sched = create_method("sparsevlm", retain=retain, recycle=False).image_schedule(LLAVA_7B)
    assert sched == [576] * 3 + [kept[0]] * 4 + [kept[1]] * 9 + [kept[2]] * 16  # layer 2 runs on all 576


def test_recycled_tokens_add_to_the_32_layer_schedule():
    # 576 - 300 = 276 pruned -> int(82.8) + 1 = 83 candidates -> 9 clusters; 309 - 200 = 109 -> 33 -> 4;
    # 204 - 110 = 94 -> 29 -> 3
    assert create_method("sparsevlm").image_schedule(LLAVA_7B) == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16


def test_defaults_are_scaled_to_the_tiny_model(tiny):
    m = create_method("sparsevlm")
    assert m.pruning_layers(tiny.info) == TINY_LAYERS and m.keep_counts(tiny.info) == TINY_KEEP


# -- recycling off: kept tokens -------------------------------------------------------------------------------------
def test_without_recycling_counts_follow_the_schedule_and_kept_tokens_equal_eager_reference(tiny_eager, image):
    m = create_method("sparsevlm:recycle=false")
    r = tiny_eager.segment(image, QUERY, m)
    assert r.trace.image_tokens_per_layer == [256, 133, 89, 89, 49, 49, 49, 49] == m.image_schedule(tiny_eager.info)
    kept, _, seg = _reference_run(tiny_eager, image, TINY_LAYERS, TINY_KEEP, recycle=False)
    for layer in [p + 1 for p in TINY_LAYERS]:  # the first layer after each pruning layer
        assert sorted(r.trace.kept_patches[layer]) == kept[layer]
    assert (r.seg_hidden - seg).abs().max() <= 1e-4


def test_ranking_uses_the_raters_not_the_last_token(tiny_eager, image):
    """The reference with the last token as the only rater chooses other tokens (so the kept-token test can fail)."""
    lm = tiny_eager.language_model
    state = assembled_sequence(tiny_eager, image, QUERY, SparseVLM())
    h = state.hidden
    with torch.inference_mode():
        h = lm.layers[0](h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device),
                         position_embeddings=lm.rotary_emb(h, torch.arange(h.shape[1])[None]))
        w = _eager_head_mean(lm.layers[1], lm.rotary_emb, h, torch.arange(h.shape[1]))
    img = state.image_rows
    raters = int(img[-1]) + 1 + _reference_raters(state.hidden, state.kind)
    by_raters = set(w[raters][:, img].mean(0).topk(133).indices.tolist())
    by_last = set(w[-1, img].topk(133).indices.tolist())
    assert by_raters != by_last


# -- recycling on: merged tokens ------------------------------------------------------------------------------------
def test_recycled_tokens_are_dpc_knn_cluster_means_of_the_pruned_tokens(tiny_eager, image):
    spy = Spy()
    r = tiny_eager.segment(image, QUERY, spy)
    assert r.trace.image_tokens_per_layer == [256, 137, 91, 91, 51, 51, 51, 51] == spy.image_schedule(tiny_eager.info)
    kept, merged_at, seg = _reference_run(tiny_eager, image, TINY_LAYERS, TINY_KEEP, recycle=True)
    for layer, pruned in zip([p + 1 for p in TINY_LAYERS], (256 - 133, 137 - 89, 91 - 49), strict=True):
        merged, cand, members, cand_patches = merged_at[layer]
        n_cand = int(pruned * 0.3) + 1
        assert len(cand) == n_cand and len(merged) == int(n_cand / 10) + 1
        st = spy.states[layer]
        img = st.image_rows
        new = img[-len(merged):]  # inserted right after the kept image tokens
        assert (st.patch[new] <= -2).all() and int(new[-1]) + 1 == int((st.kind == Kind.QUERY).nonzero()[0, 0])
        assert torch.allclose(st.hidden[0, new], merged, atol=1e-5)
        for vec, idx in zip(merged, members, strict=True):  # each merged vector is the mean of its members
            assert torch.allclose(vec, cand[idx].mean(0), atol=1e-6)
        assert sorted(p for p in st.patch[img].tolist() if p >= 0) == [p for p in kept[layer] if p >= 0]
        assert any(len(idx) > 1 for idx in members)  # real merging happened
        if layer == TINY_LAYERS[0] + 1:  # candidates are single patches: each merged token covers its cluster's
            for code, idx in zip(st.patch[new].tolist(), members, strict=True):
                want = {cand_patches[j]: 1 / len(idx) for j in idx}
                assert patch_shares(code, r.trace.members) == pytest.approx(want)
    assert (r.seg_hidden - seg).abs().max() <= 1e-4


def test_merged_tokens_keep_rows_ordered_and_text_indices_intact(tiny, image):
    spy = Spy()
    tiny.segment(image, QUERY, spy)
    st = spy.states[2]
    assert (st.index[1:] >= st.index[:-1]).all()
    img = st.image_rows
    merged = img[st.patch[img] <= -2]
    assert (st.index[merged] == st.index[merged[0] - 1]).all()  # the index of the last kept image token
    text = st.kind != Kind.IMAGE
    assert st.index[text].unique().numel() == int(text.sum())
    assert st.seg_source_row == int((st.kind == Kind.SEG).nonzero()[0, 0]) - 1


def test_recycle_flag_changes_the_run(tiny, image):
    a = tiny.segment(image, QUERY, "sparsevlm")
    b = tiny.segment(image, QUERY, "sparsevlm:recycle=false")
    merged = [sum(c <= -2 for c in layer) for layer in (a.trace.kept_patches[1], b.trace.kept_patches[1])]
    assert merged == [137 - 133, 0]  # layer 0's output: 133 kept, plus 4 recycled with recycling on
    assert (a.seg_hidden - b.seg_hidden).abs().max() > 1e-4


# -- budgets --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["sparsevlm@50%", "sparsevlm:recycle=false@50%", "sparsevlm@navg=100",
                                  "sparsevlm:recycle=false@65%", "sparsevlm@20%"])
def test_budget_mapping_hits_the_target(spec, tiny, image):
    method = create_method(spec, info=tiny.info)
    target = split_budget(spec)[1].target(tiny.info)
    r = tiny.segment(image, QUERY, method)
    assert abs(r.trace.n_avg - target) <= BUDGET_TOLERANCE * tiny.info.n_image_tokens
    assert method.recycle == ("recycle=false" not in spec)


def test_budget_mapping_on_32_layers_scales_the_192_schedule():
    m = create_method("sparsevlm:recycle=false@navg=202.75", info=LLAVA_7B)
    assert m.keep == [300, 200, 110]  # the retain-192 schedule itself, counted as the ledger counts it
    m = create_method("sparsevlm@navg=100", info=LLAVA_7B)
    s = m.image_schedule(LLAVA_7B)
    assert abs(sum(s) / 32 - 100) <= BUDGET_TOLERANCE * 576


def test_layers_keep_each_stages_official_share_of_the_depth(tiny):
    from harness.methods.sparsevlm import scale_pruning_layers

    assert scale_pruning_layers(32) == [2, 6, 15] and scale_pruning_layers(8) == [0, 1, 3]
    assert scale_pruning_layers(40) == [3, 8, 19]  # stages of 4, 5, 11, 20 layers: 3/4/9/16 of 32 times 1.25
    full = create_method("sparsevlm:recycle=false").image_schedule(LLAVA_7B)
    tiny_sched = create_method("sparsevlm:recycle=false").image_schedule(tiny.info)
    official, scaled = sum(full) / len(full) / 576, sum(tiny_sched) / len(tiny_sched) / 256
    assert abs(scaled - official) < 0.04, (scaled, official)  # 8 layers: 37.3% of the tokens; 32 layers: 35.6%


def test_budget_errors_say_how_to_fix(tiny):
    with pytest.raises(ValueError, match="out of reach"):
        create_method("sparsevlm@90%", info=tiny.info)  # layer 0 runs on all 256 tokens: N_avg >= 32
    with pytest.raises(ValueError, match="keep is what @50% solves for"):
        create_method("sparsevlm:keep=[10,5,2]@50%", info=tiny.info)
    with pytest.raises(ValueError, match="give 3 layers"):
        create_method("sparsevlm:layers=[1,3]@50%", info=tiny.info)


# -- bad parameters -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "match"), [
    ("sparsevlm:retain=100", "retain.*192"),
    ("sparsevlm:keep=[0,5,2]", "keep must be image-token counts"),
    ("sparsevlm:keep=[10,20,5]", "must not increase"),
    ("sparsevlm:keep=[10,-1,5]", "must not increase"),
    ("sparsevlm:layers=[4,2,1]", "increasing layer indices"),
    ("sparsevlm:layers=[1,2],keep=[10,5,2]", "one keep count per pruning layer"),
])
def test_bad_parameters_raise_with_a_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        create_method(spec)


def test_retain_is_checked_by_the_class_too():
    with pytest.raises(ValueError, match="retain must be one of 192, 128, 96, 64"):
        SparseVLM(retain=100)


@pytest.mark.parametrize(("spec", "match"), [
    ("sparsevlm:keep=[300,200,100]", "exceeds the model's 256 image tokens"),
    ("sparsevlm:keep=[100,50]", "give one count per layer"),
    ("sparsevlm:layers=[1,7],keep=[100,50]", "leaves no layer"),
])
def test_parameters_that_do_not_fit_the_model_raise_before_running(spec, match, tiny, image):
    with pytest.raises(ValueError, match=match):
        tiny.segment(image, QUERY, spec)

"""DART (Wen et al., EMNLP'25, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More") against an independent reference.

The reference transcribes the official `get_retained_image_token` (llava/model/language_model/modeling_llama_self.py,
LLaVA-1.5 path) line by line, CPython set iteration order included, and feeds it from stock transformers pieces run
on the full assembled sequence (positions 0..L-1): layer K-1's post-RoPE keys (k_proj, `apply_rotary_pos_emb`,
`repeat_kv`) for the L1-norm pivots, the final RMSNorm of layer K-1's output for the cosine similarities. It then keeps
the prompt, the retained image rows and all text, and runs layers K.. (stock `LlamaDecoderLayer`s) on the raw residual
stream of the kept rows with their original position ids (gaps and all), or 0..L'-1 under `positions=reindex`.

The model is a copy of `tiny` whose RMSNorm weights are random (they are all ones in `random:tiny`, where the cosine
similarities of any RMSNorm's output are the same and a wrong norm could not be seen).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from harness.engine import causal_mask
from harness.method import BUDGET_TOLERANCE, create_method, split_budget
from harness.state import Kind
from tests.conftest import QUERY
from tests.reference import assembled_sequence

BUGS = ("layer_norm", "pre_rope", "query_only", "sorted", "no_removal")


@pytest.fixture(scope="module")
def model(tiny):
    m = copy.deepcopy(tiny)
    g = torch.Generator().manual_seed(1)  # a seed under which an answer token is a text pivot
    with torch.no_grad():
        for mod in m.language_model.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.copy_(0.2 + 1.6 * torch.rand(mod.weight.shape, generator=g))
    return m


_RUNS = {}


def _run(model, image, spec):
    """One harness run per spec, shared by the tests (`model` and `image` are one per module)."""
    if spec not in _RUNS:
        _RUNS[spec] = model.segment(image, QUERY, create_method(spec, info=model.info))
    return _RUNS[spec]


def _layer(lm, layer, h, pos):
    return layer(h, attention_mask=causal_mask(h.shape[1], h.dtype, h.device),
                 position_embeddings=lm.rotary_emb(h, pos[None]))


def _keys(lm, layer, h, pos, rope=True):
    """(L, heads * head_dim) keys of a stock layer on input `h`, after RoPE, repeated to every query head."""
    attn, n = layer.self_attn, h.shape[1]
    x = layer.input_layernorm(h)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    if rope:
        cos, sin = lm.rotary_emb(x, pos[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return repeat_kv(k, attn.num_key_value_groups)[0].transpose(0, 1).reshape(n, -1)


def _retained(last_layer_state, any_states, s, n, m, p_img, p_txt, text_end, bug=None):
    """The official get_retained_image_token; `bug` switches in one plausible mistake."""
    token_topk = math.ceil(m // (p_img + p_txt))
    k_img, k_txt = any_states[s:s + n], any_states[s + n:text_end]
    image_indices = (torch.norm(k_img, p=1, dim=-1).topk(p_img).indices + s).tolist()
    query_indices = (torch.norm(k_txt, p=1, dim=-1).topk(p_txt).indices + s + n).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(s, s + n)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    order = sorted(indices_set) if bug == "sorted" else list(indices_set)
    for item in order:
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        if bug != "no_removal":
            valid_indices.difference_update(top_k_real_indices)
            valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return list(indices_set)


def _reference(model, image, k=2, m=128, p_img=4, p_txt=4, policy="original", bug=None):
    """(sorted kept patches at layer k, [SEG] source row's final normed state) of the reference."""
    lm = model.language_model
    state = assembled_sequence(model, image, QUERY, create_method("none"))
    h, kind, patch = state.hidden, state.kind, state.patch
    n_all = h.shape[1]
    pos = torch.arange(n_all, device=h.device)
    assert torch.equal(state.position, pos) and torch.equal(state.index, pos)
    img = state.row_of(Kind.IMAGE)
    s, n = int(img[0]), img.numel()
    assert torch.equal(img, torch.arange(s, s + n, device=h.device)) and torch.equal(patch[img].cpu(), torch.arange(n))
    # "query_only": text pivots among the user's text only, not the teacher-forced answer "[SEG] . </s>"
    text_end = int(((kind == Kind.ANSWER) | (kind == Kind.SEG)).nonzero()[0, 0]) if bug == "query_only" else n_all
    with torch.inference_mode():
        for layer in lm.layers[:k - 1]:
            h = _layer(lm, layer, h, pos)
        any_states = _keys(lm, lm.layers[k - 1], h, pos, rope=bug != "pre_rope")
        h = _layer(lm, lm.layers[k - 1], h, pos)
        norm = lm.layers[k].input_layernorm if bug == "layer_norm" else lm.norm
        retained = _retained(norm(h)[0], any_states, s, n, m, p_img, p_txt, text_end, bug)
        keep = torch.tensor(sorted([*range(s), *retained, *range(s + n, n_all)]), device=h.device)
        h, kind, patch = h[:, keep], kind[keep], patch[keep]
        pos = keep if policy == "original" else torch.arange(keep.numel(), device=h.device)
        for layer in lm.layers[k:]:
            h = _layer(lm, layer, h, pos)
        src = int((kind == Kind.SEG).nonzero()[0, 0]) - 1
        return sorted(patch[kind == Kind.IMAGE].tolist()), lm.norm(h[:, src])


CASES = [  # spec, K, M
    ("dart", 2, 128),
    ("dart:truncation=64", 2, 64),
    ("dart:k=1,truncation=60", 1, 60),
    ("dart:k=3,truncation=64", 3, 64),
]


@pytest.mark.parametrize("spec,k,m", CASES)
def test_kept_patches_and_counts_equal_the_official_selection(model, image, spec, k, m):
    # fails on: final norm -> layer K's input_layernorm, pre-RoPE keys, text pivots among the query only, sorted
    # pivot order, no removal from the pool (test_each_bug_changes_the_reference shows these cases tell them apart)
    r = _run(model, image, spec)
    kept, _ = _reference(model, image, k=k, m=m)
    n_kept = 4 + 8 * (m // 8)  # floor: M=60 -> 7 per pivot -> 60; M=64 -> 68; M=128 -> 132 (the official overshoot)
    assert len(kept) == n_kept
    assert r.trace.image_tokens_per_layer == [256] * k + [n_kept] * (8 - k)
    assert all(r.trace.kept_patches[i] == list(range(256)) for i in range(k))
    assert sorted(r.trace.kept_patches[k]) == kept
    assert all(r.trace.kept_patches[i] == r.trace.kept_patches[k] for i in range(k, 8))


@pytest.mark.parametrize("spec,k,m", CASES)
def test_forward_after_the_drop_equals_stock_layers_with_original_positions(model, image, spec, k, m):
    # fails on: reindexed positions, the normed (not raw) residual kept, or any wrong kept set
    r = _run(model, image, spec)
    _, seg = _reference(model, image, k=k, m=m)
    torch.testing.assert_close(r.seg_hidden, seg, rtol=0, atol=1e-5)
    _, reindexed = _reference(model, image, k=k, m=m, policy="reindex")
    assert (seg - reindexed).abs().max() > 1e-3  # the position ids are seen at this tolerance


def test_positions_reindex_override_uses_contiguous_ids(model, image):
    r = _run(model, image, "dart:positions=reindex")
    kept, seg = _reference(model, image, policy="reindex")
    assert sorted(r.trace.kept_patches[2]) == kept
    torch.testing.assert_close(r.seg_hidden, seg, rtol=0, atol=1e-5)
    assert (r.seg_hidden - _run(model, image, "dart").seg_hidden).abs().max() > 1e-3


def test_budget_spec_resolves_to_parameters_the_reference_reproduces(model, image):
    spec = "dart@50%"
    method = create_method(spec, info=model.info)
    p = method.params()
    r = model.segment(image, QUERY, method)
    assert abs(r.trace.n_avg - split_budget(spec)[1].target(model.info)) <= BUDGET_TOLERANCE * 256
    kept, seg = _reference(model, image, k=p["k"], m=p["truncation"], p_img=p["pivot_image"], p_txt=p["pivot_text"])
    assert sorted(r.trace.kept_patches[p["k"]]) == kept
    torch.testing.assert_close(r.seg_hidden, seg, rtol=0, atol=1e-5)


def test_defaults_are_the_official_ones():
    assert create_method("dart").params() == {"k": 2, "truncation": 128, "pivot_image": 4, "pivot_text": 4}


def test_each_bug_changes_the_reference(model, image):
    """Every plausible mistake changes the kept set of the default case (so the comparisons above can fail on it)."""
    right = _reference(model, image)[0]
    for bug in BUGS:
        assert _reference(model, image, bug=bug)[0] != right, bug

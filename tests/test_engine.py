"""The loop against stock transformers, the attention-rows helper against eager attention, the token state."""

from __future__ import annotations

import pytest
import torch

import harness
from harness.engine import attention_rows
from harness.state import Kind
from tests.conftest import QUERY
from tests.reference import assembled_sequence


@pytest.mark.parametrize("backend", ["tiny", "tiny_eager"])
def test_loop_equals_stock_llama_forward(request, backend, image):
    model = request.getfixturevalue(backend)
    state = assembled_sequence(model, image, QUERY, harness.create_method("none"))
    with torch.inference_mode():
        stock = model.language_model(inputs_embeds=state.hidden, use_cache=False).last_hidden_state
    ours = model.segment(image, QUERY, "none").seg_hidden
    src = int(state.row_of(Kind.SEG)[0]) - 1
    assert (ours - stock[:, src]).abs().max() <= 1e-5


def test_eager_loop_is_causal(tiny, tiny_eager, image):
    """Eager attention with no mask is not causal: the loop must build the mask itself."""
    a = tiny.segment(image, QUERY).seg_hidden
    b = tiny_eager.segment(image, QUERY).seg_hidden
    assert (a - b).abs().max() <= 1e-5


def test_attention_rows_match_eager_output_attentions(tiny_eager, image):
    state = assembled_sequence(tiny_eager, image, QUERY, harness.create_method("none"))
    lm = tiny_eager.language_model
    with torch.inference_mode():
        out = lm(inputs_embeds=state.hidden, output_attentions=True, use_cache=False)
        layer = 3
        h_in = lm(inputs_embeds=state.hidden, output_hidden_states=True, use_cache=False).hidden_states[layer]
        rows = torch.tensor([len(state) - 1, 40, 5])
        ours = attention_rows(lm.layers[layer], lm.rotary_emb, h_in, state.index, rows, head_mean=False)
    ref = out.attentions[layer][0][:, rows]  # (H, r, n)
    assert (ours - ref).abs().max() <= 1e-6


def test_hold_and_release_restore_order(tiny, image):
    state = assembled_sequence(tiny, image, QUERY, harness.create_method("none"))
    img = state.image_rows
    held = state.hold("x", img[::3])
    assert len(held) == len(state) - len(img[::3])
    back = held.release("x")
    assert torch.equal(back.index, state.index) and torch.equal(back.hidden, state.hidden)
    assert torch.equal(back.patch, state.patch) and not back.held


def test_trace_and_ledger_agree(tiny, image):
    r = tiny.segment(image, QUERY, "random:k=2,ratio=0.75")
    assert r.trace.image_tokens_per_layer == [256, 256] + [64] * 6
    assert [len(p) for p in r.trace.kept_patches] == r.trace.image_tokens_per_layer
    assert set(r.trace.kept_patches[-1]) <= set(range(256))
    assert r.trace.n_avg == pytest.approx((2 * 256 + 6 * 64) / 8)
    assert r.mask.shape == image.shape[:2] and r.mask.dtype == bool


def test_random_drop_is_seeded_per_sample(tiny, image):
    a = tiny.segment(image, QUERY, "random:ratio=0.5", sample_key="s1").trace.kept_patches[-1]
    b = tiny.segment(image, QUERY, "random:ratio=0.5", sample_key="s1").trace.kept_patches[-1]
    c = tiny.segment(image, QUERY, "random:ratio=0.5", sample_key="s2").trace.kept_patches[-1]
    d = tiny.segment(image, QUERY, "random:ratio=0.5,seed=1", sample_key="s1").trace.kept_patches[-1]
    assert a == b and a != c and a != d


def test_two_models_do_not_interfere(image):
    a = harness.load_model("random:tiny")
    before = a.segment(image, QUERY).seg_hidden
    b = harness.load_model("random:tiny", attn_implementation="eager")
    b.segment(image, QUERY, "random:ratio=0.9")
    assert torch.equal(a.segment(image, QUERY).seg_hidden, before)
    assert a.attn_implementation == "sdpa"


def test_save_and_reload_roundtrip(tmp_path, tiny, image):
    tiny.save_pretrained(tmp_path / "m")
    again = harness.load_model(tmp_path / "m")
    assert torch.equal(again.segment(image, QUERY).seg_hidden, tiny.segment(image, QUERY).seg_hidden)
    assert again.fingerprint() == tiny.fingerprint()

"""The four capabilities of the method contract, each against an independent reference (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

import harness
from harness.state import Kind
from tests.capabilities import LightFFN
from tests.conftest import QUERY
from tests.reference import Recorder, assembled_sequence, masked_reference, unpruned_positions

TOL = 1e-5


def baseline(model, image):
    return model.segment(image, QUERY, "none").seg_hidden


@pytest.mark.parametrize("positions", ["reindex", "original"])
def test_replace_before_projector_matches_stock_forward_on_replaced_tokens(positions, tiny, image):
    """Contiguous ids (the LLaVA splice) or GAP's unpruned ones, given to the stock forward as position_ids."""
    method = harness.create_method(f"test-replace:every=3,positions={positions}")
    ours = tiny.segment(image, QUERY, method)
    assert ours.trace.image_tokens_per_layer == [86] * 8
    state = assembled_sequence(tiny, image, QUERY, method)
    ids = unpruned_positions(tiny, state) if positions == "original" else torch.arange(len(state))
    with torch.inference_mode():  # a 2-D all-ones mask: ids with gaps are not read as packed sequences
        stock = tiny.language_model(inputs_embeds=state.hidden, position_ids=ids[None],
                                    attention_mask=torch.ones(1, len(state), dtype=torch.long),
                                    use_cache=False).last_hidden_state
    src = int(state.row_of(Kind.SEG)[0]) - 1
    assert (ours.seg_hidden - stock[:, src]).abs().max() <= TOL


def test_drop_at_k_matches_masked_full_length_run(tiny, image):
    rec = Recorder(harness.create_method("test-drop:k=2,keep=40"))
    ours = tiny.segment(image, QUERY, rec)
    assert ours.trace.image_tokens_per_layer == [256, 256] + [40] * 6
    ref = masked_reference(tiny, assembled_sequence(tiny, image, QUERY, rec), rec.present, "original")
    assert (ours.seg_hidden - ref).abs().max() <= TOL


def test_hold_back_and_reinsert_matches_masked_run_with_restore(tiny, image):
    rec = Recorder(harness.create_method("test-hold:at=3"))
    ours = tiny.segment(image, QUERY, rec)
    assert ours.trace.image_tokens_per_layer == [128] * 3 + [256] * 5
    ref = masked_reference(tiny, assembled_sequence(tiny, image, QUERY, rec), rec.present, "original")
    assert (ours.seg_hidden - ref).abs().max() <= TOL
    # a held token re-enters with the embedding it had before layer 0, not a later state
    plain = masked_reference(tiny, assembled_sequence(tiny, image, QUERY, rec), [rec.present[-1]] * 8, "original")
    assert (ours.seg_hidden - plain).abs().max() > 1e-3


def test_light_ffn_path_matches_hooked_stock_layers(tiny, image):
    method = harness.create_method("test-ffn:rank=8")
    ours = tiny.segment(image, QUERY, method)
    state = assembled_sequence(tiny, image, QUERY, method)
    light = LightFFN(rank=8).subset(state)
    path = method.path(state.hidden.shape[-1])

    def hook(mlp, args, out):
        out = out.clone()
        out[:, light] = path(args[0][:, light])
        return out

    handles = [layer.mlp.register_forward_hook(hook) for layer in tiny.language_model.layers]
    try:
        with torch.inference_mode():
            stock = tiny.language_model(inputs_embeds=state.hidden, use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    src = int(state.row_of(Kind.SEG)[0]) - 1
    assert (ours.seg_hidden - stock[:, src]).abs().max() <= TOL
    assert (ours.seg_hidden - baseline(tiny, image)).abs().max() > 1e-4
    rec = ours.ledger.layers[0]
    assert rec.n_ffn == len(state) - len(light) and rec.light == [(len(light), 256, 8), (len(light), 8, 256)]


def test_keep_everything_settings_equal_baseline(tiny, image):
    base = baseline(tiny, image)
    for spec in ["test-replace:every=1", "test-drop:keep=-1", "test-hold:at=0", "test-ffn:rank=0"]:
        assert (tiny.segment(image, QUERY, spec).seg_hidden - base).abs().max() <= TOL, spec

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


def test_attention_rows_after_a_drop_match_a_masked_eager_run(tiny_eager, image):
    """Gappy original positions after a drop: the recomputed rows equal eager attention of the full-length sequence
    whose 4-D mask hides the dropped keys (at the same original positions)."""
    state = assembled_sequence(tiny_eager, image, QUERY, harness.create_method("none"))
    img = state.image_rows
    kept = state.keep_image(img[::4])
    lm = tiny_eager.language_model
    n = len(state)
    present = torch.zeros(n, dtype=torch.bool)
    present[kept.index] = True
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & present[None, :]
    allowed |= torch.eye(n, dtype=torch.bool)
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    layer = lm.layers[0]
    with torch.inference_mode():
        _, ref = layer.self_attn(hidden_states=layer.input_layernorm(state.hidden), attention_mask=mask,
                                 position_embeddings=lm.rotary_emb(state.hidden, state.index[None]))
        rows = torch.tensor([len(kept) - 1, 3])
        ours = attention_rows(layer, lm.rotary_emb, kept.hidden, kept.index, rows, head_mean=False)
    ref = ref[0][:, kept.index[rows]][:, :, kept.index]  # (H, r, kept keys)
    assert (ours - ref).abs().max() <= 1e-6
    no_rope = attention_rows(layer, lm.rotary_emb, kept.hidden, kept.index, rows, rope=False)
    assert (no_rope - ours.mean(0)).abs().max() > 1e-4  # FEATHER-style scores without RoPE differ
    subset = attention_rows(layer, lm.rotary_emb, kept.hidden, kept.index, rows[:1], keys=kept.image_rows)
    assert subset.shape == (1, kept.n_image) and torch.allclose(subset.sum(-1), torch.ones(1))


def test_lisa_prompt_template_tokens(tiny):
    """LISA's llava_v1 evaluation prompt (reference A6) with <im_start><image><im_end> and the answer teacher-forced."""
    pre, post = tiny.prompt_ids("the red square")
    tok = tiny.tokenizer.convert_ids_to_tokens
    text = " ".join(tok(pre) + ["<image>"] + tok(post))
    assert text.startswith("<s> a chat between a curious human")
    assert text.endswith("user : <im_start> <image> <im_end> what is the red square in this image ? "
                         "please output segmentation mask . assistant : [seg] . </s>")
    assert post.count(tiny.seg_token_id) == 1
    sentence = tiny.tokenizer.convert_ids_to_tokens(tiny.prompt_ids("which shape is red?", is_sentence=True)[1])
    assert "what" not in sentence and sentence[:6] == ["<im_end>", "which", "shape", "is", "red", "?"]


def test_clip_features_are_the_penultimate_layer_without_cls(tiny, image):
    from harness.engine import run_vision
    from harness.ledger import Ledger

    prep = tiny.prepare(image)
    with torch.inference_mode():
        stock = tiny.vision_tower(prep.clip_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = run_vision(tiny, prep.clip_pixels, Ledger()).patches
    assert torch.equal(ours, stock)


def test_mask_postprocessing_matches_sam_processor(tiny, image):
    prep = tiny.prepare(image)
    with torch.inference_mode():
        emb = tiny.sam_image_embeddings(prep.sam_pixels)
        seg = torch.randn(1, tiny.config.seg_out_dim)
        ours = tiny.decode_mask(seg, emb, prep)
        dense = tiny.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(emb)
        low, _ = tiny.sam.mask_decoder(image_embeddings=emb,
                                       image_positional_embeddings=tiny.sam.get_image_wide_positional_embeddings(),
                                       sparse_prompt_embeddings=seg.reshape(1, 1, 1, -1),
                                       dense_prompt_embeddings=dense, multimask_output=False)
        ref = tiny.sam_processor.post_process_masks(low, [prep.original_size], [prep.resized_size], binarize=False)
    assert ours.shape == image.shape[:2]
    assert (ours - ref[0][0, 0]).abs().max() <= 1e-5


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


def test_fingerprint_is_exact_and_independent_of_thread_count(tiny):
    """A float sum of the weights depends on how many threads reduce it (ultralytics' predict sets torch to one
    thread); the fingerprint must not."""
    import copy

    threads = torch.get_num_threads()
    other = copy.deepcopy(tiny)
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            other._fingerprint = None
            assert other.fingerprint() == tiny.fingerprint()
    finally:
        torch.set_num_threads(threads)
    other._fingerprint = None
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert other.fingerprint() != tiny.fingerprint()


def test_save_and_reload_roundtrip(tmp_path, tiny, image):
    tiny.save_pretrained(tmp_path / "m")
    again = harness.load_model(tmp_path / "m")
    assert torch.equal(again.segment(image, QUERY).seg_hidden, tiny.segment(image, QUERY).seg_hidden)
    assert again.fingerprint() == tiny.fingerprint()
    tied = again.sam.shared_image_embedding.positional_embedding
    assert again.sam.prompt_encoder.shared_embedding.positional_embedding is tied  # SAM's tie survives loading
    assert len(list(again.parameters())) == len(list(tiny.parameters()))

"""`generate` decode mode: a cached prefill keeps the pruned state, and greedy decoding continues it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import harness.engine as engine
from harness.latency import Stopwatch
from harness.method import create_method
from harness.state import Kind
from tests.conftest import QUERY

# Methods whose choices read only prompt rows, so template and generate runs keep the same tokens. FastV's default
# (score=last), FEATHER and test-drop(-reindex) rank with the sequence's last row, which is </s> in template mode and
# the prompt's last token in generate mode: they differ by design (named in FastV's `deviations`). PyramidDrop and
# SparseVLM re-index positions, so they check the per-layer decode positions.
PROMPT_ONLY = ["none", "random", "downsample", "fastv:score=seg", "fastv:k=3,keep=10,score=seg", "pdrop", "sparsevlm",
               "test-replace", "test-hold", "test-ffn",
               # the other position policy: decode continues from the unpruned length, or from each cache's length
               "downsample:positions=original", "visionzip:positions=original", "fastv:score=seg,positions=reindex",
               "pdrop:positions=original", "sparsevlm:positions=original", "test-replace:positions=reindex",
               "divprune", "divprune:keep=30,order=selection,positions=original", "vispruner",
               "vispruner:positions=original"]


class ScriptedHead(nn.Module):
    """An lm_head whose greedy choice follows a script; it keeps the rows it was given."""

    def __init__(self, tokens: list[int], vocab: int):
        super().__init__()
        self.tokens, self.vocab, self.inputs = tokens, vocab, []

    def forward(self, h):
        self.inputs.append(h[0, -1].clone())
        logits = torch.zeros(*h.shape[:2], self.vocab, dtype=h.dtype, device=h.device)
        logits[..., self.tokens[min(len(self.inputs), len(self.tokens)) - 1]] = 1.0
        return logits


@contextmanager
def scripted(model, tokens: list[int]):
    """Swap the model's lm_head for a `ScriptedHead` (monkeypatch would delete a submodule on undo)."""
    head, old = ScriptedHead(tokens, model.language_model.config.vocab_size), model.lm_head
    model.lm_head = head
    try:
        yield head
    finally:
        model.lm_head = old


def template_answer(model) -> list[int]:
    _, post = model.prompt_ids(QUERY, answer=True)
    _, prompt = model.prompt_ids(QUERY, answer=False)
    assert post[: len(prompt)] == prompt, "the generate prompt must be the template's prefix"
    return post[len(prompt):]


def final_states(monkeypatch):
    """Capture the state `run_llm` returns (the template forward's last-layer rows)."""
    seen = []
    run = engine.run_llm

    def capture(*args, **kwargs):
        seen.append(run(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(engine, "run_llm", capture)
    return seen


@pytest.mark.parametrize("spec", PROMPT_ONLY)
def test_generate_equals_template_when_the_answer_is_the_template(spec, tiny, image, monkeypatch):
    answer = template_answer(tiny)  # [SEG] . </s>
    assert answer[0] == tiny.seg_token_id and answer[-1] == tiny.tokenizer.eos_token_id
    seen = final_states(monkeypatch)
    t = tiny.segment(image, QUERY, create_method(spec))
    with scripted(tiny, answer) as head:
        g = tiny.segment(image, QUERY, create_method(spec), decode="generate")

    assert g.answer == tiny.tokenizer.decode(answer) and t.answer is None
    assert g.trace.image_tokens_per_layer == t.trace.image_tokens_per_layer
    assert g.trace.kept_patches == t.trace.kept_patches
    assert (g.seg_hidden - t.seg_hidden).abs().max() <= 1e-5
    assert (g.logits - t.logits).abs().max() <= 1e-4
    # every decode step's row equals the template's row for the same token: cache contents and RoPE positions
    # (original, or each layer's cache length under re-indexing) are those of the teacher-forced forward
    state = seen[0]
    rows = [state.seg_source_row, *((state.kind == Kind.SEG) | (state.kind == Kind.ANSWER)).nonzero()[:-1, 0]]
    want = tiny.language_model.norm(state.hidden[0, rows])
    assert (torch.stack(head.inputs) - want).abs().max() <= 1e-5
    # the cache of each layer holds exactly the rows that ran in it, plus the decoded tokens
    prefill = g.trace.tokens_per_layer
    n = len(prefill)
    steps = [r.kv for r in g.ledger.decode_layers]
    assert steps == [k + 1 for k in prefill] + [k + 2 for k in prefill]
    assert len(g.ledger.layers) == n and g.ledger.lm_head_rows == 3


def test_fastv_last_ranks_with_a_different_row_in_generate_mode(tiny, image):
    """The documented difference: the official last-token row is </s> in template mode."""
    t = tiny.segment(image, QUERY, "fastv")
    with scripted(tiny, template_answer(tiny)):
        g = tiny.segment(image, QUERY, "fastv", decode="generate")
    assert g.trace.image_tokens_per_layer == t.trace.image_tokens_per_layer
    assert g.trace.kept_patches[-1] != t.trace.kept_patches[-1]


def test_no_seg_gives_an_empty_mask(tiny, image):
    with scripted(tiny, [5, 6, tiny.tokenizer.eos_token_id]):
        r = tiny.segment(image, QUERY, "fastv", decode="generate")
    assert r.seg_hidden is None and r.logits is None
    assert r.mask.shape == image.shape[:2] and not r.mask.any()
    assert r.ledger.lm_head_rows == 3 and r.ledger.seg_prompts == 0


def test_decoding_stops_at_max_new_tokens(tiny, image):
    with scripted(tiny, [7]):
        r = tiny.segment(image, QUERY, "none", decode="generate", max_new_tokens=4)
    assert r.ledger.lm_head_rows == 4 and len(r.ledger.decode_layers) == 3 * tiny.info.n_layers


@pytest.mark.parametrize("spec", ["none", "fastv", "pdrop"])
def test_generate_flops_match_flop_counter(spec, tiny_eager, image):
    """Decode steps (one row against each layer's cache) and lm_head rows are counted as they run (eager model)."""
    tiny_eager.segment(image, QUERY, spec, decode="generate", max_new_tokens=5)  # warm-up
    with FlopCounterMode(display=False) as counter:
        watch = Stopwatch(clock=lambda: float(counter.get_total_flops()))
        r = tiny_eager.segment(image, QUERY, spec, decode="generate", max_new_tokens=5, stopwatch=watch)
    assert r.ledger.lm_head_rows == 5 and r.ledger.decode_layers
    assert r.flops["llm"] == pytest.approx(watch.last["llm"], rel=0.01)
    assert r.flops["total"] == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_unknown_decode_mode_and_bad_token_limit_are_refused(tiny, image):
    with pytest.raises(ValueError, match="template, generate"):
        tiny.segment(image, QUERY, decode="beam")
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.segment(image, QUERY, decode="generate", max_new_tokens=0)

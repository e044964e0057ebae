"""The shared battery: every registered method gets these checks automatically (parametrised over the registry)."""

from __future__ import annotations

import inspect

import pytest
from torch.utils.flop_counter import FlopCounterMode

import harness
from harness.latency import Stopwatch
from harness.method import METHODS, POSITION_POLICIES, STAGES, create_method, describe_params
from tests.conftest import QUERY
from tests.reference import Recorder, assembled_sequence, masked_reference

ALL = sorted(METHODS.names())


@pytest.fixture(scope="module")
def base(tiny, image):
    return tiny.segment(image, QUERY, "none")


@pytest.mark.parametrize("name", ALL)
def test_declarations(name):
    cls = METHODS.get(name)
    assert cls.stage in STAGES and cls.position_policy in POSITION_POLICIES
    if cls.reduces_tokens:  # the official ids are a choice every method makes (pre-LLM ones: usually reindex)
        assert any("position_policy" in vars(k) for k in cls.__mro__[:-2]), f"{name} must declare position_policy"
    assert cls.citation, f"{name} needs a citation"
    for p in describe_params(cls):
        assert p.help, f"{name}: parameter {p.name} needs an Args: entry in the class docstring"
        assert p.default is not inspect.Parameter.empty, f"{name}: parameter {p.name} needs a default"


@pytest.mark.parametrize("name", ALL)
def test_runs_and_trace_matches_ledger_and_schedule(name, tiny, image):
    method = create_method(name)
    r = tiny.segment(image, QUERY, method)
    info = tiny.info
    assert r.mask.shape == image.shape[:2]
    assert len(r.trace.image_tokens_per_layer) == info.n_layers
    assert [len(p) for p in r.trace.kept_patches] == r.trace.image_tokens_per_layer
    assert r.trace.image_tokens_per_layer == [rec.n_image for rec in r.ledger.layers]
    # a patch, -1 (a token standing for no patch), or a merged token whose members are patches
    assert all(-1 <= p < info.n_image_tokens or p in r.trace.members for layer in r.trace.kept_patches for p in layer)
    assert all(0 <= p < info.n_image_tokens and w >= 0 for pairs in r.trace.members.values() for p, w in pairs)
    schedule = method.image_schedule(info)
    if schedule is not None:
        assert r.trace.image_tokens_per_layer == schedule


@pytest.mark.parametrize("name", ALL)
def test_keep_everything_equals_baseline(name, tiny, image, base):
    cls = METHODS.get(name)
    if cls.keep_all is None:
        pytest.skip(f"{name} declares no keep-everything setting")
    r = tiny.segment(image, QUERY, create_method(name, **cls.keep_all))
    assert (r.seg_hidden - base.seg_hidden).abs().max() <= 1e-5
    assert r.trace.image_tokens_per_layer == base.trace.image_tokens_per_layer


@pytest.mark.parametrize("name", ALL)
def test_pruned_run_equals_masked_full_length_run(name, tiny, image):
    cls = METHODS.get(name)
    if not cls.exact_reference:
        pytest.skip(f"{name} changes more than the token set (exact_reference=False); it has its own reference test")
    rec = Recorder(create_method(name))
    r = tiny.segment(image, QUERY, rec)
    ref = masked_reference(tiny, assembled_sequence(tiny, image, QUERY, rec.inner), rec.present, cls.position_policy)
    assert (r.seg_hidden - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ALL)
def test_positions_override_runs_and_matches_the_masked_reference(name, tiny, image):
    """`positions=` flips the method's policy; the spec records it; a method that only drops and holds tokens under
    the flipped policy still equals the full-length masked run with that policy's ids."""
    cls = METHODS.get(name)
    flipped = "reindex" if cls.position_policy == "original" else "original"
    if not cls.reduces_tokens:
        with pytest.raises(ValueError, match="keeps every token"):
            create_method(name, positions=flipped)
        return
    method = create_method(name, positions=flipped)
    assert method.policy == flipped and create_method(method.spec()).policy == flipped
    assert create_method(name, positions=cls.position_policy).spec() == create_method(name).spec()
    rec = Recorder(method)
    r = tiny.segment(image, QUERY, rec)
    assert r.mask.shape == image.shape[:2]
    if not cls.exact_reference:
        return
    state = assembled_sequence(tiny, image, QUERY, rec.inner)
    if flipped == "original" and bool((state.patch < -1).any()):
        return  # merged tokens: `test_positions.py` pins their positions
    ref = masked_reference(tiny, state, rec.present, flipped)
    assert (r.seg_hidden - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ALL)
def test_exact_flops_match_flop_counter(name, tiny_eager, image):
    """exact FLOPs vs torch's FlopCounterMode, per stage, on the eager model (the counter misses fused SDPA on CPU)."""
    method = create_method(name)
    tiny_eager.segment(image, QUERY, method)  # warm-up: caches that are computed once per model
    with FlopCounterMode(display=False) as counter:
        watch = Stopwatch(clock=lambda: float(counter.get_total_flops()))
        r = tiny_eager.segment(image, QUERY, method, stopwatch=watch)
    counted = watch.last
    assert r.flops["llm"] == pytest.approx(counted["llm"], rel=0.01)
    assert r.flops["total"] == pytest.approx(counter.get_total_flops(), rel=0.01)
    counted["method"] = counted.get("method", 0.0) + counted.get("instances", 0.0)  # a method's own model's stage
    for component in ("vision", "method", "projector", "sam_encoder", "mask_decoder"):
        assert r.flops[component] == pytest.approx(counted.get(component, 0.0), rel=0.01, abs=1), component


@pytest.mark.parametrize("name", ALL)
def test_bad_hyperparameters_raise(name):
    with pytest.raises(ValueError, match="unknown parameter"):
        create_method(name, definitely_not_a_parameter=1)
    for p in describe_params(METHODS.get(name)):
        if p.annotation in (int, float):
            with pytest.raises(ValueError, match=p.name):
                create_method(name, **{p.name: "not-a-number"})


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'random'"):
        create_method("randon")


def test_out_of_range_values_raise_before_running(tiny, image):
    with pytest.raises(ValueError, match="ratio"):
        create_method("random:ratio=1.5")
    with pytest.raises(ValueError, match="beyond the model"):
        tiny.segment(image, QUERY, "random:k=99")
    with pytest.raises(ValueError, match="stride"):
        tiny.segment(image, QUERY, "downsample:stride=40")


def test_spec_parsing_and_round_trip():
    m = create_method("random:k=3,ratio=0.25,seed=7")
    assert (m.k, m.ratio, m.seed) == (3, 0.25, 7)
    assert create_method(m.spec()).params() == m.params()
    assert create_method("random", k=1).k == 1
    assert create_method("baseline").name == "none"
    with pytest.raises(ValueError, match="cannot parse"):
        create_method("random:k")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        harness.register("random")(type("X", (harness.Method,), {}))
    with pytest.raises(TypeError):
        harness.register("not-a-method")(object)

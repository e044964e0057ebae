"""Token Routing: eq. 9-12 against a plain-torch computation on hooked stock layers, mask routing against the masked
full-length reference, the paper's Table 4 FLOPs, and the analytic plan against measured runs."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import harness
from harness.cli import main
from harness.flops import Arch, compute_flops, schedule_ledger
from harness.latency import Stopwatch
from harness.methods.routing import TokenRouting
from harness.state import Kind
from tests.conftest import QUERY
from tests.reference import Recorder, assembled_sequence, masked_reference

TOL = 1e-5


class Spy(TokenRouting):
    """Records the proxies drawn in every layer."""

    name = "routing"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def draw(self, img, n_s, ctx):
        out = super().draw(img, n_s, ctx)
        self.drawn.append(out)
        return out


def routed_reference(model, image, spy: Spy, alpha: str, gate: float, d_p: int = 128, skip: bool = False):
    """The stock LlamaModel on the assembled sequence, each layer's MLP output replaced for the routed rows by eq. 9-12
    in plain torch (proxies: the ones the method drew; alpha from its definition, not from the method's code)."""
    state = assembled_sequence(model, image, QUERY, spy)
    layers = model.language_model.layers
    inputs, attn_out, handles = {}, {}, []
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(state.hidden.shape[-1], d_p, generator=gen) / math.sqrt(state.hidden.shape[-1])

    def mlp_hook(i):
        def hook(mlp, args, out):
            proxies, rest = spy.drawn[i]
            x = args[0][0]
            out = out.clone()
            if skip:
                out[0, rest] = 0
                return out
            if alpha == "random":
                scores = (x[rest] @ w) @ (x[proxies] @ w).T / math.sqrt(d_p)
                a = scores.softmax(-1)
            else:
                layer = layers[i]
                h = inputs[i] + attn_out[i]  # the residual stream after attention
                z = layer.input_layernorm(h)[0]
                heads, hd = model.language_model.config.num_attention_heads, layer.self_attn.head_dim
                kv = model.language_model.config.num_key_value_heads
                q = (z[rest] @ layer.self_attn.q_proj.weight.T).view(len(rest), heads, hd)
                k = (z[proxies] @ layer.self_attn.k_proj.weight.T).view(len(proxies), kv, hd)
                k = k.repeat_interleave(heads // kv, dim=1)
                a = torch.einsum("rhd,shd->hrs", q, k).div(math.sqrt(hd)).softmax(-1).mean(0)
            out[0, rest] = gate * (a @ out[0, proxies])
            return out
        return hook

    for i, layer in enumerate(layers):
        def keep_input(mod, args, kwargs, i=i):
            inputs[i] = kwargs.get("hidden_states", args[0] if args else None)

        def keep_attention(mod, args, out, i=i):
            attn_out[i] = out[0]

        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(keep_attention))
        handles.append(layer.mlp.register_forward_hook(mlp_hook(i)))
    try:
        with torch.inference_mode():
            final = model.language_model(inputs_embeds=state.hidden, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return final[:, int(state.row_of(Kind.SEG)[0]) - 1]


@pytest.mark.parametrize("alpha,gate,mode", [("random", 1.0, "proxy"), ("random", 0.4, "proxy"),
                                              ("attn", 0.7, "proxy"), ("random", 1.0, "skip")])
def test_image_routing_equals_plain_torch_eq_9_to_12(tiny, image, alpha, gate, mode):
    spy = Spy(mask_layer=0, alpha=alpha, gate=gate, image=mode)
    ours = tiny.segment(image, QUERY, spy)
    assert len(spy.drawn) == 8 and all(len(p) == 8 and len(r) == 248 for p, r in spy.drawn)
    ref = routed_reference(tiny, image, spy, alpha, gate, skip=mode == "skip")
    assert (ours.seg_hidden - ref).abs().max() <= TOL
    base = tiny.segment(image, QUERY, "none").seg_hidden
    assert (ours.seg_hidden - base).abs().max() > 1e-3  # routing changed the result: the comparison can fail
    rec = ours.ledger.layers[0]
    assert rec.n == rec.n_ffn + 248 and rec.routed == (248 if mode == "proxy" else 0)


def test_proxies_are_random_per_layer_and_seeded(tiny, image):
    a, b, c = Spy(mask_layer=0), Spy(mask_layer=0), Spy(mask_layer=0, seed=1)
    for spy in (a, b, c):
        tiny.segment(image, QUERY, spy, sample_key="s1")
    first = [p.tolist() for p, _ in a.drawn]
    assert first == [p.tolist() for p, _ in b.drawn]  # same seed and sample: the same draws
    assert first != [p.tolist() for p, _ in c.drawn]  # another seed: other draws
    assert len({tuple(p) for p in first}) == 8  # a new draw in every layer


@pytest.mark.parametrize("tokens", ["answer", "carrier"])
def test_mask_routing_equals_the_masked_full_length_run(tiny, image, tokens):
    rec = Recorder(TokenRouting(mask_layer=3, mask_tokens=tokens, image="full"))
    ours = tiny.segment(image, QUERY, rec)
    state = assembled_sequence(tiny, image, QUERY, rec.inner)
    ref = masked_reference(tiny, state, rec.present, "original")
    assert (ours.seg_hidden - ref).abs().max() <= TOL
    held = 3 + (tokens == "carrier")  # "[SEG]", ".", "</s>" (+ the token before [SEG])
    assert ours.trace.tokens_per_layer == [len(state) - held] * 3 + [len(state)] * 5
    base = tiny.segment(image, QUERY, "none").seg_hidden
    if tokens == "answer":  # later rows cannot change the [SEG]-predicting row under causal attention
        assert (ours.seg_hidden - base).abs().max() <= TOL
    else:
        assert (ours.seg_hidden - base).abs().max() > 1e-3


def test_keep_everything_and_generate_mode(tiny, image):
    base = tiny.segment(image, QUERY, "none")
    keep = tiny.segment(image, QUERY, "routing:mask_layer=0,proxies=256")
    assert (keep.seg_hidden - base.seg_hidden).abs().max() <= TOL and keep.flops == base.flops
    out = tiny.segment(image, QUERY, "routing:mask_tokens=carrier", decode="generate", max_new_tokens=3)
    assert out.ledger.layers[0].n == out.ledger.layers[-1].n - 1  # the prompt's last token entered late
    assert isinstance(out.answer, str)


@pytest.mark.parametrize("spec", ["routing:alpha=attn", "routing:image=skip,mask_tokens=carrier"])
def test_exact_flops_match_flop_counter(tiny_eager, image, spec):
    method = harness.create_method(spec)
    tiny_eager.segment(image, QUERY, method)
    with FlopCounterMode(display=False) as counter:
        watch = Stopwatch(clock=lambda: float(counter.get_total_flops()))
        r = tiny_eager.segment(image, QUERY, method, stopwatch=watch)
    assert r.flops["llm"] == pytest.approx(watch.last["llm"], rel=0.01)
    assert r.flops["total"] == pytest.approx(counter.get_total_flops(), rel=0.01)


@pytest.mark.parametrize("spec", ["routing", "routing:alpha=attn,mask_tokens=carrier", "routing:image=skip",
                                  "routing:image=full,mask_layer=5"])
def test_analytic_plan_equals_the_measured_ledger(tiny, image, spec):
    """`segprune flops --model` of a routing method gives what a run measures, in every convention."""
    method = harness.create_method(spec)
    r = tiny.segment(image, QUERY, method)
    pre, post = tiny.prompt_ids(QUERY)
    arch = Arch.from_model(tiny)
    records = method.layer_records(tiny.info, len(pre) + len(post), len(post) - post.index(tiny.seg_token_id))
    planned = schedule_ledger(arch, 0, records=records, vision_tokens=256)
    for convention in ("exact", "routing"):
        assert compute_flops(arch, planned, convention)["llm"] == compute_flops(arch, r.ledger, convention)["llm"]


def test_table_4_rows(monkeypatch):
    """Token Routing's Table 4 (PSALM, Phi-1.5, N = 450: 256 image tokens, 100 mask queries), to the printed digits."""
    rows = {"": "1,126.98", "routing:image=full": "998.32", "routing:mask_layer=0,gate_width=512": "758.75",
            "routing:gate_width=512": "630.09"}
    for spec, want in rows.items():
        args = ["flops", "psalm-phi-1.5"] + (["--method", spec] if spec else [])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        line = next(x for x in result.output.splitlines() if x.strip().startswith("routing "))
        assert line.split()[4] == want, (spec, line)


def test_bad_settings_refused(tiny, image):
    with pytest.raises(ValueError, match="beyond the model's 8 layers"):
        tiny.segment(image, QUERY, "routing:mask_layer=8")
    with pytest.raises(ValueError, match="gate_width is the learned gate"):
        tiny.segment(image, QUERY, "routing:gate_width=512")
    with pytest.raises(ValueError, match="gate is a sigmoid"):
        harness.create_method("routing:gate=1.5")
    with pytest.raises(ValueError, match="proxies must be >= 1"):
        harness.create_method("routing:proxies=0")


def test_budget_is_met_on_work_and_refused_beyond_reach(tiny, image):
    info = tiny.info
    m = harness.create_method("routing@50%", info=info)
    d, inter, n, layers, s = info.hidden_size, info.intermediate_size, 256, info.n_layers, m.proxies
    token = 2 * d * d + 2 * d * 2 * 64 + 3 * d * inter  # q, o; k, v (2 KV heads of 64); gated FFN, per token-layer
    light = (n - s) * d * 128 + s * d * 128 + (n - s) * 128 * s + (n - s) * s * d  # projections, scores, sum
    saved = 3 * 4 * token + layers * ((n - s) * 3 * d * inter - light)  # 3 answer tokens skip 4 layers; routed FFNs
    assert m.budget_n_avg(info) == pytest.approx(n - saved / (layers * token))
    assert abs(m.budget_n_avg(info) - 128) <= 0.02 * 256
    assert tiny.segment(image, QUERY, m).trace.n_avg == 256  # every image token stays
    with pytest.raises(ValueError, match="out of reach; with these settings routing reaches 1% to 6"):
        harness.create_method("routing@75%", info=info)
    with pytest.raises(ValueError, match="proxies is what @50% solves for"):
        harness.create_method("routing:proxies=8@50%", info=info)


def test_report_says_what_n_avg_means_for_routing(tmp_path):
    from harness.report import paper_frame
    from harness.runner import expand_grid, run_grid

    run_grid(expand_grid(["random:tiny"], ["none", "routing@50%"], ["toy:val"], limit=1), tmp_path)
    frame, notes = paper_frame(tmp_path)
    assert list(frame["N_avg"]) == [256, 256] and frame["TFLOPs"].iloc[1] < frame["TFLOPs"].iloc[0]
    assert any("routing keeps every image token" in n for n in notes)


@pytest.fixture(scope="module")
def adapter_file(tiny, tmp_path_factory):
    from harness.methods.routing import calibrate

    samples = harness.load_dataset("toy", "train", limit=4)
    adapter, info = calibrate(tiny, samples, data="toy:train", epochs=2, d_g=16)
    path = tmp_path_factory.mktemp("adapter") / "routing.safetensors"
    adapter.save(path, info)
    return path, info


def test_calibration_fits_round_trips_and_refuses_its_own_split(tiny, image, adapter_file, tmp_path):
    path, info = adapter_file
    assert info["held_out_residual_after"] < info["held_out_residual_before"]  # the fit improved on held-out data
    m = harness.create_method(f"routing:adapter={path}")
    r = tiny.segment(image, QUERY, m)
    assert m._adapter.calibrated_on == "toy:train" and m.dims() == (16, 16)  # d_p: 256 / 16, as the paper's 2048 / 16
    rec = r.ledger.layers[0]
    assert rec.light[-2:] == [(248, 256, 16), (248, 16, 256)] and rec.routed_dims == 16 + 16  # the gate MLP counted
    with FlopCounterMode(display=False) as counter:
        watch = Stopwatch(clock=lambda: float(counter.get_total_flops()))
        r2 = tiny.segment(image, QUERY, m, stopwatch=watch)
    assert r2.flops["llm"] == pytest.approx(watch.last["llm"], rel=0.01)
    assert (r2.seg_hidden - r.seg_hidden).abs().max() == 0
    from harness.runner import expand_grid, prepare_grid

    with pytest.raises(ValueError, match="was calibrated on toy:train; evaluate it on another split"):
        prepare_grid(expand_grid(["random:tiny"], [f"routing:adapter={path}"], ["toy:train"], limit=1))
    prepare_grid(expand_grid(["random:tiny"], [f"routing:adapter={path}"], ["toy:val"], limit=1))
    with pytest.raises(ValueError, match="adapter brings its own"):
        harness.create_method(f"routing:adapter={path},gate=0.5")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="is not a routing adapter"):
        tiny.segment(image, QUERY, f"routing:adapter={tmp_path / 'bad.safetensors'}")
    with pytest.raises(ValueError, match="not found; make one with `segprune calibrate routing`"):
        tiny.segment(image, QUERY, f"routing:adapter={tmp_path / 'none.safetensors'}")


def test_an_uncalibrated_adapter_is_the_training_free_variant(tiny, image, tmp_path):
    from harness.methods.routing import Adapter

    free = TokenRouting()
    free.bind(tiny.info)
    adapter = Adapter(8, 256, 128, 16, free.projection(256, "cpu"))  # gate MLP: zero weights, sigmoid(bias) = 0.94
    adapter.save(tmp_path / "a.safetensors", {"layers": 8, "hidden_size": 256, "d_p": 128, "d_g": 16, "data": "x"})
    ours = tiny.segment(image, QUERY, f"routing:adapter={tmp_path / 'a.safetensors'}")
    assert (ours.seg_hidden - tiny.segment(image, QUERY, "routing").seg_hidden).abs().max() <= TOL


def test_adapter_identity_cache_and_bad_files(tiny, image, adapter_file, tmp_path, monkeypatch):
    import shutil

    from harness.methods.routing import Adapter, canonical_data

    path, _ = adapter_file
    copy = tmp_path / "a.safetensors"
    shutil.copy(path, copy)
    m = harness.create_method(f"routing:adapter={copy}")
    assert m.adapter.startswith(f"{copy}#") and harness.create_method(m.spec()).spec() == m.spec()
    loads = []
    real = Adapter.load.__func__
    monkeypatch.setattr(Adapter, "load", classmethod(lambda cls, p, info: loads.append(p) or real(cls, p, info)))
    for key in ("s1", "s2", "s3"):
        tiny.segment(image, QUERY, m, sample_key=key)
    assert len(loads) == 1  # read once per process, not per sample
    copy.write_bytes(copy.read_bytes() + b" ")  # recalibrated into the same path
    with pytest.raises(ValueError, match="changed since this spec was resolved"):
        harness.create_method(m.spec())
    from safetensors.torch import save_file

    cases = {"no metadata": ({}, "no layers, hidden_size, d_p, d_g"),
             "other model": ({"segprune": '{"layers": 4, "hidden_size": 256, "d_p": 16, "d_g": 16}'},
                             "calibrated for 4 layers of width 256, the model has 8"),
             "wrong tensors": ({"segprune": '{"layers": 8, "hidden_size": 256, "d_p": 16, "d_g": 16}'},
                               "its tensors do not fit its metadata")}
    for name, (meta, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file({"x": torch.zeros(2)}, bad, metadata=meta)
        with pytest.raises(ValueError, match=message):
            tiny.segment(image, QUERY, f"routing:adapter={bad}")
    assert canonical_data("shapes:train") == canonical_data("shapes-ref:train")  # an alias cannot dodge the refusal

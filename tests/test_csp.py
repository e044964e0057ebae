"""LVLM_CSP (methods/csp.py) against the paper's equations and independent computations."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from harness.datasets import load_dataset
from harness.method import ModelInfo, create_method
from harness.methods.csp import LVLMCSP, PRESETS, TABLE1, n_avg, seg_first_indices
from harness.model import TINY, build_random, tiny_tokenizer
from harness.state import Kind
from tests.conftest import QUERY
from tests.test_prellm import full_tower

TABLE6_NAVG = {65: 86, 70: 78, 75: 66, 80: 51, 85: 39, 90: 29}  # LLaVA-1.5-7B, 224 px (printed truncated)


class Recorder(LVLMCSP):
    """CSP that keeps the assembled sequence, its selection and the state right after re-insertion."""

    def on_sequence(self, state, ctx):
        self.assembled = state
        self.selected = ctx.scratch["csp_selected"].clone()
        return super().on_sequence(state, ctx)

    def before_layer(self, i, state, ctx):
        state = super().before_layer(i, state, ctx)
        if i == self.config(ctx.info)[0]:
            self.reinserted = state
        return state


@pytest.fixture(scope="module")
def deep():
    """32 decoder layers and 256 image tokens, the paper's LLaVA-1.5-7B layout at 224 px (tiny widths)."""
    arch = {**TINY, "llm": {**TINY["llm"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32}}
    return build_random(arch, name="deep", tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def scene():
    return load_dataset("shapes-ref", "val", limit=1)[0]


def test_per_layer_counts(tiny, image):
    r = tiny.segment(image, QUERY, "csp:l_c=2,n_c=32,l_s=3,n_p=8,cluster=uniform")
    assert r.trace.image_tokens_per_layer == [32] * 2 + [256] * 3 + [8] * 3
    assert r.trace.n_avg == n_avg(2, 32, 3, 8, 256, 8)


@pytest.mark.parametrize("ratio", sorted(PRESETS))
def test_table6_presets_navg_on_32_layers(deep, image, ratio):
    r = deep.segment(image, QUERY, f"csp:preset={ratio},cluster=uniform")
    lc, nc, ls, n_p = PRESETS[ratio]
    assert r.trace.image_tokens_per_layer == [nc] * lc + [256] * ls + [n_p] * (32 - lc - ls)
    assert r.trace.n_avg == pytest.approx((nc * lc + 256 * ls + n_p * (32 - lc - ls)) / 32)  # eq. 9
    assert math.floor(r.trace.n_avg) == TABLE6_NAVG[ratio]  # the paper prints it truncated


@pytest.mark.parametrize("cluster", ["random", "uniform", "cls", "seg_first"])
def test_reinserted_tokens_carry_layer0_embeddings(tiny, scene, cluster):
    rec = Recorder(l_c=3, n_c=40, l_s=2, n_p=10, cluster=cluster, instances="oracle")
    tiny.segment(scene.image, scene.query, rec, instances=scene.instances)
    state, base = rec.reinserted, rec.assembled
    assert state.n_image == 256 and not state.held
    assert torch.equal(state.index, base.index)  # every token back, in original order and positions
    img = state.image_rows
    back = torch.ones(256, dtype=torch.bool)
    back[rec.selected] = False
    assert torch.equal(state.hidden[0, img[back]], base.hidden[0, img[back]])  # layer-0 embeddings
    assert not torch.allclose(state.hidden[0, img[~back]], base.hidden[0, img[~back]])  # L_c layers of updates


def test_uniform_is_eq2(tiny, image):
    rec = Recorder(l_c=1, n_c=96, l_s=1, n_p=8, cluster="uniform")
    tiny.segment(image, QUERY, rec)
    assert rec.selected.tolist() == [2 * i for i in range(96)]  # S[i] = i floor(256 / 96): rows 12-15 unsampled


def test_cls_is_eq3_on_the_last_clip_layer(tiny, image):
    out, got = full_tower(tiny, image)
    heads = tiny.vision_tower.config.num_attention_heads
    q = got["q"].double().view(-1, heads, got["q"].shape[-1] // heads).transpose(0, 1)
    k = got["k"].double().view(-1, heads, got["k"].shape[-1] // heads).transpose(0, 1)
    probs = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)  # per head, all keys
    ref = probs[:, 0, 1:].mean(0).topk(20).indices.sort().values
    rec = Recorder(l_c=1, n_c=20, l_s=1, n_p=8, cluster="cls")
    tiny.segment(image, QUERY, rec)
    assert rec.selected.tolist() == ref.tolist()


def test_seg_first_counts_follow_eq4(scene, tiny):
    cov = tiny.patch_coverage(scene.instances())
    area = cov.sum(1)
    for nc in (4, 16, 64):  # 4: fewer than the instances, the max(1, .) rule decides for the small ones
        chosen = seg_first_indices(cov, nc, torch.Generator().manual_seed(0))
        want_total = 0
        for i in range(len(cov)):
            members = (cov[i] >= 0.5).nonzero().squeeze(1)
            members = members if members.numel() else cov[i].argmax()[None]
            want = min(max(1, math.floor(nc * float(area[i]) / float(area.sum()))), members.numel())
            got = int(np.isin(chosen.numpy(), members.numpy()).sum())
            assert got >= want >= 1  # its own draws are all in the union
            want_total += want
        assert len(chosen) <= want_total  # the union; no background, no top-up


def test_seg_first_oracle_gives_every_instance_a_token(tiny, scene):
    rec = Recorder(l_c=2, n_c=1, l_s=2, n_p=8, cluster="seg_first", instances="oracle")
    r = tiny.segment(scene.image, scene.query, rec, instances=scene.instances)
    cov = tiny.patch_coverage(scene.instances())
    assert len(cov) > 1  # N_c = 1 < instances: only the at-least-one rule gives the others a token
    for i in range(len(cov)):
        own = (cov[i] >= 0.5).nonzero().squeeze(1)
        own = own if own.numel() else cov[i].argmax()[None]
        assert bool(np.isin(rec.selected.numpy(), own.numpy()).any()), f"instance {i} got no token of its own"
    assert r.trace.image_tokens_per_layer[0] == len(rec.selected) >= len(cov)


def test_coverage_follows_the_clip_processor(tiny):
    """A non-square mask through patch_coverage vs the same mask as an image through the CLIP processor."""
    mask = np.zeros((150, 260), bool)
    mask[30:120, 100:200] = True
    cov = tiny.patch_coverage(mask[None])[0].view(16, 16)
    proc = tiny.clip_processor
    px = proc(np.repeat(mask[..., None] * 255, 3, -1).astype(np.uint8), return_tensors="pt")["pixel_values"][0, 0]
    ref = torch.nn.functional.avg_pool2d((px * proc.image_std[0] + proc.image_mean[0])[None, None], 14)[0, 0]
    assert (cov - ref).abs().max() < 0.15  # bicubic vs area resampling at the edges
    assert torch.equal(cov >= 0.5, ref >= 0.5)


def test_seg_first_with_yolo_counts_its_flops_and_time(tiny, scene):
    from torch.utils.flop_counter import FlopCounterMode

    from harness.latency import Stopwatch

    method = create_method("csp:l_c=2,n_c=16,l_s=2,n_p=8")
    tiny.segment(scene.image, scene.query, method)  # loads YOLO
    threads = torch.get_num_threads()
    with FlopCounterMode(display=False) as counter:
        watch = Stopwatch(clock=lambda: float(counter.get_total_flops()))
        r = tiny.segment(scene.image, scene.query, method, stopwatch=watch)
    assert torch.get_num_threads() == threads
    assert r.ledger.method_flops == pytest.approx(watch.last["instances"], rel=0.01)
    assert r.latency["instances"] > 0 and r.ledger.method_flops > 1e8


def test_selection_is_seeded_per_sample(tiny, image):
    def selected(seed, key):
        rec = Recorder(l_c=2, n_c=16, l_s=2, n_p=8, cluster="random", seed=seed)
        tiny.segment(image, QUERY, rec, sample_key=key)
        return rec.selected.tolist()

    assert selected(0, "a") == selected(0, "a")
    assert selected(0, "a") != selected(1, "a")
    assert selected(0, "a") != selected(0, "b")


def test_pruning_ranks_by_the_seg_rows_attention_in_the_last_scattering_layer(tiny_eager, image):
    """Eq. 8 against eager attention: layer L_c + L_s - 1's own input through the stock layer with attention
    weights, the [SEG] row (or the token before it) head-averaged, top N_p image tokens."""
    lm = tiny_eager.language_model
    layer = lm.layers[2]  # L_c = 1, L_s = 2
    for row in ("seg", "seg_source"):
        rec = Recorder(l_c=1, n_c=64, l_s=2, n_p=8, cluster="uniform", prune_row=row)
        seen: dict = {}
        hook = layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, seen=seen: seen.__setitem__("h", kw["hidden_states"]), with_kwargs=True)
        try:
            r = tiny_eager.segment(image, QUERY, rec)
        finally:
            hook.remove()
        state = rec.reinserted  # all tokens back: the rows of layer 2's input
        with torch.no_grad():
            h = seen["h"]  # input_layernorm(layer input), as the engine calls self_attn
            n = h.shape[1]
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            _, attn = layer.self_attn(hidden_states=h, attention_mask=mask,
                                      position_embeddings=lm.rotary_emb(h, state.index[None]))
        seg = int(state.row_of(Kind.SEG)[0])
        scores = attn[0].mean(0)[seg if row == "seg" else seg - 1, state.image_rows]
        want = sorted(state.patch[state.image_rows[scores.topk(8).indices]].tolist())
        assert sorted(r.trace.kept_patches[3]) == want, row


def test_generate_mode_prunes_with_the_prompt_row(tiny, image):
    r = tiny.segment(image, QUERY, "csp:l_c=1,n_c=64,l_s=2,n_p=8,cluster=uniform", decode="generate", max_new_tokens=3)
    assert r.trace.image_tokens_per_layer == [64] + [256] * 2 + [8] * 5


@pytest.mark.parametrize("budget", [0.7, 0.8])
def test_budget_mapping_meets_the_target(tiny, budget):
    m = create_method(f"csp:cluster=uniform@{budget}", info=tiny.info)
    assert sum(m.image_schedule(tiny.info)) / 8 == pytest.approx((1 - budget) * 256, abs=0.02 * 256)


def test_fill_spends_seg_firsts_unused_budget_in_the_pruning_stage(tiny, scene):
    spec = "csp:l_c=2,n_c=64,l_s=2,n_p=8,cluster=seg_first,instances=oracle"
    paper = Recorder(**create_method(spec).params())
    r = tiny.segment(scene.image, scene.query, paper, instances=scene.instances)
    chosen = len(paper.selected)
    assert chosen < 64  # the paper's count rule leaves budget over on this scene
    assert r.trace.image_tokens_per_layer == [chosen] * 2 + [256] * 2 + [8] * 4
    for mode in ("template", "generate"):
        r = tiny.segment(scene.image, scene.query, spec + ",fill=prune", instances=scene.instances, decode=mode,
                         max_new_tokens=2)
        assert r.trace.image_tokens_per_layer[:4] == [chosen] * 2 + [256] * 2
        assert r.trace.n_avg == pytest.approx(n_avg(2, 64, 2, 8, 256, 8), abs=0.5 * 4 / 8)  # rounding of N_p


def test_fill_takes_back_what_extra_instances_took(tiny, scene):
    spec = "csp:l_c=2,n_c=1,l_s=2,n_p=8,cluster=seg_first,instances=oracle"
    over = Recorder(**create_method(spec).params())
    tiny.segment(scene.image, scene.query, over, instances=scene.instances)
    assert len(over.selected) > 1  # one token per instance, more than N_c
    r = tiny.segment(scene.image, scene.query, spec + ",fill=prune", instances=scene.instances)
    assert r.trace.image_tokens_per_layer[-1] < 8
    assert r.trace.n_avg == pytest.approx(n_avg(2, 1, 2, 8, 256, 8), abs=0.5 * 4 / 8)


def test_fill_changes_nothing_for_the_other_modules(tiny, image):
    spec = "csp:l_c=2,n_c=32,l_s=2,n_p=8,cluster=uniform"
    assert tiny.segment(image, QUERY, spec + ",fill=prune").trace.image_tokens_per_layer == \
        tiny.segment(image, QUERY, spec).trace.image_tokens_per_layer
    assert create_method("csp:cluster=uniform@70%", info=tiny.info).fill == "none"


@pytest.mark.parametrize("budget", ["50%", "80%"])  # with fill=none: N_avg 74 and 43, far off
def test_seg_first_budget_is_met_per_image(tiny, budget):
    m = create_method(f"csp:instances=oracle@{budget}", info=tiny.info)
    assert m.fill == "prune" and m.cluster == "seg_first"
    target = (1 - float(budget[:-1]) / 100) * 256
    for s in load_dataset("shapes-ref", "val", limit=3):
        r = tiny.segment(s.image, s.query, m, instances=s.instances)
        assert r.trace.n_avg == pytest.approx(target, abs=0.02 * 256)
    assert create_method(f"csp:fill=none,instances=oracle@{budget}", info=tiny.info).fill == "none"


INFO8 = ModelInfo(n_layers=8, n_image_tokens=256, grid=(16, 16), hidden_size=64, n_heads=4, n_kv_heads=2,
                  head_dim=16, intermediate_size=128, vision_layers=3, vision_hidden_size=64)


def test_seg_first_budget_without_room_for_the_fill_is_refused(tiny, image):
    r = tiny.segment(image, QUERY, create_method("csp@20%", info=tiny.info))  # N_c = N: nothing to fill
    assert r.trace.n_avg == pytest.approx(0.8 * 256, abs=0.02 * 256)
    two = replace(INFO8, n_layers=2)  # L_c 1, L_s 1, no pruning stage to take what Seg-First leaves
    with pytest.raises(ValueError, match="fill=none") as err:
        create_method("csp@30%", info=two)
    assert "\n" not in str(err.value)
    assert create_method("csp:fill=none@30%", info=two).config(two) == (1, 102, 1, 8)


def test_presets_scale_to_the_model():
    info = replace(INFO8, n_image_tokens=576, grid=(24, 24))
    assert LVLMCSP(preset=75).config(info) == (2, 286, 1, 9)  # (8, 64, 6, 4): layers near x 8 / 32, N_c from eq. 9
    for ratio, (l_c, n_c, l_s, n_p) in [(None, TABLE1), *PRESETS.items()]:
        if ratio == 90:  # one scattering layer of 256 already averages 32 > 29.1 on 8 layers
            with pytest.raises(ValueError, match="no \\(L_c, N_c, L_s\\) keeps"):
                LVLMCSP(preset=ratio).config(INFO8)
            continue
        lc, nc, ls, np_ = LVLMCSP(preset=ratio).config(INFO8)
        paper = n_avg(l_c, n_c, l_s, n_p, 256, 32) / 256
        assert abs(n_avg(lc, nc, ls, np_, 256, 8) / 256 - paper) < 0.005  # the preset's pruning ratio is kept
        assert (ls > lc) - (ls < lc) == (l_s > l_c) - (l_s < l_c)  # and its stage order (the paper's L_s < L_c)
    assert LVLMCSP(preset=65).config(replace(info, n_layers=32)) == (6, 128, 9, 32)  # Table 6's 336-px block


def test_user_errors_are_one_line(tiny, image):
    cases = [lambda: create_method("csp:l_c=0"), lambda: create_method("csp:preset=72"),
             lambda: create_method("csp:l_c=6,l_s=4").bind(INFO8),
             lambda: create_method("csp@95%", info=INFO8),
             lambda: tiny.segment(image, QUERY, "csp:instances=oracle")]
    for case, match in zip(cases, ["l_c must be >= 1", "preset", "exceeds the model's 8 layers", "out of reach",
                                   "instances=yolo"], strict=True):
        with pytest.raises(ValueError, match=match) as err:
            case()
        assert "\n" not in str(err.value)


def test_flops_of_a_seg_first_preset_print_the_nominal_schedule():
    from click.testing import CliRunner

    from harness.cli import main

    out = CliRunner().invoke(main, ["flops", "llava-1.5-7b-224", "--method", "csp:preset=65"])
    assert out.exit_code == 0, out.output
    assert "note: the nominal schedule (eq. 9" in out.output and "N_avg 86.5" in out.output  # Table 6: 86

"""LVLM_CSP (methods/csp.py) against the paper's equations and independent computations."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from harness.datasets import load_dataset
from harness.method import ModelInfo, create_method
from harness.methods.csp import LVLMCSP, PRESETS, n_avg, patch_coverage, seg_first_indices
from harness.model import TINY, build_random, tiny_tokenizer
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
    r = tiny.segment(image, QUERY, "csp:lc=2,nc=32,ls=3,np=8,cluster=uniform")
    assert r.trace.image_tokens_per_layer == [32] * 2 + [256] * 3 + [8] * 3
    assert r.trace.n_avg == n_avg(2, 32, 3, 8, 256, 8)


@pytest.mark.parametrize("ratio", sorted(PRESETS))
def test_table6_presets_navg_on_32_layers(deep, image, ratio):
    r = deep.segment(image, QUERY, f"csp:preset={ratio},cluster=uniform")
    lc, nc, ls, n_p = PRESETS[ratio]
    assert r.trace.image_tokens_per_layer == [nc] * lc + [256] * ls + [n_p] * (32 - lc - ls)
    assert r.trace.n_avg == pytest.approx((nc * lc + 256 * ls + n_p * (32 - lc - ls)) / 32)  # eq. 9
    assert math.floor(r.trace.n_avg) == TABLE6_NAVG[ratio]  # the paper prints it truncated


@pytest.mark.parametrize("cluster", ["random", "uniform", "cls"])
def test_reinserted_tokens_carry_layer0_embeddings(tiny, image, cluster):
    rec = Recorder(lc=3, nc=40, ls=2, np=10, cluster=cluster)
    tiny.segment(image, QUERY, rec)
    state, base = rec.reinserted, rec.assembled
    assert state.n_image == 256 and not state.held
    assert torch.equal(state.index, base.index)  # every token back, in original order and positions
    img = state.image_rows
    back = torch.ones(256, dtype=torch.bool)
    back[rec.selected] = False
    assert torch.equal(state.hidden[0, img[back]], base.hidden[0, img[back]])  # layer-0 embeddings
    assert not torch.allclose(state.hidden[0, img[~back]], base.hidden[0, img[~back]])  # L_c layers of updates


def test_uniform_is_eq2(tiny, image):
    rec = Recorder(lc=1, nc=96, ls=1, np=8, cluster="uniform")
    tiny.segment(image, QUERY, rec)
    assert rec.selected.tolist() == [2 * i for i in range(96)]  # S[i] = i floor(256 / 96): rows 12-15 unsampled


def test_cls_is_eq3_on_the_last_clip_layer(tiny, image):
    out, got = full_tower(tiny, image)
    heads = tiny.vision_tower.config.num_attention_heads
    q = got["q"].double().view(-1, heads, got["q"].shape[-1] // heads).transpose(0, 1)
    k = got["k"].double().view(-1, heads, got["k"].shape[-1] // heads).transpose(0, 1)
    probs = torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)  # per head, all keys
    ref = probs[:, 0, 1:].mean(0).topk(20).indices.sort().values
    rec = Recorder(lc=1, nc=20, ls=1, np=8, cluster="cls")
    tiny.segment(image, QUERY, rec)
    assert rec.selected.tolist() == ref.tolist()


def coverage_of(model, masks):
    from harness.engine import Context
    from harness.ledger import Ledger

    ctx = Context(model=model, info=model.info, ledger=Ledger(), rng=torch.Generator())
    return patch_coverage(masks, ctx, (16, 16))


def test_seg_first_counts_follow_eq4(scene, tiny):
    cov = coverage_of(tiny, scene.instances())
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
    rec = Recorder(lc=2, nc=8, ls=2, np=8, cluster="seg_first", instances="oracle")
    r = tiny.segment(scene.image, scene.query, rec, instances=scene.instances)
    cov = coverage_of(tiny, scene.instances())
    for i in range(len(cov)):
        assert bool((cov[i, rec.selected] > 0).any()), f"instance {i} got no token"
    assert r.trace.image_tokens_per_layer[0] == len(rec.selected)


def test_seg_first_with_yolo_counts_its_flops_and_time(tiny, scene):
    r = tiny.segment(scene.image, scene.query, "csp:lc=2,nc=16,ls=2,np=8")
    assert r.latency["instances"] > 0
    assert r.flops["method"] > 1e8  # the YOLO-seg network, not just the pruning row
    assert 1 <= r.trace.image_tokens_per_layer[0] <= 256


def test_keep_everything_equals_baseline(tiny, scene):
    base = tiny.segment(scene.image, scene.query, None)
    r = tiny.segment(scene.image, scene.query, "csp:nc=256,np=256,cluster=seg_first,instances=oracle",
                     instances=scene.instances)
    assert (r.seg_hidden - base.seg_hidden).abs().max() <= 1e-5


def test_prune_row_options_rank_with_different_rows(tiny, image):
    a = tiny.segment(image, QUERY, "csp:lc=1,nc=64,ls=2,np=8,cluster=uniform,prune_row=seg")
    b = tiny.segment(image, QUERY, "csp:lc=1,nc=64,ls=2,np=8,cluster=uniform,prune_row=seg_source")
    assert a.trace.kept_patches[-1] != b.trace.kept_patches[-1]


def test_generate_mode_prunes_with_the_prompt_row(tiny, image):
    r = tiny.segment(image, QUERY, "csp:lc=1,nc=64,ls=2,np=8,cluster=uniform", decode="generate", max_new_tokens=3)
    assert r.trace.image_tokens_per_layer == [64] + [256] * 2 + [8] * 5


@pytest.mark.parametrize("budget", [0.7, 0.8])
def test_budget_mapping_meets_the_target(tiny, budget):
    m = create_method(f"csp:cluster=uniform@{budget}", info=tiny.info)
    assert sum(m.image_schedule(tiny.info)) / 8 == pytest.approx((1 - budget) * 256, abs=0.02 * 256)


INFO8 = ModelInfo(n_layers=8, n_image_tokens=256, grid=(16, 16), hidden_size=64, n_heads=4, n_kv_heads=2,
                  head_dim=16, intermediate_size=128, vision_layers=3, vision_hidden_size=64)


def test_presets_scale_to_the_model():
    info = replace(INFO8, n_image_tokens=576, grid=(24, 24))
    assert LVLMCSP(preset=75).config(info) == (2, 144, 2, 9)  # (8, 64, 6, 4) x (8 / 32, 576 / 256)


def test_user_errors_are_one_line():
    with pytest.raises(ValueError, match="lc must be >= 1"):
        create_method("csp:lc=0")
    with pytest.raises(ValueError, match="preset"):
        create_method("csp:preset=72")
    with pytest.raises(ValueError, match="exceeds the model's 8 layers"):
        create_method("csp:lc=6,ls=4").bind(INFO8)


def test_oracle_without_annotations_says_how_to_fix(tiny, image):
    with pytest.raises(ValueError, match="instances=yolo"):
        tiny.segment(image, QUERY, "csp:instances=oracle")


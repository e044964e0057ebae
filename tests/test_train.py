"""The training path of `segprune train tiny` computes what inference computes, and its losses train."""

from __future__ import annotations

import pytest
import torch

from harness.engine import attention_rows
from harness.model import build_random, tiny_tokenizer
from harness.train import (
    TINY_SHAPES,
    LayerInputs,
    ShapesTrainData,
    TrainConfig,
    lisa_batch,
    lisa_losses,
    pointer_attention,
    reinit_decoder,
)


@pytest.fixture(scope="module")
def shapes_model_and_data(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SEGPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    from harness.datasets import shapes

    mp.setitem(shapes.SPLITS, "val", (1, 6, 2))  # a 6-image val split is enough here
    model = build_random(TINY_SHAPES, name="t", tokenizer=tiny_tokenizer())
    data = ShapesTrainData(model, split="val", pixel_dtype=torch.float32)
    yield model, data
    mp.undo()


def test_pointer_attention_matches_the_engines_attention_rows(tiny):
    torch.manual_seed(0)
    lm = tiny.language_model
    hidden = torch.randn(2, 40, lm.config.hidden_size)
    rows = torch.tensor([[30, 39], [12, 20]])
    got = pointer_attention(lm.layers[3], lm.rotary_emb, hidden, rows, head=1)
    for b in range(2):
        ref = attention_rows(lm.layers[3], lm.rotary_emb, hidden[b:b + 1], torch.arange(40), rows[b], head_mean=False)
        assert torch.allclose(got[b], ref[1], atol=1e-5)
    layer = lm.layers[3]
    every = pointer_attention(layer, lm.rotary_emb, hidden, rows, head=[0, 1, 2, 3])
    one_by_one = torch.stack([pointer_attention(layer, lm.rotary_emb, hidden, rows, head=h) for h in range(4)], 1)
    assert every.shape == (2, 4, 2, 40) and torch.allclose(every, one_by_one, atol=1e-6)


def test_training_forward_gives_the_inference_seg_embedding(shapes_model_and_data):
    model, data = shapes_model_and_data
    g = torch.Generator().manual_seed(0)
    batch = lisa_batch(model, data, [0, 1, 2], "cpu", g)
    lm = model.language_model
    hooks = LayerInputs(list(lm.layers))
    captured = {}
    handle = model.text_hidden_fcs[0].register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
    try:
        loss, parts = lisa_losses(model, batch, TrainConfig(blur_weight=0.0), hooks, [4, 5, 6, 7])
    finally:
        hooks.remove()
        handle.remove()
    for i, s in enumerate(batch["samples"]):
        r = model.segment(s.image, s.query, None, is_sentence=s.is_sentence)
        assert torch.allclose(captured["h"][i], r.seg_hidden[0], atol=1e-5), s.query
    assert torch.isfinite(loss) and set(parts) >= {"lm", "bce", "dice", "gather", "ptr", "align", "point"}


def test_gather_targets_are_exactly_the_query_tokens(shapes_model_and_data):
    model, data = shapes_model_and_data
    batch = lisa_batch(model, data, [0, 1, 2, 3], "cpu", torch.Generator().manual_seed(2))
    n = len(batch["pre"]) + model.info.n_image_tokens
    for i, s in enumerate(batch["samples"]):
        marked = [t for t, on in zip(batch["posts"][i], batch["query_at"][i, n:].tolist(), strict=False) if on]
        assert marked == model.tokenizer(s.query.strip(), add_special_tokens=False).input_ids, s.query
        assert batch["query_at"][i, :n].sum() == 0
        last_query_row = n + max(j for j, on in enumerate(batch["query_at"][i, n:].tolist()) if on)
        assert int(batch["ptr_rows"][i, 0]) == last_query_row  # pointer rows start at the query's last word


def test_reinit_decoder_scales_weights_to_their_fan_in():
    lm = build_random(TINY_SHAPES, name="t", tokenizer=tiny_tokenizer()).language_model
    reinit_decoder(lm, seed=0)
    w = lm.layers[0].mlp.down_proj.weight
    assert abs(float(w.std()) - w.shape[1] ** -0.5) < 0.1 * w.shape[1] ** -0.5
    assert abs(float(lm.embed_tokens.weight.std()) - 1) < 0.05


def test_lisa_losses_reach_the_trained_parameters(shapes_model_and_data):
    model, data = shapes_model_and_data
    batch = lisa_batch(model, data, [3, 4], "cpu", torch.Generator().manual_seed(1))
    lm = model.language_model
    params = [lm.layers[0].mlp.up_proj.weight, model.projector.weight, model.sam.mask_decoder.iou_token.weight,
              model.text_hidden_fcs[0][0].weight]
    for p in params:
        p.requires_grad_(True)
    hooks = LayerInputs(list(lm.layers))
    try:
        loss, _ = lisa_losses(model, batch, TrainConfig(blur_weight=0.0), hooks, [4, 5, 6, 7])
        loss.backward()
    finally:
        hooks.remove()
        for p in params:
            p.requires_grad_(False)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_value_and_blur_losses(shapes_model_and_data):
    """(d) and (e): the blurred pointer is a distribution with at least 0.3 of its mass on patches the target owns;
    the value loss falls when head 0's values are fitted to the per-patch codes; a zero weight skips a loss."""
    from harness.train import sam_point_code

    model, data = shapes_model_and_data
    batch = lisa_batch(model, data, [0, 1, 2], "cpu", torch.Generator().manual_seed(0),
                       torch.Generator().manual_seed(1))
    blur = batch["blur"]
    assert torch.allclose(blur.sum(-1), torch.ones(3)) and bool((blur >= 0).all())
    owned = (batch["patch_points"] == batch["points"][:, None]).all(-1)
    assert bool(((blur * owned).sum(-1) >= 0.3 - 1e-6).all())
    lm = model.language_model
    hooks = LayerInputs(list(lm.layers))
    try:
        _, parts = lisa_losses(model, batch, TrainConfig(value_weight=1.0, blur_weight=1.0), hooks, [4, 5, 6, 7])
        assert parts["value"] > 0.1 and parts["blur"] > 0
        cfg = TrainConfig(value_weight=1.0, blur_weight=0.0)
        _, before = lisa_losses(model, batch, cfg, hooks, [4])
        attn, norm = lm.layers[4].self_attn, lm.layers[4].input_layernorm
        n_pre = len(batch["pre"])
        with torch.no_grad():
            x = norm(hooks.store[4][:, n_pre:n_pre + 256]).flatten(0, 1)
            codes = sam_point_code(model, batch["patch_points"]).flatten(0, 1)
            saved = attn.v_proj.weight[:64].clone()
            attn.v_proj.weight[:64] = torch.linalg.lstsq(x, codes).solution.T  # head 0's value: the best linear map
        _, after = lisa_losses(model, batch, cfg, hooks, [4])
        with torch.no_grad():
            attn.v_proj.weight[:64] = saved  # the fixture's model is shared
        assert after["value"] < 0.5 * before["value"] and after["blur"] == 0.0
        no_blur = lisa_batch(model, data, [0, 1, 2], "cpu", torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="blur generator"):
            lisa_losses(model, no_blur, TrainConfig(blur_weight=1.0), hooks, [4])
    finally:
        hooks.remove()


def test_clip_losses_weigh_object_patches_and_clip_only_steps_train_clip_alone(shapes_model_and_data):
    """The attribute CE is taken again over the object patches (a CE over every patch is mostly background), and the
    CLIP-only steps move the CLIP tower without touching SAM."""
    import torch.nn.functional as F

    from harness.train import PatchHeads, _vision_batch, clip_losses, train_clip_more

    model, data = shapes_model_and_data
    torch.manual_seed(0)
    heads = PatchHeads(model.vision_tower.config.hidden_size, model.sam.config.prompt_encoder_config.hidden_size)
    _, clip_px, tt = _vision_batch(data, torch.Generator().manual_seed(0), 2, "cpu")
    assert tt["obj"].any() and not tt["obj"].all()
    with torch.no_grad():
        parts, _ = clip_losses(model, heads, clip_px, tt)
        feats = model.vision_tower(clip_px, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer][:, 1:]
        on = tt["obj"].flatten()
        expect = sum(F.cross_entropy(getattr(heads, k)(feats).flatten(0, 1), tt[k].flatten())
                     + F.cross_entropy(getattr(heads, k)(feats).flatten(0, 1)[on], tt[k].flatten()[on])
                     for k in ("colour", "shape", "size"))
    assert torch.allclose(parts["patch"], expect, rtol=1e-4)
    clip_before = [p.detach().clone() for p in model.vision_tower.parameters()]
    sam_before = [p.detach().clone() for p in model.sam.parameters()]
    model.train().requires_grad_(True)  # as the joint steps leave it: SAM could take a step if it were optimised
    try:
        train_clip_more(model, heads, data, TrainConfig(clip_steps=2, batch=2, warmup=1), lambda line: None)
        moved = any(not torch.equal(a, b) for a, b in zip(clip_before, model.vision_tower.parameters(), strict=True))
        kept = all(torch.equal(a, b) for a, b in zip(sam_before, model.sam.parameters(), strict=True))
    finally:
        model.eval().requires_grad_(False)
        with torch.no_grad():  # the fixture is shared: put the tower back
            for p in model.parameters():
                p.grad = None
            for p, old in zip(model.vision_tower.parameters(), clip_before, strict=True):
                p.copy_(old)
    assert moved and kept


def test_wired_copy_circuit_keeps_the_code_and_reads_it_out(shapes_model_and_data):
    """After `wire_copy_circuit`, nothing writes to the image tokens' code dims at any layer, head 0 of the later
    layers writes exactly what it attends to into the read dims, and text_hidden_fcs passes those through."""
    import copy

    from harness.train import wire_copy_circuit

    model, data = shapes_model_and_data
    model = copy.deepcopy(model)
    reinit_decoder(model.language_model, 0)
    nmse = wire_copy_circuit(model, data, n_images=4)
    assert 0 <= nmse < 1
    lm, c = model.language_model, model.sam.config.prompt_encoder_config.hidden_size
    hooks = LayerInputs(list(lm.layers))
    torch.manual_seed(0)
    img = model.projector(torch.randn(1, 256, model.vision_tower.config.hidden_size))
    x = torch.cat([lm.embed_tokens(torch.tensor([[1, 20, 21]])), img, lm.embed_tokens(torch.tensor([[30, 31]]))], 1)
    with torch.no_grad():
        lm(inputs_embeds=x)
        for i in range(1, len(lm.layers)):
            assert torch.allclose(hooks.store[i][:, :, :c], x[:, :, :c], atol=1e-5)  # the code dims are never written
        layer = lm.layers[3]
        rows = torch.tensor([[x.shape[1] - 1]])
        probs = pointer_attention(layer, lm.rotary_emb, hooks.store[3], rows)[0, 0]  # head 0's attention
        normed = layer.input_layernorm(hooks.store[3])[0]
        delta = hooks.store[4][0, -1, c:2 * c] - hooks.store[3][0, -1, c:2 * c]
        assert torch.allclose(delta, probs @ normed[:, :c], atol=1e-4)  # head 0 copies the code it attends to
        h = torch.randn(2, lm.config.hidden_size)
        label = model.sam.prompt_encoder.point_embed[1].weight.view(-1)
        assert torch.allclose(model.text_hidden_fcs[0](h), h[:, c:2 * c] + label, atol=1e-5)
    hooks.remove()

"""LLaVA-1.5 in the transformers layout: as a plain MLLM, and as the MLLM half of a segmentation model.

The reference is transformers' own `LlavaForConditionalGeneration.from_pretrained` on the raw folder (its loader, its
splice of the image features, its LLaMA), and the original segment_anything SAM for the mask.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from harness.cli import main
from harness.convert.llava import configs, convert_llava
from harness.loading import load_model
from tests.lisa_layouts import SamSpec, sam_state, write_llava_hf
from tests.lisa_reference import lisa_input_ids, sam_logits

QUERY = "the red circle"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    write_llava_hf(root / "llava-1.5-hf")
    write_llava_hf(root / "llava-1.5-seg-hf", seg_token=True)
    torch.save(sam_state(SamSpec()), root / "sam_tiny.pth")  # segment_anything's own names, as sam_vit_h_4b8939.pth
    gen = torch.Generator().manual_seed(1)
    torch.save({"text_hidden_fcs.0.0.weight": torch.randn(64, 64, generator=gen) * 0.1,
                "text_hidden_fcs.0.0.bias": torch.randn(64, generator=gen) * 0.1,
                "text_hidden_fcs.0.2.weight": torch.randn(32, 64, generator=gen) * 0.1,
                "text_hidden_fcs.0.2.bias": torch.randn(32, generator=gen) * 0.1}, root / "seg_head.bin")
    return root


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8))


def _stock_hidden(folder, model, image) -> torch.Tensor:
    """transformers' own LLaVA on the raw folder, fed the prompt ids of 4.31's slow tokenizer (LLaVA-1.5's template,
    computed in tests.lisa_reference from the sentencepiece model): final hidden state of the token before [SEG]."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    stock = AutoTokenizer.from_pretrained(folder)
    added = {"[SEG]": stock.get_vocab().get("[SEG]", len(stock))}  # a plain LLaVA: [SEG] appended
    ids = lisa_input_ids(folder, QUERY, False, added)
    at = ids.index(-200)
    assert model.prompt_ids(QUERY) == (ids[:at], ids[at + 1:])  # our tokenizer gives 4.31's ids
    assert ids[ids.index(added["[SEG]"]) - 1] == model.tokenizer.convert_tokens_to_ids(":")  # LISA's mask-token rule
    ids = ids[:at] + [hf.config.image_token_index] * model.info.n_image_tokens + ids[at + 1:]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), pixel_values=model.prepare(image).clip_pixels,
                 output_hidden_states=True)
    return out.hidden_states[-1][0, ids.index(added["[SEG]"]) - 1][None]


@pytest.mark.parametrize("hub_layout", [True, False])
def test_plain_llava_equals_transformers_own_forward(llava, tmp_path, hub_layout):
    src = llava / "llava-1.5-hf" if hub_layout else write_llava_hf(tmp_path / "v5-layout", hub_layout=False)
    model = load_model(convert_llava(src, tmp_path / "out"))
    assert model.sam is None and model.info.n_image_tokens == 36
    image = _image()
    want = _stock_hidden(src, model, image)
    out = model.segment(image, QUERY)
    assert out.mask is None and out.logits is None
    torch.testing.assert_close(out.seg_hidden, want, atol=1e-5, rtol=1e-4)
    answer = model.segment(image, QUERY, decode="generate", max_new_tokens=3).answer
    assert isinstance(answer, str)


def test_llava_with_sam_and_seg_head_segments_like_the_reference(llava, tmp_path):
    src = llava / "llava-1.5-seg-hf"
    result = CliRunner().invoke(main, ["convert", "llava", str(src), str(tmp_path / "out"),
                                       "--sam", str(llava / "sam_tiny.pth"), "--seg-head", str(llava / "seg_head.bin")])
    assert result.exit_code == 0, result.output
    assert "SAM a ViT of width 32" in result.output and "next: segprune run" in result.output
    model = load_model(tmp_path / "out")
    image = _image()
    hidden = _stock_hidden(src, model, image)
    head = torch.load(llava / "seg_head.bin", weights_only=True)
    e = torch.relu(hidden @ head["text_hidden_fcs.0.0.weight"].T + head["text_hidden_fcs.0.0.bias"])
    e = e @ head["text_hidden_fcs.0.2.weight"].T + head["text_hidden_fcs.0.2.bias"]
    want = sam_logits(torch.load(llava / "sam_tiny.pth", weights_only=True), SamSpec(), e, image)
    out = model.segment(image, QUERY)
    assert want.std() > 0.01
    torch.testing.assert_close(out.logits, want, atol=2e-5, rtol=1e-4)


def test_model_flag_converts_a_llava_folder_once(llava, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPRUNE_CACHE", str(tmp_path / "cache"))
    a = load_model(llava / "llava-1.5-hf")
    b = load_model(llava / "llava-1.5-hf")
    assert a.fingerprint() == b.fingerprint() and a.sam is None
    result = CliRunner().invoke(main, ["run", "--model", str(llava / "llava-1.5-hf"), "--limit", "1",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has no mask decoder (SAM)" in result.output


@pytest.mark.parametrize("case,options,message", [
    ("sam alone", dict(sam="sam_tiny.pth"), "--sam and --seg-head go together"),
    ("no [SEG]", dict(sam="sam_tiny.pth", seg_head="seg_head.bin"), "the tokenizer has no [SEG] token"),
])
def test_refusals(llava, tmp_path, case, options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert_llava(llava / "llava-1.5-hf", tmp_path / "out", **{k: llava / v for k, v in options.items()})
    assert not (tmp_path / "out").exists()


def test_config_refusals(llava, tmp_path):
    cfg = json.loads((llava / "llava-1.5-hf" / "config.json").read_text())
    for change, message in (({"model_type": "llava_next"}, "model_type 'llava_next'"),
                            ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full'")):
        with pytest.raises(ValueError, match=message):
            configs({**cfg, **change}, tmp_path)


def test_llava_hf_config_fills_transformers_defaults(tmp_path):
    """llava-hf/llava-1.5-7b-hf's config.json leaves most LLaMA fields to LlamaConfig's defaults (7B)."""
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
    llm, vision = configs(config, tmp_path)
    from harness.archs import CLIP_L14, LLAMA_7B

    assert llm == {**LLAMA_7B, "vocab_size": 32064, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                   "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
                   "pad_token_id": 0, "tie_word_embeddings": False}
    assert vision == {**CLIP_L14, "image_size": 336, "num_channels": 3}


def test_refuses_a_folder_without_the_sentencepiece_model(llava, tmp_path):
    src = tmp_path / "no-spm"
    shutil.copytree(llava / "llava-1.5-hf", src)
    (src / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="lacks tokenizer.model"):
        convert_llava(src, tmp_path / "out")


def test_a_folder_converted_by_an_older_segprune_is_refused(llava, tmp_path):
    out = convert_llava(llava / "llava-1.5-hf", tmp_path / "out")
    made = json.loads((out / "convert.json").read_text())
    (out / "convert.json").write_text(json.dumps({**made, "converter": 1}))
    with pytest.raises(ValueError, match="converted by an older segprune.*convert the LLaVA folder again"):
        load_model(out)

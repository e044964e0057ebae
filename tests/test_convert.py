"""Real checkpoints: LISA's released layouts converted and checked against an independent LISA forward.

No weights can be downloaded here, so the checkpoints are fabricated in the exact layouts (tests/lisa_layouts.py) and
our `segment()` is compared with tests/lisa_reference.py, which reads the raw tensors with plain torch and the
original segment_anything code. Tokenizer ids are compared with golden ids from the real transformers 4.31 slow
tokenizer (tests/data/lisa_tokenizer/make.py).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tqdm import tqdm

from harness.cli import main
from harness.convert.common import CONVERTER_VERSION
from harness.convert.lisa import convert_lisa, sam_config, sam_key
from harness.convert.tokenizer import lisa_tokenizer
from harness.loading import load_model
from tests.lisa_layouts import DATA, SAM_VIT_H, LisaSpec, SamSpec, build_sam, write_clip, write_lisa
from tests.lisa_reference import lisa_segment, slow_tokenize

GOLDEN = json.loads((DATA / "golden.json").read_text())
# LISA-7B-v1: one Linear projector, CLIP 224, two pickled shards with 4.31-era inv_freq buffers.
# LLaVA-1.5-based LISA (READ, LISA-AVS): mlp2x_gelu projector, CLIP 336 (here 84 px: 36 tokens), LLaMA-2-13B
# tokenizer, safetensors shards, grouped-query attention in the config.
LAYOUTS = {
    "lisa-7b-v1": (LisaSpec(), dict(image_size=56)),
    "llava-1.5-lisa": (LisaSpec(projector="mlp2x_gelu", tokenizer="13b", fmt="safetensors", shards=3, kv_heads=2,
                                inv_freq=False, sam=SamSpec(img_size=96, window=3, global_attn=(0,))),
                       dict(image_size=84)),
}


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    """layout -> (LISA folder, CLIP folder, converted folder, spec)."""
    out = {}
    for name, (spec, clip_kw) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        clip = write_clip(root / "clip-tiny", **clip_kw)
        spec.tower = str(clip)
        src = write_lisa(root / name, spec)
        out[name] = (src, clip, convert_lisa(src, root / "converted"), spec)
    return out


def _image(h: int = 90, w: int = 140, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("query,is_sentence", [("the red circle", False),
                                                ("What can be used to cut the bread? Please explain why.", True)])
def test_segment_equals_independent_lisa_forward(fabricated, layout, query, is_sentence):
    src, clip, dst, spec = fabricated[layout]
    model = load_model(dst)
    image = _image()
    ids, seg_hidden, logits = lisa_segment(src, clip, spec.sam, image, query, is_sentence)
    pre, post = model.prompt_ids(query, is_sentence=is_sentence)
    assert pre + [-200] + post == ids  # prompt ids, placeholder position included
    out = model.segment(image, query, is_sentence=is_sentence)
    assert out.logits.shape == logits.shape == (90, 140)
    assert logits.std() > 0.01 and 0.05 < (logits > 0).float().mean() < 0.95  # a mask worth comparing
    torch.testing.assert_close(out.seg_hidden, seg_hidden, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, logits, atol=2e-5, rtol=1e-4)


def test_converted_folder_describes_the_model(fabricated):
    _, _, dst, _ = fabricated["llava-1.5-lisa"]
    cfg = json.loads((dst / "segprune.json").read_text())
    assert cfg["projector"] == "mlp2x_gelu" and cfg["llm"]["num_key_value_heads"] == 2
    assert cfg["vision"]["image_size"] == 84 and cfg["use_mm_start_end"]
    info = json.loads((dst / "convert.json").read_text())
    assert len(info["source_files"]) == 3 and all(len(f["sha256"]) == 64 for f in info["source_files"].values())
    # LLaMA side in bf16 (embed, 2 x 9 per layer, norm, 4 projector, 4 text_hidden_fcs, lm_head), SAM and CLIP fp32
    assert info["dtypes"] == {"bfloat16": 29, "float32": info["tensors"] - 29}
    assert load_model(dst).info.n_image_tokens == 36
    from harness.files import usual_mode

    assert {f.stat().st_mode & 0o777 for f in dst.glob("model-*.safetensors")} == {usual_mode(0o666)}


@pytest.mark.parametrize("name", ["7b", "13b"])
def test_tokenizer_ids_equal_transformers_4_31(tmp_path, name):
    for f in (DATA / name).iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(DATA / "tokenizer.model", tmp_path)
    tok = lisa_tokenizer(tmp_path, need_im_tokens=True)
    tok.save_pretrained(tmp_path / "saved")
    from transformers import PreTrainedTokenizerFast

    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "saved")  # what a converted folder loads
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions.")
    for case in GOLDEN["cases"][name]:
        q = case["query"]
        ask = f"{q} Please output segmentation mask." if case["is_sentence"] else \
            f"What is {q} in this image? Please output segmentation mask."
        post = f"<im_end>\n {ask} ASSISTANT:" + (" [SEG].</s>" if case["answer"] else "")
        for t in (tok, reloaded):
            assert t(f"{system} USER: <im_start>").input_ids + [-200] + \
                t(post, add_special_tokens=False).input_ids == case["ids"], q
    assert tok.convert_tokens_to_ids("[SEG]") == GOLDEN["cases"][name + "_seg"][0]


def test_reference_tokenizer_equals_golden_and_ours_on_arbitrary_text(tmp_path):
    """The reference's own rules reproduce 4.31 on the golden cases, and ours agree with them on odd strings."""
    import sentencepiece as spm

    for f in (DATA / "7b").iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(DATA / "tokenizer.model", tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    tok = lisa_tokenizer(tmp_path, need_im_tokens=True)
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions.")
    for case in GOLDEN["cases"]["7b"]:  # the reference's rules reproduce the real 4.31 tokenizer
        q = case["query"]
        ask = f"{q} Please output segmentation mask." if case["is_sentence"] else \
            f"What is {q} in this image? Please output segmentation mask."
        post = f"<im_end>\n {ask} ASSISTANT:" + (" [SEG].</s>" if case["answer"] else "")
        chunks = [f"{system} USER: <im_start>", post]
        assert slow_tokenize(sp, added, chunks[0]) + [-200] + slow_tokenize(sp, added, chunks[1])[1:] == case["ids"]
    rng = np.random.default_rng(0)
    words = ["red", " circle", "[SEG]", "<im_start>", "<im_end>", "<im_patch>", " ", "  ", "\n", ".", "?", "42",
             "caf\u00e9", "\u4e2d", "</s>", "ASSISTANT:", "\t", "Please"]
    for _ in range(300):
        text = "".join(rng.choice(words, size=rng.integers(1, 12)))
        assert tok(text).input_ids == slow_tokenize(sp, added, text), repr(text)


def test_sam_config_read_from_vit_h_shapes():
    with torch.device("meta"):
        sam = build_sam(SAM_VIT_H)
    shapes = {"sam." + sam_key(k): tuple(v.shape) for k, v in sam.state_dict().items()}
    shapes = {k.replace("sam.prompt_encoder.shared_embedding.", "sam.shared_image_embedding."): v
              for k, v in shapes.items()}
    cfg = sam_config(shapes)
    from harness.archs import SAM_VIT_H as ours

    assert {k: cfg["vision"][k] for k in ours["vision"]} == ours["vision"]
    assert {k: cfg["decoder"][k] for k in ours["decoder"]} == ours["decoder"]
    assert cfg["vision"]["mlp_dim"] == 5120 and cfg["vision"]["num_pos_feats"] == 128
    # order matters: layers.0 -> proj_in must run before layers.1 -> layers.0
    head = "mask_decoder.iou_prediction_head."
    assert sam_key(head + "layers.1.weight") == head + "layers.0.weight"
    assert sam_key(head + "layers.0.weight") == head + "proj_in.weight"


# -- refusals --------------------------------------------------------------------------------------------------------
def _copy(fabricated, tmp_path, layout="lisa-7b-v1") -> tuple[Path, Path]:
    src, clip, _, _ = fabricated[layout]
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst, clip


def _edit_shard(folder: Path, edit) -> None:
    """Apply `edit(state, index)` to the first .bin shard and its index."""
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    edit(state, index["weight_map"], shard.name)
    torch.save(state, shard)
    index_path.write_text(json.dumps(index))


def _set(d: dict, key: str, value, shard: str) -> None:
    d[key] = value


REFUSALS = {
    "missing shard": (lambda f: (f / "pytorch_model-00002-of-00002.bin").unlink(),
                      "pytorch_model-00002-of-00002.bin is missing (named by pytorch_model.bin.index.json)"),
    "index names an absent tensor": (
        lambda f: _edit_shard(f, lambda s, m, n: s.pop("model.norm.weight") if "model.norm.weight" in s
                              else s.pop(next(k for k in s if m[k] == n))), "the index names 1 tensor(s) that"),
    "tensor not in the index": (lambda f: _edit_shard(f, lambda s, m, n: _set(s, "model.extra", torch.zeros(1), n)),
                                "holds 1 tensor(s) its index does not name"),
    "unexpected tensor": (
        lambda f: _edit_shard(f, lambda s, m, n: (_set(s, "model.layers.9.mlp.up_proj.weight", torch.zeros(1), n),
                                                  _set(m, "model.layers.9.mlp.up_proj.weight", n, n))),
        "the model has no place for (e.g. language_model.layers.9.mlp.up_proj.weight)"),
    "not a LISA tensor": (
        lambda f: _edit_shard(f, lambda s, m, n: (_set(s, "model.foo.weight", torch.zeros(1), n),
                                                  _set(m, "model.foo.weight", n, n))),
        "are not part of a LISA model (e.g. model.foo.weight)"),
    "missing tensor": (
        lambda f: _edit_shard(f, lambda s, m, n: (s.pop("model.layers.0.mlp.up_proj.weight"),
                                                  m.pop("model.layers.0.mlp.up_proj.weight"))),
        "lacks 1 tensor(s) a LISA model needs (e.g. language_model.layers.0.mlp.up_proj.weight)"),
    "pickled code": (
        lambda f: _edit_shard(f, lambda s, m, n: (_set(s, "model.args", __import__("argparse").Namespace(), n),
                                                  _set(m, "model.args", n, n))),
        "needs more than tensors to unpickle (it references argparse.Namespace)"),
    "GLaMM": (lambda f: _edit_shard(f, lambda s, m, n: (_set(s, "model.grounding_encoder.x", torch.zeros(1), n),
                                                         _set(m, "model.grounding_encoder.x", n, n))),
              "is a GLaMM (its SAM is `grounding_encoder`) checkpoint"),
    "Sa2VA": (lambda f: _edit_shard(f, lambda s, m, n: (_set(s, "grounding_encoder.sam2_model.x", torch.zeros(1), n),
                                                         _set(m, "grounding_encoder.sam2_model.x", n, n))),
              "is a Sa2VA (InternVL + SAM-2) checkpoint"),
    "LISA++": (lambda f: _edit_config(f, _name_or_path="Senqiao/LISA_Plus_7b"), "is a LISA++ checkpoint"),
    "shape mismatch": (lambda f: _edit_config(f, intermediate_size=96),
                       "config.json implies [96, 64]"),
    "legacy false": (lambda f: _edit_json(f / "tokenizer_config.json", legacy=False), "sets legacy: false"),
    "no tokenizer": (lambda f: (f / "tokenizer.model").unlink(), "lacks the tokenizer file(s) tokenizer.model"),
    "no im tokens": (lambda f: (f / "added_tokens.json").write_text('{"[SEG]": 400}'), "lacks <im_start> / <im_end>"),
    "CLIP resolution": (lambda f: _edit_config(f, mm_vision_tower="openai/clip-vit-large-patch14-336"),
                        "(336 px) but the CLIP folder"),
    "tokenizer of another checkpoint": (lambda f: _edit_config(f, vocab_size=100),
                                        "the tokenizer has 404 tokens but config.json a vocab_size of 100"),
    "Git LFS pointer": (lambda f: (f / "pytorch_model-00001-of-00002.bin").write_text(LFS_POINTER),
                        "pytorch_model-00001-of-00002.bin is a Git LFS pointer, not the file itself"),
    "tokenizer.model a pointer": (lambda f: (f / "tokenizer.model").write_text(LFS_POINTER),
                                  "tokenizer.model is a Git LFS pointer"),
    "tokenizer.model corrupt": (lambda f: (f / "tokenizer.model").write_bytes(b"\x00garbage" * 50),
                                "tokenizer.model is not a sentencepiece model"),
    "random bytes": (lambda f: (f / "pytorch_model-00001-of-00002.bin").write_bytes(bytes(range(7, 250)) * 40),
                     "is not a PyTorch checkpoint (neither torch.save's zip nor a pickle)"),
    "truncated shard": (lambda f: _truncate(f / "pytorch_model-00001-of-00002.bin"),
                        "pytorch_model-00001-of-00002.bin is not a readable PyTorch checkpoint"),
    "config a list": (lambda f: (f / "config.json").write_text("[]"), "config.json is corrupt (a JSON list"),
    "weight_map a list": (lambda f: _edit_json(f / "pytorch_model.bin.index.json", weight_map=[]),
                          "pytorch_model.bin.index.json is not a shard index"),
    "scaled RoPE": (lambda f: _edit_config(f, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
}


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
               "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 9976634558\n")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _edit_config(folder: Path, **fields) -> None:
    _edit_json(folder / "config.json", **fields)


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_leave_nothing(fabricated, tmp_path, case):
    src, clip = _copy(fabricated, tmp_path)
    damage, message = REFUSALS[case]
    damage(src)
    result = CliRunner().invoke(main, ["convert", "lisa", str(src), str(tmp_path / "out"), "--clip", str(clip)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left in (["src"], [".out.lock", "src"])  # no output, no staging folder left behind (the lock file may stay)


def test_v0_text_hidden_fcs_in_their_own_file(fabricated, tmp_path):
    """LISA-13B-llama2-v0 keeps text_hidden_fcs in pytorch_model-text_hidden_fcs.bin, outside the index."""
    src, clip = _copy(fabricated, tmp_path)
    fcs = {}

    def move(state, weight_map, shard):
        for k in [k for k in state if k.startswith("model.text_hidden_fcs.")]:
            fcs[k.removeprefix("model.")] = state.pop(k)
            weight_map.pop(k)

    for shard in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"):
        index_path = src / "pytorch_model.bin.index.json"
        index = json.loads(index_path.read_text())
        state = torch.load(src / shard, weights_only=True)
        move(state, index["weight_map"], shard)
        torch.save(state, src / shard)
        index_path.write_text(json.dumps(index))
    assert len(fcs) == 4
    torch.save(fcs, src / "pytorch_model-text_hidden_fcs.bin")
    bar = tqdm(total=0, file=io.StringIO(), disable=False)  # the bar counts every file read, the v0 one too
    ours = load_model(convert_lisa(src, tmp_path / "out", clip=clip, progress=bar)).state_dict()
    assert bar.n == bar.total == sum(f.stat().st_size for f in src.glob("*.bin"))
    reference = load_model(fabricated["lisa-7b-v1"][2]).state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_missing_clip_names_the_fixes(fabricated, tmp_path, monkeypatch):
    src, _ = _copy(fabricated, tmp_path)
    _edit_config(src, mm_vision_tower="openai/clip-vit-large-patch14")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    monkeypatch.delenv("SEGPRUNE_CLIP", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ValueError, match="nor in the local Hugging Face cache; download it once.*--clip DIR"):
        convert_lisa(src, tmp_path / "out")


def test_cli_converts_and_runs_and_model_converts_on_first_use(fabricated, tmp_path, monkeypatch):
    src, clip, _, _ = fabricated["lisa-7b-v1"]
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert", "lisa", str(src), str(out), "--clip", str(clip), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "16 image tokens" in result.output and f"next: segprune run --model {out}" in result.output
    assert json.loads((out / "convert.json").read_text())["dtypes"] == {"bfloat16": 256}
    again = CliRunner().invoke(main, ["convert", "lisa", str(src), str(out), "--clip", str(clip)])
    assert again.exit_code == 2 and "exists" in again.output
    # --model on the unconverted folder: converted once into the cache (the tower in config.json is a local path)
    monkeypatch.setenv("SEGPRUNE_CACHE", str(tmp_path / "cache"))
    first = load_model(src)
    cached = list((tmp_path / "cache" / "converted").iterdir())
    assert [p.name.startswith("lisa-7b-v1-") for p in cached if not p.name.startswith(".")] == [True]
    second = load_model(src)
    assert first.fingerprint() == second.fingerprint() == load_model(fabricated["lisa-7b-v1"][2]).fingerprint()
    # another CLIP (here through $SEGPRUNE_CLIP) is another model: converted again, not taken from the cache
    other = write_clip(tmp_path / "other-clip", image_size=56, seed=5)
    monkeypatch.setenv("SEGPRUNE_CLIP", str(other))
    third = load_model(src)
    assert len([p for p in (tmp_path / "cache" / "converted").iterdir() if not p.name.startswith(".")]) == 2
    assert third.fingerprint() != first.fingerprint()
    assert json.loads((out / "convert.json").read_text())["converter"] == CONVERTER_VERSION
    # the CLIP gone since (no $SEGPRUNE_CLIP, the config's local tower moved away): the cached conversion still loads
    monkeypatch.delenv("SEGPRUNE_CLIP")
    moved = clip.with_name(clip.name + "-moved")
    clip.rename(moved)
    try:
        assert load_model(src).sam is not None
        with pytest.raises(ValueError, match="is neither a local folder nor in the local Hugging Face cache"):
            convert_lisa(src, tmp_path / "again")
    finally:
        moved.rename(clip)
    monkeypatch.setenv("SEGPRUNE_CLIP", str(tmp_path / "no-such-clip"))
    with pytest.raises(ValueError, match=r"no-such-clip \(\$SEGPRUNE_CLIP\) does not exist"):
        convert_lisa(src, tmp_path / "again")


def test_two_converters_into_one_folder(fabricated, tmp_path):
    from harness.files import exclusive

    src, clip, _, _ = fabricated["lisa-7b-v1"]
    with exclusive(tmp_path / ".out.lock", wait=False):  # as another process converting into out/ holds it
        with pytest.raises(ValueError, match="another process .* is converting into"):
            convert_lisa(src, tmp_path / "out", clip=clip)
    assert not (tmp_path / "out").exists()
    convert_lisa(src, tmp_path / "out", clip=clip)  # free again: converts
    with pytest.raises(ValueError, match="out exists; remove it or choose another destination"):
        convert_lisa(src, tmp_path / "out", clip=clip)  # the finished folder is never written over
    assert (tmp_path / "out" / "segprune.json").is_file() and not (tmp_path / ".out.partial").exists()


def test_shards_are_read_one_at_a_time(fabricated, monkeypatch):
    """The previous shard's tensors are freed before the next file is read (peak memory: one shard)."""
    import weakref

    from harness.convert import sources

    src = fabricated["lisa-7b-v1"][0]
    alive_at_read, refs = [], []
    real = sources.load_file

    def load(path):
        alive_at_read.append(sum(r() is not None for r in refs))
        return real(path)

    monkeypatch.setattr(sources, "load_file", load)
    for _, state in sources.iter_shards(sources.find_checkpoint(src)):
        refs += [weakref.ref(t) for t in state.values()]
        del state
    assert len(alive_at_read) == 2 and alive_at_read == [0, 0]


def test_a_converter_that_finished_while_we_waited_is_not_overwritten(fabricated, tmp_path, monkeypatch):
    """The destination is checked under the lock: another converter may have renamed its stage into place between
    our first look and taking the lock."""
    import contextlib

    from harness import files

    src, clip, _, _ = fabricated["lisa-7b-v1"]
    real = files.exclusive

    @contextlib.contextmanager
    def late(path, *, wait):
        with real(path, wait=wait):
            (tmp_path / "out").mkdir()  # the other converter's result appears just before we hold the lock
            (tmp_path / "out" / "segprune.json").write_text("{}")
            yield

    monkeypatch.setattr(files, "exclusive", late)
    with pytest.raises(ValueError, match="out exists; remove it or choose another destination"):
        convert_lisa(src, tmp_path / "out", clip=clip)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["segprune.json"]

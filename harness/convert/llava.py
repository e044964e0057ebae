"""LLaVA-1.5 in the transformers layout (`llava-hf/llava-1.5-7b-hf`, `LlavaForConditionalGeneration`) -> segprune.

Two uses:
- **the MLLM half of a segmentation model**: with `sam` (an original SAM checkpoint, `sam_vit_h_4b8939.pth`, keys
  `image_encoder.*` / `prompt_encoder.*` / `mask_decoder.*`) and `seg_head` (LISA's `text_hidden_fcs`), for a LLaVA
  whose tokenizer already has the `[SEG]` token those weights were trained with;
- **a plain MLLM** (no SAM): FLOPs, latency, `generate` and where the tokens went, no masks. `[SEG]` is added to
  its tokenizer as an untrained token, only so that the evaluation template has its usual length and layout.

Keys, in both layouts transformers has written (4.x: `language_model.model.*`, `vision_tower.vision_model.*`; 5.x:
the same or `model.language_model.*`, `model.vision_tower.*`): LLaMA -> `language_model.*`, `lm_head`, CLIP ->
`vision_tower.*`, `multi_modal_projector.linear_{1,2}` -> `projector.{0,2}` (mlp2x_gelu). The configuration comes
from `config.json` with transformers' own defaults for the fields llava-hf leaves out. Prompts use LISA's template
without `<im_start>/<im_end>` (LLaVA-1.5's llava_v1), tokenized as LLaVA-1.5 and LISA trained (transformers 4.31's
slow tokenizer from `tokenizer.model`, added tokens stripping the spaces around them, so the token before [SEG] is
":"; `harness.convert.tokenizer`), and images LISA's centre crop (LLaVA-1.5 itself pads to a square: a deviation for
plain-LLaVA numbers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.convert.common import Writer, check_against_model, manifest, read_weights, staged, write_folder
from harness.convert.lisa import checked_sam_config, clip_fields, llm_config, sam_model_key
from harness.convert.sources import Checkpoint, find_checkpoint
from harness.convert.tokenizer import llava_tokenizer
from harness.files import read_json

if TYPE_CHECKING:
    from tqdm import tqdm


def llava_key(key: str) -> str | None:
    """Our name for a key of a transformers-layout LLaVA checkpoint; KeyError for one we do not know."""
    key = re.sub(r"^model\.(language_model|vision_tower|multi_modal_projector)\.", r"\1.", key)  # 5.x module names
    if key.startswith("language_model.model."):
        return "language_model." + key[len("language_model.model."):]
    if key in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    if key.startswith("language_model.") and not key.startswith("language_model.lm_head"):
        return key  # 5.x: language_model.{embed_tokens,layers,norm}
    if key.startswith("vision_tower."):
        key = key.removeprefix("vision_tower.").removeprefix("vision_model.")
        return None if key == "embeddings.position_ids" else "vision_tower." + key
    if m := re.fullmatch(r"multi_modal_projector\.linear_([12])\.(weight|bias)", key):
        return f"projector.{0 if m.group(1) == '1' else 2}.{m.group(2)}"
    raise KeyError(key)


def sam_original_key(key: str) -> str:
    """Our name for a key of an original SAM checkpoint (segment_anything's names)."""
    if not key.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")):
        raise KeyError(key)
    return sam_model_key(key)


def seg_head_key(key: str) -> str:
    key = key.removeprefix("model.")
    if not key.startswith("text_hidden_fcs.0."):
        raise KeyError(key)
    return key


def configs(config: dict, src: Path) -> tuple[dict, dict]:
    """(LlamaConfig fields, CLIPVisionConfig fields) from a LlavaConfig dict, with transformers' defaults."""
    from transformers import LlamaConfig

    if config.get("model_type") != "llava":
        raise ValueError(f"{src}/config.json has model_type {config.get('model_type')!r}; `convert llava` reads "
                         f"LLaVA-1.5 (model_type llava: LlavaForConditionalGeneration); LLaVA-NeXT and others differ")
    text, vision = dict(config.get("text_config") or {}), dict(config.get("vision_config") or {})
    kinds = text.get("model_type", "llama"), vision.get("model_type", "clip_vision_model")
    if kinds != ("llama", "clip_vision_model"):
        raise ValueError(f"{src}: segprune runs LLaVA with a LLaMA language model and a CLIP tower, not "
                         f"{text.get('model_type')} + {vision.get('model_type')}")
    for key, want in (("vision_feature_select_strategy", "default"), ("projector_hidden_act", "gelu"),
                      ("multimodal_projector_bias", True)):
        if config.get(key, want) != want:
            raise ValueError(f"{src}/config.json sets {key} {config[key]!r}; segprune's LLaVA-1.5 path needs "
                             f"{want!r}")
    if not isinstance(config.get("vision_feature_layer", -2), int):
        raise ValueError(f"{src}/config.json takes features from several CLIP layers; segprune takes one")
    base = LlamaConfig()
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rms_norm_eps", "max_position_embeddings", "vocab_size", "hidden_act")
    llm = {**{f: getattr(base, f) for f in fields}, **{k: v for k, v in text.items() if k in fields}}
    rope = text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    llm = llm_config({**llm, "rope_theta": rope, "rope_scaling": text.get("rope_scaling"),
                      "num_key_value_heads": text.get("num_key_value_heads") or llm["num_attention_heads"]})
    return llm, clip_fields(vision)


def convert_llava(src: str | os.PathLike, dst: str | os.PathLike, *, sam: str | os.PathLike | None = None,
                  seg_head: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                  progress: tqdm | None = None) -> Path:
    """Convert the transformers-layout LLaVA-1.5 folder `src` into the segprune model folder `dst`.

    Args:
        sam: an original SAM checkpoint file; with `seg_head`, the result is a segmentation model.
        seg_head: a file with LISA's `text_hidden_fcs.0.{0,2}.*` (or `model.text_hidden_fcs...`) tensors.
        dtype: cast floating tensors (default: as stored).
        progress: a bar (`harness.convert.common.progress_bar`) counting the source files' bytes.
    """
    from harness.model import SegModel, SegModelConfig

    src, dst = Path(src), Path(dst)
    if (sam is None) != (seg_head is None):
        raise ValueError("--sam and --seg-head go together (a mask decoder needs the head that feeds it); give both, "
                         "or neither for a plain MLLM")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; expected a transformers LLaVA-1.5 folder (llava-hf layout)")
    config = read_json(src / "config.json", "download it again")
    llm, vision = configs(config, src)
    ckpt = find_checkpoint(src, "LLaVA checkpoint")
    tokenizer = llava_tokenizer(src, add_seg=sam is None)  # untrained [SEG]: see the module docstring
    if "[SEG]" not in tokenizer.get_vocab():
        raise ValueError(f"{src}: the tokenizer has no [SEG] token, so no SAM head can have been trained with this "
                         f"LLaVA; convert without --sam/--seg-head for a plain MLLM")
    if len(tokenizer) > llm["vocab_size"]:
        raise ValueError(f"{src}: the tokenizer has {len(tokenizer)} tokens but the embeddings "
                         f"{llm['vocab_size']} rows")

    extra = [Path(p) for p in (sam, seg_head) if p is not None]
    for p in extra:
        if not p.is_file():
            raise ValueError(f"{p} not found")
    with staged(dst) as stage:
        writer = Writer(stage, dtype)
        read_weights(ckpt, llava_key, writer, progress, src, family="LLaVA")
        if sam is not None:
            for path, rename, family in ((Path(sam), sam_original_key, "SAM"),
                                         (Path(seg_head), seg_head_key, "seg head")):
                read_weights(Checkpoint(path.parent, [path], None), rename, writer, None, path, family=family)
        fcs = writer.shapes.get("text_hidden_fcs.0.2.weight")
        sam_cfg = checked_sam_config(writer.shapes, Path(sam)) if sam else None
        cfg = SegModelConfig(vision=vision, llm=llm, sam=sam_cfg, projector="mlp2x_gelu",
                             seg_out_dim=fcs[0] if fcs else 256, use_mm_start_end=False, name=src.name,
                             vision_feature_layer=int(config.get("vision_feature_layer", -2)))
        check_against_model(writer.shapes, SegModel.expected_shapes(cfg, tokenizer), src, family="LLaVA")
        write_folder(stage, writer, cfg, tokenizer, manifest("llava", ckpt, extra, writer, "mlp2x_gelu"),
                     src / "config.json")
    return dst


def is_llava_folder(folder: Path) -> bool:
    """A transformers-layout LLaVA folder (what `--model` accepts and converts, as a plain MLLM, on first use)."""
    path = folder / "config.json"
    if not path.is_file() or (folder / "segprune.json").is_file():
        return False
    config = read_json(path, "download it again")
    return config.get("model_type") == "llava" and "text_config" in config

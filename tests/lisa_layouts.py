"""Fabricated checkpoints in the exact layouts researchers download (no weights can be downloaded here).

`write_lisa` writes a LISA checkpoint folder as LISA's merge script leaves it (reference/lisa-on-transformers.md A2,
A9): the flat LLaVA `config.json`, LISA's tokenizer files as transformers 4.31 saved them (tests/data/lisa_tokenizer),
and the weights sharded with an index: LLaMA keys `model.*` in bf16, SAM keys `model.visual_model.*` straight from
the original `segment_anything` modules in fp32, `text_hidden_fcs`, a one-Linear or mlp2x_gelu projector, no CLIP.
`write_clip` writes an openai/clip-vit-large-patch14 folder (CLIPModel config, `vision_model.*` + `text_model.*`).
Shapes are parameters, so the same code writes tiny models for the tests and a LISA-7B-shape one for the slow test;
shards are generated and saved one at a time.

    python tests/lisa_layouts.py lisa-7b /tmp/LISA-7B-v1 --clip /tmp/clip-vit-large-patch14   (about 16 + 1.2 GB)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).parent / "data" / "lisa_tokenizer"


@dataclass
class SamSpec:
    """segment_anything constructor arguments (build_sam.py's, at any size)."""

    img_size: int = 128
    patch: int = 16
    embed_dim: int = 32
    depth: int = 2
    heads: int = 2
    global_attn: tuple[int, ...] = (1,)
    window: int = 4
    out_chans: int = 32
    decoder_depth: int = 2
    decoder_mlp: int = 64
    iou_hidden: int = 32

    @property
    def grid(self) -> int:
        return self.img_size // self.patch


SAM_VIT_H = SamSpec(img_size=1024, patch=16, embed_dim=1280, depth=32, heads=16, global_attn=(7, 15, 23, 31),
                    window=14, out_chans=256, decoder_depth=2, decoder_mlp=2048, iou_hidden=256)


@dataclass
class LisaSpec:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None  # None: the config has no num_key_value_heads (LLaMA-1 era)
    rms_eps: float = 1e-6
    max_pos: int = 2048
    projector: str = "linear"  # or "mlp2x_gelu"
    clip_hidden: int = 32
    tower: str = "openai/clip-vit-large-patch14"
    tokenizer: str = "7b"  # tests/data/lisa_tokenizer/<name>: 7b (<im_patch>, <im_start>, <im_end>, [SEG]) or 13b
    out_dim: int = 32
    sam: SamSpec = field(default_factory=SamSpec)
    shards: int = 2  # split by tensor count (tiny models), unless max_shard_bytes is set
    max_shard_bytes: int | None = None  # transformers 4.31's save_pretrained: a new shard once 10 GB would be passed
    fmt: str = "bin"  # "bin" (released LISA) or "safetensors"
    inv_freq: bool = True  # 4.31-era files may hold model.layers.{i}.self_attn.rotary_emb.inv_freq
    vocab: int | None = None  # default: the tokenizer's length (LISA resizes the embeddings to it)


LISA_7B = LisaSpec(hidden=4096, intermediate=11008, layers=32, heads=32, clip_hidden=1024, out_dim=256,
                   sam=SAM_VIT_H, vocab=32004, max_shard_bytes=10**10)


def _noise(t: torch.Tensor, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std).to(t.dtype))


def sam_state(spec: SamSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised original SAM (segment_anything) state dict, every tensor perturbed (fp32)."""
    sam = build_sam(spec)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in sam.state_dict().items():
        v = v.clone()
        base = 1.0 if k.endswith("weight") and ("norm" in k or "neck.1" in k or "neck.3" in k) else 0.0
        if v.ndim and "positional_encoding_gaussian_matrix" not in k:
            _noise(v, gen, 0.2 if k.startswith("mask_decoder.") else 0.05)
            v += base
        state[k] = v
    return state


def build_sam(spec: SamSpec) -> nn.Module:
    """segment_anything's `_build_sam` with `spec`'s sizes: the original SAM code LISA's `visual_model` is."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_encoder = ImageEncoderViT(
        img_size=spec.img_size, patch_size=spec.patch, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.heads, mlp_ratio=4, out_chans=spec.out_chans, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, rel_pos_zero_init=True,
        window_size=spec.window, global_attn_indexes=spec.global_attn)
    prompt_encoder = PromptEncoder(embed_dim=spec.out_chans, image_embedding_size=(spec.grid, spec.grid),
                                       input_image_size=(spec.img_size, spec.img_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3, transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.out_chans,
                                                               mlp_dim=spec.decoder_mlp, num_heads=8),
        transformer_dim=spec.out_chans, iou_head_depth=3, iou_head_hidden_dim=spec.iou_hidden)
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def tokenizer_length(name: str) -> int:
    added = json.loads((DATA / name / "added_tokens.json").read_text())
    return max(added.values()) + 1


def lisa_config(spec: LisaSpec, vocab: int) -> dict:
    """LISA-7B-v1's config.json fields (the old flat LLaVA config saved by transformers 4.31)."""
    cfg = {
        "_name_or_path": "./LLaVA/LLaVA-Lightning-7B-v1-1", "architectures": ["LISAForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": spec.hidden,
        "image_aspect_ratio": "square", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": spec.intermediate, "max_position_embeddings": spec.max_pos,
        "max_sequence_length": spec.max_pos, "mm_hidden_size": spec.clip_hidden, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": spec.tower, "model_type": "llava", "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers, "out_dim": spec.out_dim, "pad_token_id": 0, "pretrain_mm_mlp_adapter": None,
        "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "train_mask_decoder": True, "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False,
        "use_cache": False, "use_mm_proj": True, "vision_tower": spec.tower, "vocab_size": vocab,
    }
    if spec.kv_heads is not None:
        cfg.update(num_key_value_heads=spec.kv_heads, pretraining_tp=1, rope_scaling=None)
    if spec.projector == "mlp2x_gelu":  # LLaVA-1.5-based LISA variants
        cfg["mm_projector_type"] = "mlp2x_gelu"
    return cfg


def llm_shapes(spec: LisaSpec, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """LISA's language-model-side tensors in the order its state dict lists them."""
    h, kv = spec.hidden, (spec.kv_heads or spec.heads) * (spec.hidden // spec.heads)
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h))]
        if spec.inv_freq:
            out.append((p + "self_attn.rotary_emb.inv_freq", (h // spec.heads // 2,)))
        out += [(p + "mlp.gate_proj.weight", (spec.intermediate, h)),
                (p + "mlp.up_proj.weight", (spec.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, spec.intermediate)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if spec.projector == "linear":
        out += [("model.mm_projector.weight", (h, spec.clip_hidden)), ("model.mm_projector.bias", (h,))]
    else:
        out += [("model.mm_projector.0.weight", (h, spec.clip_hidden)), ("model.mm_projector.0.bias", (h,)),
                ("model.mm_projector.2.weight", (h, h)), ("model.mm_projector.2.bias", (h,))]
    out += [("model.text_hidden_fcs.0.0.weight", (h, h)), ("model.text_hidden_fcs.0.0.bias", (h,)),
            ("model.text_hidden_fcs.0.2.weight", (spec.out_dim, h)),
            ("model.text_hidden_fcs.0.2.bias", (spec.out_dim,)),
            ("lm_head.weight", (vocab, h))]
    return out


def llm_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, head_dim: int) -> torch.Tensor:
    if name.endswith("inv_freq"):
        return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.empty(shape, dtype=torch.bfloat16)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return t.normal_(1.0, 0.05, generator=gen)
    return t.normal_(0.0, 0.02 if len(shape) > 1 else 0.01, generator=gen)


def write_lisa(folder: str | Path, spec: LisaSpec, seed: int = 0) -> Path:
    """A LISA checkpoint folder in the released layout; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = spec.vocab or tokenizer_length(spec.tokenizer)
    (folder / "config.json").write_text(json.dumps(lisa_config(spec, vocab), indent=2, sort_keys=True))
    for f in (DATA / spec.tokenizer).iterdir():
        shutil.copy(f, folder / f.name)
    shutil.copy(DATA / "tokenizer.model", folder / "tokenizer.model")
    gen = torch.Generator().manual_seed(seed)
    llm = llm_shapes(spec, vocab)
    sam = sam_state(spec.sam, seed)
    # LISA's order: LLaMA, projector, SAM, then text_hidden_fcs (4 tensors) and lm_head
    order = [("llm", k) for k, _ in llm[:-5]] + [("sam", k) for k in sam] + [("llm", k) for k, _ in llm[-5:]]
    shapes = dict(llm)
    nbytes = {k: math.prod(shapes[k]) * (4 if k.endswith("inv_freq") else 2) if kind == "llm" else sam[k].nbytes
              for kind, k in order}
    if spec.max_shard_bytes is None:
        per_shard = -(-len(order) // spec.shards)
        parts = [order[i:i + per_shard] for i in range(0, len(order), per_shard)]
    else:
        parts, size = [[]], 0
        for item in order:
            if parts[-1] and size + nbytes[item[1]] > spec.max_shard_bytes:
                parts.append([])
                size = 0
            parts[-1].append(item)
            size += nbytes[item[1]]
    ext = "bin" if spec.fmt == "bin" else "safetensors"
    weight_map, total = {}, 0
    for s, part in enumerate(parts):
        state = {}
        for kind, k in part:
            if kind == "llm":
                state[k] = llm_tensor(k, shapes[k], gen, spec.hidden // spec.heads)
            else:
                state["model.visual_model." + k] = sam[k]
        name = f"{'pytorch_model' if ext == 'bin' else 'model'}-{s + 1:05d}-of-{len(parts):05d}.{ext}"
        if ext == "bin":
            torch.save(state, folder / name)
        else:
            from safetensors.torch import save_file

            save_file(state, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += sum(t.nbytes for t in state.values())
        del state
    index = "pytorch_model.bin.index.json" if ext == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_clip(folder: str | Path, *, hidden: int = 32, layers: int = 3, heads: int = 2, intermediate: int = 64,
               image_size: int = 56, patch: int = 14, seed: int = 0) -> Path:
    """An openai/clip-vit-large-patch14-style folder: CLIPModel config.json and pytorch_model.bin with both towers."""
    from transformers import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              hidden_act="quick_gelu", projection_dim=hidden)
    text = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=64, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": hidden,
           "vision_config": vision.to_dict(), "text_config": text.to_dict(), "transformers_version": "4.21.3"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    with torch.device("meta" if hidden >= 512 else "cpu"):
        model = CLIPVisionModel(vision)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        t = torch.empty(v.shape, dtype=torch.float32)
        if "norm" in k and k.endswith("weight"):
            t.normal_(1.0, 0.05, generator=gen)
        else:
            t.normal_(0.0, 0.05, generator=gen)
        state["vision_model." + k] = t
    state["vision_model.embeddings.position_ids"] = torch.arange((image_size // patch) ** 2 + 1)[None]
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(64, 16, generator=gen)
    state["visual_projection.weight"] = torch.randn(hidden, hidden, generator=gen)
    state["logit_scale"] = torch.tensor(2.6592)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def write_llava_hf(folder: str | Path, *, image_size: int = 84, seg_token: bool = False, hub_layout: bool = True,
                   seed: int = 0) -> Path:
    """A transformers-layout LLaVA-1.5 folder as `LlavaForConditionalGeneration.save_pretrained` writes it (fp16,
    two shards); `hub_layout`: the CLIP keys as llava-hf's files on the hub name them (`vision_tower.vision_model.*`).
    `seg_token`: a LLaVA fine-tuned with LISA's [SEG] added to its tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaTokenizer, LlavaConfig, LlavaForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp = folder / "sp"
    sp.mkdir()
    shutil.copy(DATA / "tokenizer.model", sp / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(sp)
    shutil.rmtree(sp)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    if seg_token:
        tok.add_tokens("[SEG]")
    vocab = -(-len(tok) // 64) * 64  # llava-hf pads its embeddings to a multiple of 64 (32064)
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, rms_norm_eps=1e-5,
                         max_position_embeddings=4096),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.05 if "norm" in name else 0.02))
    model.to(torch.float16).save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    shutil.copy(DATA / "tokenizer.model", folder / "tokenizer.model")  # llava-hf ships it beside tokenizer.json
    if hub_layout:
        for f in folder.glob("model*.safetensors"):
            state = load_file(f)
            save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}, f,
                      metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
                                  for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data))
    return folder


if __name__ == "__main__":  # the 7B-shape checkpoint of the slow test, by hand
    if len(sys.argv) < 3 or sys.argv[1] != "lisa-7b":
        sys.exit(__doc__.strip().splitlines()[-1])
    write_lisa(sys.argv[2], LISA_7B)
    if "--clip" in sys.argv:
        write_clip(sys.argv[sys.argv.index("--clip") + 1], hidden=1024, layers=24, heads=16, intermediate=4096,
                   image_size=224, patch=14)

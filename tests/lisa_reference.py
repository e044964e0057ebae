"""LISA's evaluation forward, written independently of segprune's loader and engine, from a checkpoint's raw tensors.

Tokens: LLaMA's sentencepiece model with transformers 4.31's slow-tokenizer rules (added tokens split out and the
whitespace on both sides stripped, legacy "▁" prefix on every other piece, BOS) and LISA's `tokenizer_image_token`.
CLIP: the ViT in plain torch from `vision_model.*`, 4.31's CLIP preprocessing in PIL. LLaVA + LLaMA: projector,
splice at the -200 placeholder, RMSNorm / RoPE / causal attention / SwiGLU in plain torch from `model.*`, and LISA's
"token before [SEG]" rule. SAM: the original `segment_anything` modules loaded with the `model.visual_model.*` keys
unchanged, LISA's ResizeLongestSide preprocessing, its text-embedding sparse prompt and `postprocess_masks`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image

from tests.lisa_layouts import SamSpec, build_sam

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# -- tokens ----------------------------------------------------------------------------------------------------------
def slow_tokenize(sp: spm.SentencePieceProcessor, added: dict[str, int], text: str) -> list[int]:
    """transformers 4.31 `LlamaTokenizer(legacy=True)("text").input_ids` for a tokenizer with `added` tokens."""
    specials = {"<s>": 1, "</s>": 2, "<unk>": 0}
    no_split = {**added, **specials}
    pieces, i, start = [], 0, 0
    while i < len(text):  # longest added token starting here (4.31's trie)
        match = max((t for t in no_split if text.startswith(t, i)), key=len, default=None)
        if match:
            pieces += [text[start:i], match]
            i = start = i + len(match)
        else:
            i += 1
    pieces.append(text[start:])
    for j, p in enumerate(pieces):
        if p in added:  # plain added tokens strip both neighbours; <s> </s> <unk> are AddedToken(lstrip=rstrip=False)
            if j + 1 < len(pieces) and pieces[j + 1] not in no_split:
                pieces[j + 1] = pieces[j + 1].lstrip()
            if j > 0 and pieces[j - 1] not in no_split:
                pieces[j - 1] = pieces[j - 1].rstrip()
    ids = [1]
    for p in pieces:
        if p in no_split:
            ids.append(no_split[p])
        elif p:
            ids += sp.encode(p)
    return ids


def lisa_input_ids(folder: Path, query: str, is_sentence: bool, added: dict[str, int] | None = None) -> list[int]:
    """LISA's prompt ids for a checkpoint folder (tokenizer.model, added_tokens.json unless `added` is given); without
    <im_start> in the added tokens, LLaVA-1.5's template ("USER: <image>\\n ...")."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = added if added is not None else json.loads((folder / "added_tokens.json").read_text())
    ask = f"{query} Please output segmentation mask." if is_sentence else \
        f"What is {query} in this image? Please output segmentation mask."
    image = "<im_start><image><im_end>" if "<im_start>" in added else "<image>"
    prompt = f"{SYSTEM} USER: {image}\n {ask} ASSISTANT: [SEG].</s>"
    chunks = [slow_tokenize(sp, added, c) for c in prompt.split("<image>")]
    return chunks[0] + [-200] + chunks[1][1:]


# -- weights ---------------------------------------------------------------------------------------------------------
def raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, as stored, in fp32."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".bin":
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        elif f.suffix == ".safetensors":
            out.update(load_file(f))
    return {k: v.float() for k, v in out.items()}


# -- CLIP ------------------------------------------------------------------------------------------------------------
def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """4.31 CLIPImageProcessor: shortest edge to `size` (bicubic, the long side truncated), centre crop, normalise."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    im = np.asarray(image.resize((new_w, new_h), Image.BICUBIC), dtype=np.float32) / 255.0
    top, left = (new_h - size) // 2, (new_w - size) // 2
    im = (im[top:top + size, left:left + size] - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(im).permute(2, 0, 1)[None].float()


def clip_features(w: dict[str, torch.Tensor], cfg: dict, pixels: torch.Tensor, select: int) -> torch.Tensor:
    """hidden_states[select][:, 1:] of the CLIP ViT (pre-LN, quick_gelu), from `vision_model.*`."""
    p = "vision_model."
    heads = cfg["num_attention_heads"]
    x = F.conv2d(pixels, w[p + "embeddings.patch_embedding.weight"], stride=cfg["patch_size"])
    x = torch.cat([w[p + "embeddings.class_embedding"].expand(1, 1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + w[p + "embeddings.position_embedding.weight"]
    x = F.layer_norm(x, x.shape[-1:], w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], 1e-5)
    n_run = cfg["num_hidden_layers"] + 1 + select if select < 0 else select
    for i in range(n_run):
        q = f"{p}encoder.layers.{i}."
        h = F.layer_norm(x, x.shape[-1:], w[q + "layer_norm1.weight"], w[q + "layer_norm1.bias"], 1e-5)
        qkv = [F.linear(h, w[f"{q}self_attn.{n}_proj.weight"], w[f"{q}self_attn.{n}_proj.bias"]) for n in "qkv"]
        qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv)
        a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), -1) @ vh
        x = x + F.linear(a.transpose(1, 2).flatten(2), w[q + "self_attn.out_proj.weight"],
                         w[q + "self_attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], w[q + "layer_norm2.weight"], w[q + "layer_norm2.bias"], 1e-5)
        h = F.linear(h, w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), w[q + "mlp.fc2.weight"], w[q + "mlp.fc2.bias"])
    return x[:, 1:]


# -- LLaMA -----------------------------------------------------------------------------------------------------------
def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def llama_last_hidden(w: dict[str, torch.Tensor], cfg: dict, embeds: torch.Tensor) -> torch.Tensor:
    """Final normed hidden states of LISA's LLaMA (`model.*`), causal, positions 0..S-1."""
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd, eps, n = cfg["hidden_size"] // heads, cfg["rms_norm_eps"], embeds.shape[1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = embeds
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        q = F.linear(h, w[p + "self_attn.q_proj.weight"]).unflatten(-1, (heads, hd)).transpose(1, 2)
        k = F.linear(h, w[p + "self_attn.k_proj.weight"]).unflatten(-1, (kv_heads, hd)).transpose(1, 2)
        v = F.linear(h, w[p + "self_attn.v_proj.weight"]).unflatten(-1, (kv_heads, hd)).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
        x = x + F.linear(a.transpose(1, 2).flatten(2), w[p + "self_attn.o_proj.weight"])
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + F.linear(F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"]),
                         w[p + "mlp.down_proj.weight"])
    return rms(x, w["model.norm.weight"], eps)


# -- the whole model -------------------------------------------------------------------------------------------------
def lisa_segment(lisa_dir: Path, clip_dir: Path, sam_spec: SamSpec, image: Image.Image, query: str,
                 is_sentence: bool = False) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(input ids, final hidden state of the token before [SEG] (1, H), mask logits (H, W)) as LISA computes them."""
    cfg = json.loads((lisa_dir / "config.json").read_text())
    clip_cfg = json.loads((clip_dir / "config.json").read_text())["vision_config"]
    w = raw_tensors(lisa_dir)
    wc = raw_tensors(clip_dir)
    feats = clip_features(wc, clip_cfg, clip_pixels(image, clip_cfg["image_size"]), cfg["mm_vision_select_layer"])
    if "model.mm_projector.weight" in w:
        img = F.linear(feats, w["model.mm_projector.weight"], w["model.mm_projector.bias"])
    else:
        img = F.linear(F.gelu(F.linear(feats, w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"])),
                       w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"])
    ids = lisa_input_ids(lisa_dir, query, is_sentence)
    at = ids.index(-200)
    embed = w["model.embed_tokens.weight"]
    seq = torch.cat([embed[ids[:at]], img[0], embed[ids[at + 1:]]])[None]
    hidden = llama_last_hidden(w, cfg, seq)
    seg_id = json.loads((lisa_dir / "added_tokens.json").read_text())["[SEG]"]
    seg_pos = ids.index(seg_id) + img.shape[1] - 1  # position of [SEG] after the placeholder became the image tokens
    h = hidden[0, seg_pos - 1][None]  # LISA: the hidden state of the token before [SEG]
    e = F.linear(F.relu(F.linear(h, w["model.text_hidden_fcs.0.0.weight"], w["model.text_hidden_fcs.0.0.bias"])),
                 w["model.text_hidden_fcs.0.2.weight"], w["model.text_hidden_fcs.0.2.bias"])

    sam_state = {k[len("model.visual_model."):]: v for k, v in w.items() if k.startswith("model.visual_model.")}
    return ids, h, sam_logits(sam_state, sam_spec, e, image)


def sam_logits(state: dict[str, torch.Tensor], spec: SamSpec, e: torch.Tensor, image: Image.Image) -> torch.Tensor:
    """LISA's mask for the prompt embedding `e` (1, C): the original SAM with segment_anything's own keys, LISA's
    ResizeLongestSide preprocessing, the text-embedding sparse prompt, no_mask_embed, postprocess_masks."""
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = build_sam(spec)
    sam.load_state_dict(state, strict=True)
    sam.eval()
    arr = np.asarray(image.convert("RGB"))
    resized = ResizeLongestSide(spec.img_size).apply_image(arr)
    x = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1).float()[None])
    with torch.no_grad():
        emb = sam.image_encoder(x)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, spec.grid, spec.grid)
        low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=e[:, None], dense_prompt_embeddings=dense,
                                  multimask_output=False)
        logits = sam.postprocess_masks(low, resized.shape[:2], arr.shape[:2])
    return logits[0, 0]

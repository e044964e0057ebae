"""LISA checkpoints (dvlab-research/LISA and LLaVA-1.5-based variants) -> a segprune model folder.

The released layout (reference/lisa-on-transformers.md A2, A9): an old flat LLaVA `config.json`, LISA's tokenizer
files, and `pytorch_model-0000k-of-0000n.bin` shards (or safetensors) mixing bf16 (LLM) and fp32 (SAM) tensors:

    model.embed_tokens / model.layers.{i}.* / model.norm   LLaMA          -> language_model.*
    lm_head.weight                                          (untied)       -> lm_head.weight
    model.mm_projector.{weight,bias}                        one Linear     -> projector.*        (LISA v1)
    model.mm_projector.{0,2}.{weight,bias}                  mlp2x_gelu     -> projector.{0,2}.*  (LLaVA-1.5 based)
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*  SAM  -> sam.* (transformers' SAM renames)
    model.text_hidden_fcs.0.{0,2}.*                                        -> text_hidden_fcs.0.{0,2}.*
    (no CLIP: LISA reloads openai/clip-vit-large-patch14[-336] at run time) -> vision_tower.* from a CLIP folder

The projector type is read from the keys, not from `mm_projector_type` (LISA's code always builds a Linear whatever
the config says; LLaVA-1.5-based variants carry the two-layer one). SAM's size is read from its tensor shapes, so
ViT-B/L/H and small test models convert alike. Conversion runs shard by shard: peak memory is about one source
shard (memory-mapped) plus one output file being written (at most `MAX_FILE_BYTES`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.convert.common import Writer, check_against_model, manifest, read_weights, staged, write_folder
from harness.convert.sources import Checkpoint, find_checkpoint
from harness.convert.tokenizer import lisa_tokenizer
from harness.files import read_json

if TYPE_CHECKING:
    from tqdm import tqdm

# transformers' own SAM conversion (models/sam/convert_sam_to_hf.py): substring renames, applied in this order
SAM_RENAMES = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_HYPERNET = re.compile(r"(output_hypernetworks_mlps\.\d+\.)layers\.([012])\.")
_HYPERNET_NAMES = {"0": "proj_in.", "1": "layers.0.", "2": "proj_out."}

# layouts of other LISA-style families, recognised to refuse them by name
UNSUPPORTED = (
    (lambda k: "grounding_encoder." in k and "sam2" not in k, "GLaMM (its SAM is `grounding_encoder`)"),
    (lambda k: "sam2_model" in k or k.startswith("mlp1."), "Sa2VA (InternVL + SAM-2)"),
)


def sam_key(key: str) -> str:
    """A segment_anything key (image_encoder / prompt_encoder / mask_decoder) as transformers' SamModel names it."""
    for old, new in SAM_RENAMES:
        key = key.replace(old, new)
    return _HYPERNET.sub(lambda m: m.group(1) + _HYPERNET_NAMES[m.group(2)], key)


def map_key(key: str) -> str | None:
    """Our name for a LISA key; None for a tensor we drop on purpose; raises KeyError for one we do not know."""
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", key):
        return None  # a 4.31-era persistent buffer; transformers 5 recomputes it
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language_model." + key[len("model."):]
    if key == "lm_head.weight":
        return key
    if re.fullmatch(r"model\.mm_projector\.((0|2)\.)?(weight|bias)", key):
        return "projector." + key[len("model.mm_projector."):]
    if key.startswith(("model.text_hidden_fcs.", "text_hidden_fcs.")):  # the second: LISA-13B-llama2-v0's own file
        return key.removeprefix("model.")
    if key.startswith("model.visual_model."):
        return sam_model_key(key[len("model.visual_model."):])
    raise KeyError(key)


def sam_model_key(key: str) -> str:
    """Our name (under `sam.`) for a segment_anything key."""
    # SamModel ties the prompt encoder's Fourier matrix to `shared_image_embedding`, stored under that name
    return ("sam." + sam_key(key)).replace("sam.prompt_encoder.shared_embedding.", "sam.shared_image_embedding.")


def clip_key(key: str) -> str | None:
    """Our name for a key of an openai/clip-vit-large-patch14 folder (CLIPModel or CLIPVisionModel)."""
    if key.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
        return None  # the text half: LLaVA never runs it
    key = key.removeprefix("vision_model.")
    if key == "embeddings.position_ids":
        return None  # non-persistent in transformers 5
    return "vision_tower." + key


# -- config --------------------------------------------------------------------------------------------------------
def llm_config(cfg: dict) -> dict:
    """LlamaConfig fields from LISA's flat LLaVA config (transformers 4.31 field names and defaults)."""
    if cfg.get("rope_scaling"):
        raise ValueError(f"config.json sets rope_scaling {cfg['rope_scaling']}; LISA checkpoints have none, and "
                         f"segprune does not convert scaled RoPE yet")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}; not a LLaVA/LISA config")
    return dict(
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        vocab_size=cfg["vocab_size"], rope_theta=float(cfg.get("rope_theta", 10000.0)),
        hidden_act=cfg.get("hidden_act", "silu"), bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2), pad_token_id=cfg.get("pad_token_id", 0),
        tie_word_embeddings=False)


def sam_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """SAM's configuration read from its tensor shapes (our names, `sam.` prefix), for any ViT size.

    Everything but the decoder's attention heads is in the shapes; every released SAM (B, L, H) uses 8 heads there.
    """
    s = {k[len("sam."):]: v for k, v in shapes.items() if k.startswith("sam.")}
    enc, dec, prm = "vision_encoder.", "mask_decoder.", "prompt_encoder."
    hidden, _, patch, _ = s[enc + "patch_embed.projection.weight"]
    grid = s[enc + "pos_embed"][1]
    layers = sorted({int(m.group(1)) for k in s if (m := re.match(r"vision_encoder\.layers\.(\d+)\.", k))})
    rel = {i: s[f"{enc}layers.{i}.attn.rel_pos_h"] for i in layers}
    head_dim = rel[layers[0]][1]
    global_layers = [i for i in layers if rel[i][0] == 2 * grid - 1]
    windowed = [rel[i][0] for i in layers if i not in global_layers]
    dec_hidden = s[dec + "iou_token.weight"][1]
    dec_layers = {int(m.group(1)) for k in s if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    iou_head = r"mask_decoder\.iou_prediction_head\.(proj_in|layers\.\d+|proj_out)\.weight"
    iou_layers = [k for k in s if re.match(iou_head, k)]
    points = [k for k in s if re.match(r"prompt_encoder\.point_embed\.\d+\.weight", k)]
    return dict(
        vision=dict(hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=hidden // head_dim,
                    mlp_dim=s[f"{enc}layers.0.mlp.lin1.weight"][0], image_size=grid * patch, patch_size=patch,
                    window_size=(windowed[0] + 1) // 2 if windowed else 0, global_attn_indexes=global_layers,
                    output_channels=s[enc + "neck.conv1.weight"][0],
                    num_pos_feats=s["shared_image_embedding.positional_embedding"][1]),
        prompt=dict(hidden_size=s[prm + "no_mask_embed.weight"][1], image_size=grid * patch,
                    image_embedding_size=grid, patch_size=patch,
                    mask_input_channels=s[prm + "mask_embed.conv2.weight"][0], num_point_embeddings=len(points)),
        decoder=dict(hidden_size=dec_hidden, mlp_dim=s[dec + "transformer.layers.0.mlp.lin1.weight"][0],
                     num_hidden_layers=len(dec_layers), num_attention_heads=8,
                     attention_downsample_rate=dec_hidden // s[dec + "transformer.layers.0.cross_attn_token_to_image."
                                                                     "q_proj.weight"][0],
                     num_multimask_outputs=s[dec + "mask_tokens.weight"][0] - 1, iou_head_depth=len(iou_layers),
                     iou_head_hidden_dim=s[dec + "iou_prediction_head.proj_in.weight"][0]),
    )


def checked_sam_config(shapes: dict[str, tuple[int, ...]], src: Path) -> dict:
    """`sam_config`, with a one-line error when SAM tensors it reads are absent."""
    try:
        return sam_config(shapes)
    except (KeyError, IndexError) as err:
        raise ValueError(f"{src} lacks SAM tensors (e.g. sam.{err.args[0] if err.args else '?'}); the checkpoint is "
                         f"incomplete") from None


CLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
               "image_size", "hidden_act", "layer_norm_eps", "projection_dim", "num_channels")


def clip_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: not a CLIP model folder (expected a local copy of "
                         f"openai/clip-vit-large-patch14)")
    cfg = read_json(path, "download the CLIP folder again")
    vision = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model" or "hidden_size" not in vision:
        raise ValueError(f"{path} is not a CLIP config (model_type {cfg.get('model_type')!r})")
    return clip_fields(vision)


def clip_fields(vision: dict) -> dict:
    """Our CLIP fields from a CLIPVisionConfig dict, transformers' defaults for the ones it leaves out."""
    from transformers import CLIPVisionConfig

    full = CLIPVisionConfig(**{k: v for k, v in vision.items() if k in CLIP_FIELDS}).to_dict()
    return {k: full[k] for k in CLIP_FIELDS}


def clip_tower(config: dict) -> str:
    """The CLIP a LISA config names (a hub id, or the path it was trained from)."""
    return config.get("mm_vision_tower") or config.get("vision_tower") or "openai/clip-vit-large-patch14"


def lisa_clip(src: Path) -> Path:
    """The CLIP folder `convert_lisa(src, ...)` would use by default (see `find_clip`)."""
    return find_clip(clip_tower(read_json(src / "config.json", "download it again")), None)


def find_clip(tower: str, clip: str | os.PathLike | None) -> Path:
    """The CLIP folder: `clip` if given, else $SEGPRUNE_CLIP, else `tower` as a local path, else its snapshot in the
    Hugging Face cache (where LISA's own code put it). Never downloads."""
    given = clip or os.environ.get("SEGPRUNE_CLIP")
    if given:
        if not Path(given).is_dir():
            where = "--clip" if clip else "$SEGPRUNE_CLIP"
            raise ValueError(f"the CLIP folder {given} ({where}) does not exist; point it at a local copy of {tower}")
        return Path(given)
    if Path(tower).is_dir():
        return Path(tower)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    get = "copy it back" if tower.startswith(("/", ".", "~")) else f"download it once (hf download {tower})"
    try:
        return Path(snapshot_download(tower, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise ValueError(f"LISA checkpoints carry no CLIP weights and {tower} is neither a local folder nor in the "
                         f"local Hugging Face cache; {get}, or name a copy with --clip DIR (segprune convert) or "
                         f"$SEGPRUNE_CLIP") from None


# -- conversion ----------------------------------------------------------------------------------------------------
def refuse_unsupported(keys: list[str] | None, config: dict, src: Path) -> None:
    """A one-line refusal naming the family of a LISA-style checkpoint we do not convert."""
    text = " ".join(str(config.get(k, "")) for k in ("_name_or_path", "architectures", "model_type")).lower()
    if "lisa_plus" in text or "lisa++" in text or "lisaplus" in text:
        raise ValueError(f"{src} is a LISA++ checkpoint; segprune does not support LISA++ yet (its prompt format and "
                         f"tokens differ from LISA's)")
    for test, family in UNSUPPORTED:
        hit = next((k for k in keys or () if test(k)), None)
        if hit:
            raise ValueError(f"{src} is a {family} checkpoint ({hit}); segprune converts LISA layouts only "
                             f"(model.visual_model.* SAM + model.mm_projector)")
    if keys is not None and not any(k.startswith("model.visual_model.") for k in keys):
        raise ValueError(f"{src} has no model.visual_model.* (SAM) tensors: not a LISA checkpoint")


def convert_lisa(src: str | os.PathLike, dst: str | os.PathLike, *, clip: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None, progress: tqdm | None = None) -> Path:
    """Convert the LISA checkpoint folder `src` into the segprune model folder `dst` (written whole, or not at all).

    Args:
        clip: a local openai/clip-vit-large-patch14 (or -336) folder; default: the config's vision tower from the
            Hugging Face cache.
        dtype: cast floating tensors to this dtype (default: keep each as stored, bf16 LLM and fp32 SAM for LISA).
        progress: a bar (`harness.convert.common.progress_bar`) counting the source files' bytes.
    """
    from harness.model import SegModel, SegModelConfig

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; expected a LISA checkpoint folder (config.json, tokenizer files, "
                         f"pytorch_model-*.bin shards + pytorch_model.bin.index.json)")
    config = read_json(src / "config.json", "download it again")
    ckpt = find_checkpoint(src, "LISA checkpoint")
    refuse_unsupported(ckpt.keys(), config, src)
    use_start_end = bool(config.get("mm_use_im_start_end", False))
    tokenizer = lisa_tokenizer(src, need_im_tokens=use_start_end)
    if len(tokenizer) > int(config.get("vocab_size", 0)):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but config.json a vocab_size of "
                         f"{config.get('vocab_size')}; the tokenizer files belong to another checkpoint")
    files = list(ckpt.files)
    if (v0 := src / "pytorch_model-text_hidden_fcs.bin").is_file() and v0 not in files:
        files.append(v0)  # LISA-13B-llama2-v0 keeps text_hidden_fcs in a file of its own, outside the index
    llm = llm_config(config)
    tower = clip_tower(config)
    clip_dir = find_clip(tower, clip)
    vision = clip_config(clip_dir)
    clip_ckpt = find_checkpoint(clip_dir, "CLIP")
    want = 336 if tower.endswith("336") else 224
    if re.search(r"clip-vit-large-patch14(-336)?$", tower) and vision["image_size"] != want:
        raise ValueError(f"the checkpoint was trained with {tower} ({want} px) but the CLIP folder {clip_dir} is "
                         f"{vision['image_size']} px; pass the matching --clip")
    if config.get("mm_hidden_size") not in (None, vision["hidden_size"]):
        raise ValueError(f"the checkpoint's projector expects CLIP width {config['mm_hidden_size']} but the CLIP "
                         f"folder {clip_dir} has {vision['hidden_size']}; pass the matching --clip")

    with staged(dst) as stage:
        writer = Writer(stage, dtype)
        read_weights(Checkpoint(ckpt.folder, files, ckpt.index), map_key, writer, progress, src)
        read_weights(clip_ckpt, clip_key, writer, None, clip_dir)
        projector = "mlp2x_gelu" if "projector.0.weight" in writer.shapes else "linear"
        fcs = writer.shapes.get("text_hidden_fcs.0.2.weight")
        cfg = SegModelConfig(vision=vision, llm=llm, sam=checked_sam_config(writer.shapes, src), projector=projector,
                             seg_out_dim=fcs[0] if fcs else int(config.get("out_dim", 256)),
                             vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
                             use_mm_start_end=use_start_end, name=src.name)
        check_against_model(writer.shapes, SegModel.expected_shapes(cfg, tokenizer), src)
        write_folder(stage, writer, cfg, tokenizer,
                     manifest("lisa", Checkpoint(ckpt.folder, files, ckpt.index), clip_ckpt.files, writer, projector),
                     src / "config.json")
    return dst


def is_lisa_folder(folder: Path) -> bool:
    """An unconverted LISA checkpoint folder (old flat LLaVA config; what `--model` accepts and converts)."""
    path = folder / "config.json"
    if not path.is_file() or (folder / "segprune.json").is_file():
        return False
    config = read_json(path, "download it again")
    return "text_config" not in config and ("mm_vision_tower" in config or "mm_hidden_size" in config)

"""LISA-style segmentation MLLM built from stock transformers parts.

    CLIPVisionModel (penultimate layer, CLS dropped) -> projector (LISA: one Linear; LLaVA-1.5: Linear-GELU-Linear)
    -> LlamaModel decoder layers (our loop, `harness.engine`) -> final norm -> hidden state of the token *before*
    [SEG] (LISA's rule) -> text_hidden_fcs -> SamModel mask decoder with that one sparse prompt -> mask logits
    -> upsampled to the original image size, > 0.

Facts this follows are in reference/lisa-on-transformers.md (A3-A6, C1): LISA's evaluation template with the answer
"[SEG]." teacher-forced, CLIP centre-crop vs SAM longest-side resize + pad, and the PIL image processors for parity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    SamConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from harness.convert.sources import find_checkpoint, load_file
from harness.files import read_json, usual_mode
from harness.method import ModelInfo
from harness.registry import Registry
from harness.state import Kind

IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: replaced by the projected image tokens
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass
class SegModelConfig:
    """Everything needed to rebuild a model; sub-configs are plain transformers config dicts."""

    vision: dict
    llm: dict
    sam: dict | None
    projector: str = "linear"  # "linear" (LISA) or "mlp2x_gelu" (LLaVA-1.5)
    seg_out_dim: int = 256
    vision_feature_layer: int = -2  # LLaVA/LISA: penultimate CLIP layer, CLS dropped
    use_mm_start_end: bool = True  # LISA: <im_start><image><im_end>
    name: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _sam_config(sam: dict) -> SamConfig:
    vision = SamVisionConfig(**{"initializer_range": 0.02, **sam["vision"]})
    prompt = SamPromptEncoderConfig(**sam["prompt"]).to_dict()
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt,
                     mask_decoder_config=SamMaskDecoderConfig(**sam["decoder"]).to_dict())


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"unknown projector {kind!r}; choose 'linear' (LISA) or 'mlp2x_gelu' (LLaVA-1.5)")


@dataclass
class Prepared:
    """One image after both preprocessing branches."""

    clip_pixels: Tensor  # (1, 3, S, S) CLIP centre crop
    sam_pixels: Tensor | None  # (1, 3, T, T) SAM longest-side resize + pad
    original_size: tuple[int, int]  # (H, W)
    resized_size: tuple[int, int]  # SAM resize before padding


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # integer views of float weights, by element size


class SegModel(nn.Module):
    """A frozen LISA-style model. `vision_tower` and `language_model` are the stock transformers modules."""

    def __init__(self, config: SegModelConfig, tokenizer: PreTrainedTokenizerFast, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        vcfg = CLIPVisionConfig(**config.vision)
        lcfg = LlamaConfig(**{**config.llm, "vocab_size": config.llm.get("vocab_size", len(tokenizer))})
        self.vision_tower = CLIPVisionModel._from_config(vcfg, attn_implementation=attn_implementation)
        self.projector = build_projector(config.projector, vcfg.hidden_size, lcfg.hidden_size)
        self.language_model = LlamaModel._from_config(lcfg, attn_implementation=attn_implementation)
        d = lcfg.hidden_size
        self.lm_head = nn.Linear(d, lcfg.vocab_size, bias=False)
        self.sam = None
        if config.sam is not None:
            self.sam = SamModel._from_config(_sam_config(config.sam), attn_implementation=attn_implementation)
            self.text_hidden_fcs = nn.ModuleList(
                [nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, config.seg_out_dim), nn.Dropout(0.0))])
        self.seg_token_id = tokenizer.convert_tokens_to_ids("[SEG]")
        if self.seg_token_id is None or self.seg_token_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no [SEG] token; add it with tokenizer.add_tokens('[SEG]')")
        size = vcfg.image_size
        self.clip_processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size})
        if self.sam is not None:
            s = self.sam.config.vision_config.image_size
            self.sam_processor = SamImageProcessorPil(size={"longest_edge": s}, pad_size={"height": s, "width": s})
        self._prompt_cache: dict[tuple[str, bool], tuple[list[int], list[int]]] = {}
        self.eval().requires_grad_(False)

    # -- description -------------------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        v, c = self.vision_tower.config, self.language_model.config
        g = v.image_size // v.patch_size
        return ModelInfo(n_layers=c.num_hidden_layers, n_image_tokens=g * g, grid=(g, g), hidden_size=c.hidden_size,
                         n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                         head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                         intermediate_size=c.intermediate_size, vision_layers=self.vision_layers_run,
                         vision_hidden_size=v.hidden_size)

    def _clip_geometry(self, height: int, width: int) -> tuple[tuple[int, int], int, int]:
        """The CLIP processor's resize (shortest side to the crop size, the long side truncated as HF does) and the
        centre crop's (top, left) offset, for an image of this size."""
        short, crop = self.clip_processor.size["shortest_edge"], self.clip_processor.crop_size["height"]
        size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
        return size, (size[0] - crop) // 2, (size[1] - crop) // 2

    def patch_coverage(self, masks: np.ndarray) -> Tensor:
        """(K, N) fraction of each CLIP patch covered by each of K (H, W) masks, through the CLIP processor's
        geometry (LVLM_CSP reshapes its instance masks this way)."""
        m = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
        size, top, left = self._clip_geometry(*m.shape[-2:])
        crop = self.clip_processor.crop_size["height"]
        m = F.interpolate(m, size=size, mode="area")[..., top:top + crop, left:left + crop]
        return F.adaptive_avg_pool2d(m, self.info.grid).flatten(1)

    @property
    def vision_layers_run(self) -> int:
        """CLIP encoder layers needed for the selected feature layer (later layers are never computed)."""
        n = self.vision_tower.config.num_hidden_layers
        k = self.config.vision_feature_layer
        return k if k > 0 else n + 1 + k

    @property
    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    def fingerprint(self) -> str:
        """Short content hash of the configuration and weights (part of every result's provenance).

        Computed once per model (the model is frozen): it reads every weight, on its device. Each tensor contributes
        the integer sum of its raw bit patterns: exact and independent of summation order (a float sum is not: it
        changed with the memory alignment of weights loaded from safetensors).
        """
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(self.config.to_json().encode())
            for name, t in sorted(self.state_dict().items()):
                bits = t.detach().contiguous().view(_BITS[t.element_size()]) if t.is_floating_point() else t.detach()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{int(bits.long().sum())}".encode())
            self._fingerprint = h.hexdigest()[:12]
        return self._fingerprint

    # -- inputs ------------------------------------------------------------------------------------------------
    def prepare(self, image: Image.Image | np.ndarray | str | os.PathLike) -> Prepared:
        img = load_image(image)
        clip = self.clip_processor(img, return_tensors="pt")["pixel_values"]
        sam_pixels, resized = None, (img.height, img.width)
        if self.sam is not None:
            out = self.sam_processor(img, return_tensors="pt")
            sam_pixels, resized = out["pixel_values"], tuple(int(x) for x in out["reshaped_input_sizes"][0])
        dev, dt = self.device, self.dtype
        return Prepared(clip.to(dev, dt), None if sam_pixels is None else sam_pixels.to(dev, dt),
                        (img.height, img.width), resized)

    def prompt_ids(self, query: str, is_sentence: bool = False, answer: bool = True) -> tuple[list[int], list[int]]:
        """Token ids before and after the image placeholder for LISA's evaluation template (llava_v1).

        "USER: <im_start><image><im_end>\\n What is {query} in this image? Please output segmentation mask.
        ASSISTANT: [SEG].</s>"; sentence-style queries (ReasonSeg) use "{query} Please output segmentation mask.".
        Without the `answer` the prompt ends at "ASSISTANT:", as LISA's chat.py feeds it to `generate`.
        Chunks around <image> are tokenized separately, as LISA's `tokenizer_image_token` does.
        """
        key = (query, is_sentence, answer)
        if key not in self._prompt_cache:
            q = query.strip()  # loaders apply their dataset's casing (LISA lower-cases RefCOCO sentences only)
            ask = f"{q} Please output segmentation mask." if is_sentence else \
                f"What is {q} in this image? Please output segmentation mask."
            start, end = ("<im_start>", "<im_end>") if self.config.use_mm_start_end else ("", "")
            pre = f"{SYSTEM_PROMPT} USER: {start}"
            post = f"{end}\n {ask} ASSISTANT:" + (" [SEG].</s>" if answer else "")
            pre_ids = self.tokenizer(pre).input_ids
            post_ids = self.tokenizer(post, add_special_tokens=False).input_ids
            self._prompt_cache[key] = (pre_ids, post_ids)
        return self._prompt_cache[key]

    def token_kinds(self, pre: list[int], n_image: int, post: list[int]) -> Tensor:
        """Kind of every position of the assembled sequence."""
        kinds = [Kind.SYSTEM] * len(pre) + [Kind.IMAGE] * n_image
        seen_seg = False
        for t in post:
            if t == self.seg_token_id:
                kinds.append(Kind.SEG)
                seen_seg = True
            else:
                kinds.append(Kind.ANSWER if seen_seg else Kind.QUERY)
        return torch.tensor([int(k) for k in kinds], dtype=torch.uint8, device=self.device)

    # -- mask branch -------------------------------------------------------------------------------------------
    def sam_image_embeddings(self, sam_pixels: Tensor) -> Tensor:
        return self.sam.vision_encoder(sam_pixels)[0]  # (1, C, h, w)

    def decode_mask(self, seg_embedding: Tensor, image_embeddings: Tensor, prep: Prepared) -> Tensor:
        """LISA's mask decoding (reference C1): one sparse prompt, no_mask_embed dense prompt, single-mask output.

        Returns mask logits (H, W) at the original image size.
        """
        sam = self.sam
        key = (image_embeddings.device, image_embeddings.dtype)
        if getattr(self, "_sam_pe_key", None) != key:  # fixed per model, device and dtype: computed once
            self._sam_pe, self._sam_pe_key = sam.get_image_wide_positional_embeddings().to(key[1]), key
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(image_embeddings)
        low, _ = sam.mask_decoder(image_embeddings=image_embeddings, image_positional_embeddings=self._sam_pe,
                                  sparse_prompt_embeddings=seg_embedding.reshape(1, 1, 1, -1).to(dense.dtype),
                                  dense_prompt_embeddings=dense, multimask_output=False)
        # LISA's postprocess_masks: upsample to the SAM input size, crop the padding, upsample to the original size
        s = sam.config.vision_config.image_size
        m = F.interpolate(low[0].float(), (s, s), mode="bilinear", align_corners=False)
        m = m[..., : prep.resized_size[0], : prep.resized_size[1]]
        m = F.interpolate(m, prep.original_size, mode="bilinear", align_corners=False)
        return m[0, 0]

    # -- API ---------------------------------------------------------------------------------------------------
    def segment(self, image: Any, query: str, method: Any = None, *, is_sentence: bool = False,
                sample_key: str = "", **engine: Any) -> SegmentResult:
        """Segment `query` in `image` with a reduction `method` (a Method, a spec string or None).

        `engine` options: `decode` ("template" or "generate", see `harness.engine.segment`), `max_new_tokens`,
        `instances` (the dataset's instance masks, for oracle analyses), and `prepared`, `image_embeddings`,
        `stopwatch` to let a runner reuse per-image work.
        """
        from harness.engine import segment

        return segment(self, image, query, method, is_sentence=is_sentence, sample_key=sample_key, **engine)

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "segprune.json").write_text(self.config.to_json())
        state, seen = {}, set()
        for k, v in self.state_dict().items():  # tied tensors (SAM's shared positional embedding) are stored once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.detach().contiguous().cpu()
        save_file(state, folder / "model.safetensors")
        os.chmod(folder / "model.safetensors", usual_mode(0o666))  # safetensors creates files 0600
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | None = None, dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> SegModel:
        """Load a segprune model folder: `model.safetensors`, or shards named by `model.safetensors.index.json`
        (what `segprune convert` writes).

        The model is built on the meta device and given the stored tensors (cast to `dtype`, default fp32) as they
        are read, so a 7B model costs its own size in memory once, with no random initialisation first.
        """
        folder = Path(folder)
        if not (folder / "segprune.json").is_file():
            raise ValueError(f"{folder} is not a segprune model folder (expected segprune.json, model.safetensors "
                             f"and tokenizer files; LISA checkpoints must be converted first: segprune convert lisa)")
        cfg = SegModelConfig(**read_json(folder / "segprune.json", "convert or copy the model folder again"))
        if (folder / "convert.json").is_file():
            made = read_json(folder / "convert.json", "convert the checkpoint again")
            if made.get("format") == "llava" and made.get("converter", 1) < 2:
                raise ValueError(f"{folder} was converted by an older segprune whose LLaVA tokenizer put '▁' before "
                                 f"[SEG]; convert the LLaVA folder again (segprune convert llava)")
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
        if Path(f"{folder / 'model.safetensors'}.sha256").is_file():  # a bundled model, or a copy of one
            verify_checksum(folder / "model.safetensors", "copy the folder again, or retrain it")
        device, dtype = device or "cpu", dtype or torch.float32
        with torch.device("meta"):
            model = cls(cfg, tok, attn_implementation)
        state = {}
        recover = "convert or copy the model folder again"
        for path in find_checkpoint(folder, "model folder", recover).files:
            for k, v in load_file(path, device, recover).items():
                state[k] = v.to(dtype) if v.is_floating_point() else v
        groups: dict[int, list[str]] = {}
        for k, v in model.state_dict(keep_vars=True).items():
            groups.setdefault(id(v), []).append(k)
        for names in groups.values():  # give every tied alias the stored tensor
            stored = [n for n in names if n in state]
            for n in names:
                if stored and n not in state:
                    state[n] = state[stored[0]]
        model.load_state_dict(state, strict=True, assign=True)
        for names in groups.values():  # assign=True gives each alias its own Parameter: tie them again
            owner, _, attr = names[0].rpartition(".")
            for n in names[1:]:
                alias_owner, _, alias_attr = n.rpartition(".")
                setattr(model.get_submodule(alias_owner), alias_attr, getattr(model.get_submodule(owner), attr))
        model._materialize_buffers(device, dtype)
        return model.eval().requires_grad_(False)

    def _materialize_buffers(self, device: str, dtype: torch.dtype) -> None:
        """The buffers no checkpoint stores (transformers computes them in the constructors), on `device`. RoPE's
        inv_freq is cast to `dtype` as `.to(dtype)` always did here (results and cell ids stay comparable; LISA's own
        LLaMA kept it in fp32: a deviation in bf16, to revisit with a fingerprint change)."""
        lm = self.language_model
        with torch.device(device):
            lm.rotary_emb = type(lm.rotary_emb)(config=lm.config).to(dtype)
        emb = self.vision_tower.embeddings
        emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device).expand((1, -1)),
                            persistent=False)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        assert not left, f"tensors left on the meta device after loading: {left[:5]}"

    @classmethod
    def expected_shapes(cls, config: SegModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, tuple]:
        """Name -> shape of every tensor a model folder must store (a tied alias only under its first name)."""
        with torch.device("meta"):
            model = cls(config, tokenizer)
        seen: set[int] = set()
        shapes = {}
        for k, v in model.state_dict(keep_vars=True).items():
            if id(v) not in seen:
                seen.add(id(v))
                shapes[k] = tuple(v.shape)
        return shapes


@dataclass
class SegmentResult:
    mask: np.ndarray  # (H, W) bool at the image size
    logits: Tensor | None  # (H, W) float mask logits; None when generate mode produced no [SEG]
    seg_hidden: Tensor | None  # (1, d) final (normed) hidden state of the token before [SEG]: LISA's [SEG] embedding
    trace: Any  # harness.engine.Trace
    flops: dict[str, int]  # by component, exact convention
    latency: dict[str, float]  # seconds by stage
    ledger: Any
    answer: str | None = None  # generate mode: the decoded answer (None in template mode)


def load_image(image: Any) -> Image.Image:
    """Open a path / array / PIL image as RGB, with a one-line error for anything that cannot be decoded."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) image array, got shape {image.shape}")
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")  # as cv2.imread in LISA: EXIF orientation applied
    except (OSError, SyntaxError, ImportError) as err:
        # ImportError: once ultralytics is imported it wraps Image.open and, on a file PIL cannot identify, tries to
        # import the optional HEIF plugin (pi_heif), so a corrupt file surfaces as ModuleNotFoundError
        raise ValueError(f"cannot decode image {path}: {err}; check the file is a valid image") from None


# -- tokenizers and tiny models ---------------------------------------------------------------------------------
TINY_WORDS = (
    "a chat between curious human and an artificial intelligence assistant . the gives helpful , detailed polite "
    "answers to ' s questions user : what is in this image ? please output segmentation mask \n"
    "red green blue yellow purple orange white black gray grey cyan pink brown "
    "small large big medium tiny huge triangle square circle star hexagon pentagon diamond ellipse rectangle shape "
    "shapes object left right above below of top bottom leftmost rightmost topmost bottommost largest smallest "
    "middle center centre with no corners corner that has same colour color as next near far between one two three "
    "four five six sides side round pointed it its other which one only points sky grass banana tomato grapes "
    "pumpkin"
).split()


def tiny_tokenizer(words: list[str] | tuple[str, ...] = TINY_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased, punctuation split) with LLaVA/LISA's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<im_start>", "<im_end>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=specials[4:])
    fast.add_tokens(["[SEG]"])  # LISA adds [SEG] as a normal (non-special) added token
    return fast


TINY_SAM = dict(
    vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_dim=256, image_size=256,
                patch_size=16, window_size=8, global_attn_indexes=[1], output_channels=64, num_pos_feats=32),
    prompt=dict(hidden_size=64, image_size=256, image_embedding_size=16, patch_size=16),
    decoder=dict(hidden_size=64, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=64, num_hidden_layers=2),
)
TINY = dict(
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=224,
                patch_size=14),
    # hidden 256: at 128 the CPU forward is dominated by per-op overhead and pruning speedups say little (measured:
    # realised / FLOPs-ideal speedup 0.75 at hidden 128, 0.83 at 256, 0.94 at 512 for a 75% drop before layer 2)
    llm=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, rms_norm_eps=1e-6),
    sam=TINY_SAM, projector="linear", seg_out_dim=64,
)


def build_random(arch: dict, *, name: str, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None,
                 device: str | None = None, dtype: torch.dtype | None = None,
                 attn_implementation: str = "sdpa") -> SegModel:
    """A model of the given architecture with seeded random weights (for tests, FLOPs and latency)."""
    if arch.get("vision") is None or arch.get("projector") is None:
        raise ValueError(f"{name} has no CLIP vision tower in segprune; it is available for `segprune flops` only")
    tok = tokenizer or tiny_tokenizer()
    llm = dict(arch["llm"])
    if tokenizer is None:
        llm["vocab_size"] = len(tok)
    cfg = SegModelConfig(vision=arch["vision"], llm=llm, sam=arch.get("sam"), projector=arch["projector"],
                         seg_out_dim=arch.get("seg_out_dim") or 256, name=name)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = SegModel(cfg, tok, attn_implementation)
    if model.sam is not None:
        # SAM's from-config init leaves the Fourier positional matrix at std hidden_size // 2; the original SAM
        # uses std 1 (reference: issue 3 pitfalls). Random weights only; loaded checkpoints overwrite it.
        with torch.no_grad():
            model.sam.shared_image_embedding.positional_embedding.normal_(0, 1)
    return model.to(dtype=dtype or torch.float32).eval()


MODELS: Registry = Registry("model")
BUNDLED = Path(__file__).parent / "assets" / "lisa-tiny-shapes"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checksum(path: Path) -> None:
    """Store `path`'s SHA-256 next to it (`<name>.sha256`), for `verify_checksum`."""
    Path(f"{path}.sha256").write_text(_sha256(path) + "\n")


def verify_checksum(path: Path, fix: str) -> None:
    """One-line error, ending with `fix`, if `path` or its checksum is missing or they disagree."""
    checksum = Path(f"{path}.sha256")
    if not path.is_file() or not checksum.is_file():
        raise ValueError(f"bundled weights {path} are missing; {fix}")
    if _sha256(path) != checksum.read_text().strip():
        raise ValueError(f"{path} does not match its checksum (corrupt or modified); {fix}")


def bundle_model(folder: str | os.PathLike, dest: str | os.PathLike = BUNDLED) -> Path:
    """Write a trained model folder as a package asset: fp16 weights, a checksum, and its training log."""
    dest = Path(dest)
    model = SegModel.from_pretrained(folder).to(torch.float16)
    model.save_pretrained(dest)
    write_checksum(dest / "model.safetensors")
    log = Path(folder) / "train_log.json"
    if log.is_file():
        (dest / "train_log.json").write_text(log.read_text())
    return dest


@MODELS.register("lisa-tiny-shapes", aliases=("tiny-shapes",))
def load_bundled(*, device: str | None = None, dtype: torch.dtype | None = None,
                 attn_implementation: str = "sdpa", folder: str | os.PathLike = BUNDLED) -> SegModel:
    """The embedded default: LISA at tiny size, trained by `segprune train tiny` on shapes-ref train."""
    folder = Path(folder)
    verify_checksum(folder / "model.safetensors",
                    "reinstall segprune or train the weights with `segprune train tiny --bundle`")
    return SegModel.from_pretrained(folder, device=device, dtype=dtype, attn_implementation=attn_implementation)


def check_device(device: str | torch.device | None) -> str:
    """`device` as torch spells it, or a one-line ValueError for a name torch does not know or a device that this
    machine lacks (torch's own errors surface later, as tracebacks from deep inside the first forward)."""
    if device is None:
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {device!r}: this machine has no CUDA device that torch {torch.__version__} "
                             f"can use; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: segprune runs on cpu, cuda or mps")
    return str(dev)


ATTENTION = ("sdpa", "eager", "flash_attention_2")


def check_attention(attn_implementation: str, device: str) -> None:
    """A one-line ValueError for an attention backend this process cannot run. (transformers' own path for a
    missing flash-attn tries to fetch a kernel from the Hub, then raises an ImportError from deep inside a model.)"""
    if attn_implementation not in ATTENTION:
        raise ValueError(f"unknown attention backend {attn_implementation!r}; choose {', '.join(ATTENTION)}")
    if attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("--attn flash_attention_2 needs the flash-attn package, which is not installed here "
                             "(it is built for CUDA: pip install flash-attn); use --attn sdpa")
        if not device.startswith("cuda"):
            raise ValueError(f"--attn flash_attention_2 runs on CUDA devices only, not {device}; use --attn sdpa")

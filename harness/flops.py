"""Analytic FLOPs from a `Ledger`, per component, in three conventions.

- `exact`: 2 x MACs of every matmul that runs (linear, conv, attention scores and values over the full n x n
  matrix, SAM's relative-position einsums), GQA- and gated-MLP-aware; norms, softmax and elementwise ops are not
  counted. This is what `torch.utils.flop_counter.FlopCounterMode` counts (checked by the test suite).
- `csp`: LVLM_CSP eq. 10-11 for the LLM, sum over layers of 4nd^2 + 2n^2d + 3ndm with n the layer's tokens.
  Eq. 11 counts multiply-accumulates; the paper's tables report twice that, so `csp` = 2 x eq. 11. With 62 text
  tokens (the paper states none; fitted) it reproduces Table 6's 224-px blocks (7B, 13B) within 1.6% and the
  pruned rows of the 336-px block within 1.7%; that block's unpruned row (8.25) is 2.75% below ours (8.48) and
  fits 45 text tokens alone, so no single text length fits the whole block: an inconsistency of the paper's, which
  the tests pin rather than fit.
- `routing`: Token Routing (AAAI'26) sec. 4.4, sum over layers of 24ND^2 + 4N^2D (QKV 6ND^2, attention 4N^2D,
  output 2ND^2, FFN 16ND^2), with the FFN term 16 N_ffn D^2 + 4 (N_img - N_s) D (d_p + d_g) for the tokens its
  proxy-guided routing sends through the light path; reproduces its Table 4 (PSALM/Phi-1.5, N=450: baseline
  1126.98, mask routing 998.32, image routing 758.75, both 630.09 GFLOPs).

The conventions differ only in how the LLM is counted; the other components are always `exact`. In `generate` mode
the LLM also counts each decode step (one query row per layer against that layer's KV cache) and, in `exact`, the
lm_head rows that chose the generated tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.ledger import LayerRecord, Ledger

if TYPE_CHECKING:
    from harness.model import SegModel

COMPONENTS = ("vision", "method", "projector", "llm", "sam_encoder", "mask_decoder")
CONVENTIONS = ("exact", "csp", "routing")


@dataclass(frozen=True)
class Arch:
    """Dimensions needed for FLOPs (plain config dicts, as in `harness.archs` and `SegModelConfig`)."""

    name: str
    vision: dict | None
    llm: dict
    sam: dict | None
    projector: str | None
    seg_out_dim: int | None
    vision_layers_run: int
    tokens: dict | None = None  # a paper's own token counts {text, answer, image} (`segprune flops` defaults)

    @classmethod
    def from_config(cls, name: str, cfg: dict[str, Any], vision_feature_layer: int = -2) -> Arch:
        v = cfg.get("vision")
        run = 0
        if v is not None:
            run = vision_feature_layer if vision_feature_layer > 0 else \
                v["num_hidden_layers"] + 1 + vision_feature_layer
        return cls(name=name, vision=v, llm=cfg["llm"], sam=cfg.get("sam"), projector=cfg.get("projector"),
                   seg_out_dim=cfg.get("seg_out_dim"), vision_layers_run=run, tokens=cfg.get("tokens"))

    @classmethod
    def named(cls, name: str) -> Arch:
        from harness.archs import ARCHS

        if name not in ARCHS:
            raise ValueError(f"unknown architecture {name!r}; available: {', '.join(ARCHS)}")
        return cls.from_config(name, ARCHS[name])

    @classmethod
    def from_model(cls, model: SegModel) -> Arch:
        """Dimensions read from the live transformers configs (so library defaults are resolved)."""
        lc, vc = model.language_model.config, model.vision_tower.config
        llm = {k: getattr(lc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size")}
        llm["head_dim"] = getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads
        vision = {k: getattr(vc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size",
                                              "patch_size")}
        sam = None
        if model.sam is not None:
            sc = model.sam.config
            sam = {"vision": sc.vision_config.to_dict(), "prompt": sc.prompt_encoder_config.to_dict(),
                   "decoder": sc.mask_decoder_config.to_dict()}
        c = model.config
        return cls.from_config(c.name or "model", {"vision": vision, "llm": llm, "sam": sam, "projector": c.projector,
                                                  "seg_out_dim": c.seg_out_dim}, c.vision_feature_layer)

    # -- derived dimensions -------------------------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        g = self.vision["image_size"] // self.vision["patch_size"]
        return g * g

    @property
    def llm_dims(self) -> tuple[int, int, int, int, int, int]:
        """(d, n_heads, n_kv_heads, head_dim, ffn dim, FFN matrices)."""
        c = self.llm
        heads = c["num_attention_heads"]
        return (c["hidden_size"], heads, c.get("num_key_value_heads") or heads,
                c.get("head_dim") or c["hidden_size"] // heads, c["intermediate_size"], c.get("mlp_matrices", 3))


# -- exact MACs per component -----------------------------------------------------------------------------------
def llm_layer_macs(arch: Arch, r: LayerRecord) -> int:
    d, hq, hkv, hd, m, mats = arch.llm_dims
    n, kv = r.n, r.n if r.kv is None else r.kv
    proj = n * d * hq * hd * 2 + n * d * hkv * hd * 2  # q, o and k, v projections
    attn = 2 * hq * n * kv * hd  # scores and weighted values over the full n x kv matrix
    ffn = mats * r.n_ffn * d * m
    return proj + attn + ffn + sum(a * b * c for a, b, c in r.light)


def vision_macs(arch: Arch, ledger: Ledger) -> int:
    v = arch.vision
    if v is None or ledger.vision_layers == 0:
        return 0
    dv, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n = ledger.vision_tokens
    patch = (n - 1) * 3 * p * p * dv  # patch-embedding conv
    per_layer = 4 * n * dv * dv + 2 * n * n * dv + 2 * n * dv * inter
    return patch + ledger.vision_layers * per_layer


def projector_macs(arch: Arch, ledger: Ledger) -> int:
    if arch.vision is None or arch.projector is None:
        return 0
    dv, d, n = arch.vision["hidden_size"], arch.llm["hidden_size"], ledger.projector_tokens
    return n * dv * d + (n * d * d if arch.projector == "mlp2x_gelu" else 0)


def sam_encoder_macs(arch: Arch) -> int:
    """SAM ViT image encoder: windowed / global attention with decomposed relative positions, then the neck."""
    v = arch.sam["vision"]
    dim, p, mlp, size = v["hidden_size"], v["patch_size"], v["mlp_dim"], v["image_size"]
    w, global_idx = v.get("window_size", 14), set(v.get("global_attn_indexes", []))
    rel = v.get("use_rel_pos", True)
    g = size // p
    tokens = g * g
    total = tokens * 3 * p * p * dim  # patch embedding
    for i in range(v["num_hidden_layers"]):
        if i in global_idx or w == 0:
            side, n_win = g, 1
        else:  # windows are taken on the grid padded to a multiple of the window size
            side = w
            n_win = math.ceil(g / w) ** 2
        t = side * side
        attn_tokens = n_win * t
        total += attn_tokens * dim * 4 * dim  # qkv and output projections
        total += n_win * (2 * t * t * dim + (2 * t * side * dim if rel else 0))  # scores, values, rel-pos einsums
        total += 2 * tokens * dim * mlp
    c = v.get("output_channels", 256)
    return total + tokens * dim * c + tokens * c * c * 9  # neck: 1x1 and 3x3 convs


def sam_decoder_macs(arch: Arch, sparse: int = 1) -> int:
    """One pass of SAM's two-way transformer decoder with `sparse` prompt tokens (LISA's [SEG] embedding: 1; a point
    prompt: the point and the padding point SAM adds when no box is given, 2). Every mask token is decoded whatever
    `multimask_output` keeps."""
    dec, pr = arch.sam["decoder"], arch.sam["prompt"]
    c, mlp = dec["hidden_size"], dec["mlp_dim"]
    ci = c // dec.get("attention_downsample_rate", 2)
    n_masks = dec.get("num_multimask_outputs", 3) + 1
    g = pr["image_embedding_size"]
    p = g * g
    t = 1 + n_masks + sparse  # iou token, mask tokens, the prompt tokens

    def cross(q: int, kv: int) -> int:
        return q * c * ci + 2 * kv * c * ci + q * ci * c + 2 * q * kv * ci

    layer = 4 * t * c * c + 2 * t * t * c + cross(t, p) + 2 * t * c * mlp + cross(p, t)
    total = dec.get("num_hidden_layers", 2) * layer + cross(t, p)
    total += p * c * (c // 4) * 4 + (4 * p) * (c // 4) * (c // 8) * 4  # two transposed 2x2 convs
    total += n_masks * (2 * c * c + c * (c // 8))  # hypernetwork MLPs
    total += n_masks * (c // 8) * 16 * p  # mask = hyper_in @ upscaled embedding
    ih, depth = dec.get("iou_head_hidden_dim", 256), dec.get("iou_head_depth", 3)
    return total + c * ih + (depth - 2) * ih * ih + ih * n_masks


def mask_decoder_macs(arch: Arch, prompts: int) -> int:
    """SAM's decoder with one sparse token per prompt (LISA), plus LISA's text_hidden_fcs."""
    d = arch.llm["hidden_size"]
    fcs = d * d + d * (arch.seg_out_dim or arch.sam["decoder"]["hidden_size"])
    return prompts * (sam_decoder_macs(arch, 1) + fcs)


def point_prompt_macs(arch: Arch, prompts: int) -> int:
    """SAM's prompt encoder and decoder for `prompts` single-point prompts (automatic mask generation): the random
    Fourier code of the point and of the padding point (2 x 2 x num_pos_feats each), then a decoder pass."""
    pos = arch.sam["vision"].get("num_pos_feats", arch.sam["prompt"]["hidden_size"] // 2)
    return prompts * (2 * 2 * pos + sam_decoder_macs(arch, 2))


def llm_flops(arch: Arch, layers: list[LayerRecord], convention: str = "exact") -> int:
    d, _, _, _, m, mats = arch.llm_dims
    total = 0
    for r in layers:
        light = sum(a * b * c for a, b, c in r.light)
        kv = r.n if r.kv is None else r.kv  # n^2 in the papers' formulas is n queries x n keys
        if convention == "exact":
            total += 2 * llm_layer_macs(arch, r)
        elif convention == "csp":  # LVLM_CSP eq. 11 (x2, see module docstring)
            total += 2 * (4 * r.n * d * d + 2 * r.n * kv * d + mats * r.n_ffn * d * m + light)  # mats = 3 (LLaMA)
        elif convention == "routing":  # Token Routing: 6ND^2 + 4N^2D + 2ND^2 + 16ND^2, routed 4ND(d_p + d_g)
            routed = 4 * r.routed * d * r.routed_dims if r.routed else 2 * light
            total += 8 * r.n * d * d + 4 * r.n * kv * d + 16 * r.n_ffn * d * d + routed
        else:
            raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    return total


def lm_head_flops(arch: Arch, ledger: Ledger, convention: str = "exact") -> int:
    """lm_head over the generated tokens' rows (generate mode; template mode never runs it). The papers'
    conventions count decoder layers only, so only `exact` includes it."""
    if convention != "exact" or not ledger.lm_head_rows:
        return 0
    return 2 * ledger.lm_head_rows * arch.llm["hidden_size"] * arch.llm["vocab_size"]


def llm_total_flops(arch: Arch, ledger: Ledger, convention: str = "exact") -> int:
    """The `llm` component: prefill layers, generate mode's decode steps and (in `exact`) its lm_head rows."""
    return llm_flops(arch, ledger.layers + ledger.decode_layers, convention) + lm_head_flops(arch, ledger, convention)


def compute_flops(arch: Arch, ledger: Ledger, convention: str = "exact") -> dict[str, int]:
    """FLOPs by component (`COMPONENTS`) plus `total`, in the named convention."""
    out = {
        "vision": 2 * vision_macs(arch, ledger),
        "method": 2 * sum(m * k * n for m, k, n in ledger.method) + ledger.method_flops,
        "projector": 2 * projector_macs(arch, ledger),
        "llm": llm_total_flops(arch, ledger, convention),
        "sam_encoder": 2 * sam_encoder_macs(arch) * ledger.sam_images if arch.sam else 0,
        "mask_decoder": 2 * mask_decoder_macs(arch, ledger.seg_prompts) if arch.sam else 0,
    }
    out["total"] = sum(out.values())
    return out


def schedule_ledger(arch: Arch, text_tokens: int, image_per_layer: list[int] | None = None,
                    vision_tokens: int | None = None, records: list[LayerRecord] | None = None) -> Ledger:
    """A ledger for an architecture without weights: `text_tokens` plus a per-layer image-token schedule, or the
    layer `records` a method plans (`Method.layer_records`)."""
    n_layers = arch.llm["num_hidden_layers"]
    n_img = arch.n_image_tokens if arch.vision is not None else 0
    if records is None:
        sched = list(image_per_layer) if image_per_layer is not None else [n_img] * n_layers
        records = [LayerRecord(n=text_tokens + k, n_image=k, n_ffn=text_tokens + k) for k in sched]
    sched = [r.n_image for r in records]
    if len(sched) != n_layers:
        raise ValueError(f"schedule has {len(sched)} layers but {arch.name} has {n_layers}")
    led = Ledger(layers=list(records))
    if arch.vision is not None:
        led.vision_tokens = (vision_tokens or n_img) + 1
        led.vision_layers = arch.vision_layers_run
        led.projector_tokens = max(sched, default=n_img)  # methods that hold tokens back still project them all
    if arch.sam is not None:
        led.sam_images, led.seg_prompts = 1, 1
    return led

"""The forward pass the harness owns: vision tower, sequence assembly and the decoder-layer loop.

The events fire where `harness.method` documents them. Only stock transformers submodules are called
(`encoder.layers[i]`, `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`, `norm`); nothing is
monkeypatched, so two models in one process never interfere and the model's attention backend (sdpa, flash,
eager) is used as configured.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from harness.latency import Stopwatch
from harness.ledger import LayerRecord, Ledger
from harness.method import Method, ModelInfo, create_method
from harness.state import Kind, TokenState

if TYPE_CHECKING:
    from harness.model import Prepared, SegmentResult, SegModel

CAUSAL_BACKENDS = ("sdpa", "flash_attention_2", "flash_attention_3")  # attention_mask=None means causal here


@dataclass
class VisionFeatures:
    """What the vision tower hands to the projector (pre-LLM methods may replace it).

    Attributes:
        patches: (1, N, Dv) features fed to the projector.
        patch_index: (N,) patch code of each feature: its patch (row-major on `grid`), -1 for a token standing for
            no patch (CLS), or a merged token's code from `Ledger.merged_token` (<= -2).
        grid: patch grid (h, w) of the tower.
        cls: (1, Dv) CLS state at the selected layer.
        layer_input: (1, 1 + h*w, Dv) input of the selected tower layer (CLS first), to recompute its attention.
        layer: index of the selected tower layer in `tower.encoder.layers`.
        tower: the CLIPVisionModel.
    """

    patches: Tensor
    patch_index: Tensor
    grid: tuple[int, int]
    cls: Tensor
    layer_input: Tensor
    layer: int
    tower: nn.Module


@dataclass
class Context:
    """Per-forward context a method receives with every event."""

    model: SegModel
    info: ModelInfo
    ledger: Ledger
    rng: torch.Generator
    scratch: dict[str, Any] = field(default_factory=dict)  # per-forward storage for the method
    record: LayerRecord | None = None  # ledger record of the layer being run (for `ffn` overrides)
    position_policy: str = "original"
    watch: Stopwatch = field(default_factory=Stopwatch)
    image: Any = None  # the input image (path, array or PIL), for methods that run their own model on it
    instances: Any = None  # the dataset's instance masks of the image, (K, H, W) bool, or a callable giving them
    prepared: Prepared | None = None  # the image after both preprocessing branches
    image_embeddings: Tensor | None = None  # SAM's image embedding, once computed (or given by the runner's cache)

    def overhead(self):
        """Context manager charging the enclosed scoring work's time to the "method" stage."""
        return self.watch("method")

    def sam_embeddings(self) -> Tensor:
        """SAM's image embedding of the input image (1, C, h, w): the one the mask decoder uses, computed now in the
        "sam_encoder" stage if nobody has yet (a method that prompts SAM itself, the superpixel projector, shares the
        model's own encoder pass, as SVP does)."""
        if self.model.sam is None:
            raise ValueError("this model has no SAM; a method that needs SAM's image embedding cannot run on it")
        if self.image_embeddings is None:
            with self.watch("sam_encoder"):
                self.image_embeddings = self.model.sam_image_embeddings(self.prepared.sam_pixels)
        return self.image_embeddings

    def positions(self, state: TokenState) -> Tensor:
        """RoPE position ids of the rows under the run's policy: "original" = each token's position in the unpruned
        sequence (`TokenState.position`), "reindex" = 0..n-1 in the current sequence."""
        if self.position_policy == "reindex":
            return torch.arange(len(state), device=state.index.device)
        return state.position

    def attention_rows(self, layer: int, state: TokenState, rows: Tensor, *, rope: bool = True,
                       keys: Tensor | None = None, head_mean: bool = True) -> Tensor:
        """Attention probabilities of query `rows` at decoder layer `layer`, recomputed from the layer's input.

        `state.hidden` must be the input of `layer` (call it from `before_layer(layer, ...)`). See `attention_rows`.
        """
        lm = self.model.language_model
        with self.overhead():
            return attention_rows(lm.layers[layer], lm.rotary_emb, state.hidden, self.positions(state), rows,
                                  rope=rope, keys=keys, head_mean=head_mean, ledger=self.ledger)


def attention_rows(layer: nn.Module, rotary: nn.Module, hidden: Tensor, positions: Tensor, rows: Tensor, *,
                   rope: bool = True, keys: Tensor | None = None, head_mean: bool = True,
                   ledger: Ledger | None = None) -> Tensor:
    """Recompute the softmax attention of a few query rows of one decoder layer, in fp32, without eager attention.

    input_layernorm -> q for `rows`, k for all (or `keys`) -> RoPE at `positions` (optional, FEATHER scores without
    it) -> GQA repeat -> scaled scores, causal in current-sequence order -> softmax. Matches eager
    `output_attentions` of the same layer (reference B6: 7e-9).

    Args:
        hidden: (1, n, d) input of the layer.
        positions: (n,) RoPE positions of the rows.
        rows: (r,) query rows.
        keys: (k,) key rows to score against (softmax over these only); all rows if None.
        head_mean: average over heads (FastV); else return per-head probabilities.

    Returns:
        (r, k) head-mean probabilities, or (H, r, k) per head.
    """
    attn = layer.self_attn
    n = hidden.shape[1]
    hd = attn.head_dim
    x = layer.input_layernorm(hidden)
    key_rows = torch.arange(n, device=hidden.device) if keys is None else keys
    q = attn.q_proj(x[:, rows]).view(1, len(rows), -1, hd).transpose(1, 2)  # (1, Hq, r, hd)
    k = attn.k_proj(x[:, key_rows]).view(1, len(key_rows), -1, hd).transpose(1, 2)  # (1, Hkv, k, hd)
    if rope:
        cos, sin = rotary(x, positions[None])  # (1, n, hd)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, rows], sin[:, rows])
        k, _ = apply_rotary_pos_emb(k, k, cos[:, key_rows], sin[:, key_rows])
    k = repeat_kv(k, attn.num_key_value_groups)  # (1, Hq, k, hd)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # (1, Hq, r, k)
    scores = scores.masked_fill(key_rows[None, :] > rows[:, None], float("-inf"))
    probs = scores.softmax(-1)[0]  # (Hq, r, k)
    if ledger is not None:
        d, n_q, n_kv = hidden.shape[-1], attn.config.num_attention_heads, attn.config.num_key_value_heads
        ledger.add_method_matmul(len(rows), d, n_q * hd)
        ledger.add_method_matmul(len(key_rows), d, n_kv * hd)
        ledger.add_method_matmul(len(rows), hd, len(key_rows), times=n_q)
    return probs.mean(0) if head_mean else probs


# -- vision ------------------------------------------------------------------------------------------------------
def run_vision(model: SegModel, clip_pixels: Tensor, ledger: Ledger) -> VisionFeatures:
    """CLIP up to the selected feature layer (LLaVA/LISA: penultimate), CLS dropped; later layers are not run.

    `clip_pixels` may hold several images (B, 3, H, W): the features then have batch B (`split_vision` cuts them
    per image); the ledger counts one image's tower.
    """
    tower = model.vision_tower
    h = tower.pre_layrnorm(tower.embeddings(clip_pixels))  # (B, 1 + N, Dv)
    n_run = model.vision_layers_run
    layer_input = h
    for layer in tower.encoder.layers[:n_run]:
        layer_input = h
        h = layer(h, None)
    g = tower.config.image_size // tower.config.patch_size
    n = h.shape[1] - 1
    feats = VisionFeatures(patches=h[:, 1:], patch_index=torch.arange(n, device=h.device), grid=(g, g), cls=h[:, 0],
                           layer_input=layer_input, layer=n_run - 1, tower=tower)
    count_vision(ledger, feats)
    return feats


def count_vision(ledger: Ledger, feats: VisionFeatures) -> None:
    """The vision tower's work for one image, in the ledger (also when its features were computed earlier)."""
    ledger.vision_tokens, ledger.vision_layers = feats.layer_input.shape[1], feats.layer + 1


def split_vision(feats: VisionFeatures) -> list[VisionFeatures]:
    """Per-image features of a batched `run_vision`."""
    return [replace(feats, patches=feats.patches[i:i + 1], cls=feats.cls[i:i + 1],
                    layer_input=feats.layer_input[i:i + 1]) for i in range(feats.patches.shape[0])]


def cls_attention_heads(layer: nn.Module, hidden: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
    """The CLS row of a CLIP layer's attention, recomputed per head from the layer's input `hidden` (1, 1 + N, C),
    CLS first: layer_norm1, q_proj of the CLS row, k_proj of every token, softmax(q k^T / sqrt(head_dim)) over all
    keys. Returns (probs (heads, 1 + N), keys (heads, 1 + N, head_dim)) in fp32; the work is method overhead."""
    attn = layer.self_attn
    heads, hd = attn.num_heads, attn.head_dim
    with ctx.overhead():
        x = layer.layer_norm1(hidden)
        n1, c = x.shape[1], x.shape[2]
        q = attn.q_proj(x[:, :1]).float().view(heads, 1, hd)
        k = attn.k_proj(x).float().view(n1, heads, hd).transpose(0, 1)  # (heads, 1 + N, hd)
        probs = (q @ k.transpose(1, 2) * hd**-0.5).softmax(-1)[:, 0]  # (heads, 1 + N)
    ctx.ledger.add_method_matmul(1, c, c)
    ctx.ledger.add_method_matmul(n1, c, c)
    ctx.ledger.add_method_matmul(1, hd, n1, times=heads)
    return probs, k


# -- sequence ----------------------------------------------------------------------------------------------------
def assemble(model: SegModel, image_tokens: Tensor, patch_index: Tensor, query: str, is_sentence: bool,
             answer: bool = True, members: dict[int, list[tuple[int, float]]] | None = None) -> TokenState:
    """Embed the prompt (with the template answer "[SEG].</s>" unless `answer` is False) and splice the projected
    image tokens in at LLaVA's image placeholder. `members`: the ledger's merged-token members (`Ledger.members`), for
    the positions of merged tokens (`original_positions`)."""
    pre, post = model.prompt_ids(query, is_sentence, answer)
    embed = model.language_model.embed_tokens
    dev = image_tokens.device
    ids = torch.tensor(pre + post, device=dev)
    text = embed(ids)[None]  # (1, len(pre) + len(post), d)
    hidden = torch.cat([text[:, : len(pre)], image_tokens.to(text.dtype), text[:, len(pre):]], 1)
    n_img = image_tokens.shape[1]
    kind = model.token_kinds(pre, n_img, post)
    patch = torch.full((hidden.shape[1],), -1, dtype=torch.long, device=dev)
    patch[len(pre): len(pre) + n_img] = patch_index
    position = original_positions(patch_index, len(pre), model.info.n_image_tokens, len(post), members or {})
    return TokenState(hidden=hidden, index=torch.arange(hidden.shape[1], device=dev), kind=kind, patch=patch,
                      position=position)


def original_positions(patch_index: Tensor, n_pre: int, n_full: int, n_post: int,
                       members: dict[int, list[tuple[int, float]]]) -> Tensor:
    """Where each token of an assembled sequence sits in the unpruned one (GAP, arXiv 2506.21873): its RoPE position
    under the "original" policy.

    The prompt before the image keeps 0..n_pre-1 and the text after it n_pre + n_full + j, as if all `n_full` image
    tokens were there. An image token of patch p sits at n_pre + p; a merged token (code <= -2) at the position of
    its largest-weight member (the first listed on a tie: VisionZip's target, PruMerge's kept token, a pooling
    window's top-left patch); a token standing for no patch (VisionZip's CLS) at the image's first position, n_pre.
    With the full image block in patch order this is 0..n-1, the assembled order itself.
    """
    def anchor(code: int) -> int:
        if code >= -1:
            return max(code, 0)
        if code not in members:
            raise ValueError(f"merged token {code} has no members: pass the ledger's members to assemble()")
        return max(enumerate(members[code]), key=lambda item: (item[1][1], -item[0]))[1][0]

    image = [n_pre + anchor(c) for c in patch_index.tolist()]
    return torch.tensor([*range(n_pre), *image, *range(n_pre + n_full, n_pre + n_full + n_post)],
                        device=patch_index.device)


def causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive (1, 1, n, n) causal mask for backends where `attention_mask=None` is *not* causal (eager)."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


@functools.cache
def cache_keyword(attention: type[nn.Module]) -> str:
    """The name under which a stock attention module takes its KV cache.

    transformers 5.24 renamed `past_key_values` to `cache` on the decoder submodules; the old name still works there
    but warns, and goes in 5.40. Read from the signature, so every version `pyproject.toml` admits gets the name it
    expects.
    """
    return "cache" if "cache" in inspect.signature(attention.forward).parameters else "past_key_values"


def run_llm(model: SegModel, state: TokenState, method: Method, ctx: Context,
            cache: DynamicCache | None = None) -> TokenState:
    """The decoder-layer loop: before_layer -> attention -> ffn per layer; one ledger record per layer.

    With a `cache` (generate mode's prefill) each layer also stores the keys and values of the rows it ran, so the
    cache keeps the pruned state: layer i holds exactly the tokens present in layer i.
    """
    lm = model.language_model
    fire_before, fire_ffn = method.overrides("before_layer"), method.overrides("ffn")
    needs_mask = lm.config._attn_implementation not in CAUSAL_BACKENDS
    cache_kw = {cache_keyword(type(lm.layers[0].self_attn)): cache}
    rope = mask = rows_src = None
    patches: list[int] = []
    patch_src = None
    for i, layer in enumerate(lm.layers):
        if fire_before:
            state = method.before_layer(i, state, ctx)
        h = state.hidden
        if state.index is not rows_src:  # RoPE and mask only change when the rows change
            rows_src = state.index
            rope = lm.rotary_emb(h, ctx.positions(state)[None])
            mask = causal_mask(h.shape[1], h.dtype, h.device) if needs_mask else None
        if state.patch is not patch_src:
            patch_src = state.patch
            patches = state.patch[state.kind == Kind.IMAGE].tolist()
        n = h.shape[1]
        ctx.record = LayerRecord(n=n, n_image=len(patches), n_ffn=n, patches=patches)
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask,
                               **cache_kw)
        h = h + a
        x = layer.post_attention_layernorm(h)
        h = h + (method.ffn(i, layer.mlp, x, replace(state, hidden=h), ctx) if fire_ffn else layer.mlp(x))
        state = replace(state, hidden=h)
        ctx.ledger.layers.append(ctx.record)
    ctx.record = None
    if state.held:
        raise RuntimeError(f"{method.name}: tokens still held back after the last layer: {sorted(state.held)}")
    return state


def greedy_decode(model: SegModel, state: TokenState, cache: DynamicCache, ctx: Context,
                  max_new_tokens: int) -> tuple[list[int], Tensor | None]:
    """Greedy decoding after a cached prefill whose last row is the prompt's last token.

    Pruning happened in the prefill only (the official KV-cache variants of FastV and PyramidDrop, and SparseVLM):
    a decode token attends to each layer's pruned cache and runs the stock FFN. Its RoPE position follows the
    method's policy (reference 0.3): "original" continues from the unpruned sequence's length; "reindex" uses each
    layer's cache length, which is where that layer's contiguous positions end. Each step is a ledger record per
    layer with `kv` = the keys it attended to.

    Returns the generated ids (up to and including EOS) and LISA's [SEG] embedding: the final normed hidden state of
    the row whose greedy choice was the first [SEG] (None when no [SEG] was generated).
    """
    lm = model.language_model
    dev = state.hidden.device
    next_position = int(state.position[-1]) + 1
    h = lm.norm(state.hidden[:, -1:])  # (1, 1, d): the row that chooses the first answer token
    ids: list[int] = []
    seg_hidden = None
    cache_kw = {cache_keyword(type(lm.layers[0].self_attn)): cache}
    for step in range(max_new_tokens):
        token = int(model.lm_head(h)[0, -1].argmax())
        ctx.ledger.lm_head_rows += 1
        ids.append(token)
        if token == model.seg_token_id and seg_hidden is None:
            seg_hidden = h[:, 0]
        if token == model.tokenizer.eos_token_id or step == max_new_tokens - 1:
            break
        x = lm.embed_tokens(torch.tensor([[token]], device=dev))
        ropes: dict[int, tuple[Tensor, Tensor]] = {}  # by position: one under "original", one per cache length else
        for i, layer in enumerate(lm.layers):
            kv = cache.get_seq_length(i)
            position = next_position + step if ctx.position_policy == "original" else kv
            if position not in ropes:
                ropes[position] = lm.rotary_emb(x, torch.tensor([[position]], device=dev))
            rope = ropes[position]
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=rope,
                                   attention_mask=None, **cache_kw)  # one query row: nothing to mask
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            ctx.ledger.decode_layers.append(LayerRecord(n=1, n_image=0, n_ffn=1, kv=kv + 1))
        h = lm.norm(x)
    return ids, seg_hidden


# -- one sample --------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """Where the tokens went, per LLM layer."""

    tokens_per_layer: list[int]
    image_tokens_per_layer: list[int]
    kept_patches: list[list[int]]  # patch codes of the image tokens present in each layer (`LayerRecord.patches`)
    n_avg: float
    members: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # merged code -> (patch, weight)


def sample_rng(method: Method, sample_key: str) -> torch.Generator:
    """Seeded generator per (method seed, sample): reproducible and independent of run order or resumption."""
    seed = int(getattr(method, "seed", 0))
    digest = hashlib.sha256(f"{seed}:{sample_key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


DECODE_MODES = ("template", "generate")
MAX_NEW_TOKENS = 32  # generate mode: LISA's `evaluate` default (its answer "[SEG].</s>" is 3 tokens)


def segment(model: SegModel, image: Any, query: str, method: Any = None, *, is_sentence: bool = False,
            sample_key: str = "", prepared: Prepared | None = None, image_embeddings: Tensor | None = None,
            vision: VisionFeatures | None = None, stopwatch: Stopwatch | None = None, decode: str = "template",
            max_new_tokens: int = MAX_NEW_TOKENS, instances: Any = None) -> SegmentResult:
    """Run one image and query through the model with `method`; see `SegModel.segment`.

    `decode`: "template" (LISA's evaluation: one forward with the answer "[SEG].</s>" teacher-forced) or "generate"
    (a cached prefill of the prompt, then greedy decoding; see `greedy_decode`). When no [SEG] is generated the mask
    is empty, as LISA returns no mask. `instances`: the dataset's instance masks of the image (a (K, H, W) array or
    a callable returning it), for methods that can use them for analysis (LVLM_CSP's oracle Seg-First).
    `prepared`, `image_embeddings` and `vision` (the image's CLIP features from `run_vision`) let a runner compute
    an image's preprocessing and encoders once for all its queries; their work is still counted in the FLOPs, and
    their stages are absent from the latency (the runner times them where they ran).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    from harness.flops import Arch, compute_flops
    from harness.model import SegmentResult

    method = create_method(method) if not isinstance(method, Method) else method
    info = model.info
    method.bind(info)
    watch = stopwatch or Stopwatch(model.device)
    watch.last = {}
    ledger = Ledger()
    ctx = Context(model=model, info=info, ledger=ledger, rng=sample_rng(method, sample_key or query),
                  position_policy=method.policy, watch=watch, image=image, instances=instances)
    with torch.inference_mode():
        prep = prepared if prepared is not None else model.prepare(image)
        ctx.prepared, ctx.image_embeddings = prep, image_embeddings
        if vision is None:
            with watch("vision"):
                feats = run_vision(model, prep.clip_pixels, ledger)
        else:  # computed once for the image: a copy, so that no method can change what the next query gets
            feats = replace(vision, patches=vision.patches.clone(), cls=vision.cls.clone(),
                            layer_input=vision.layer_input.clone())
            count_vision(ledger, feats)
        with watch("method"):
            feats = method.on_vision(feats, ctx)
        with watch("projector"):
            tokens = model.projector(feats.patches)
            ledger.projector_tokens = tokens.shape[1]
            state = assemble(model, tokens, feats.patch_index, query, is_sentence, answer=decode == "template",
                             members=ledger.members)
        with watch("llm"):
            state = method.on_sequence(state, ctx)
            answer = None
            if decode == "template":
                state = run_llm(model, state, method, ctx)
                src = state.seg_source_row
                seg_hidden = model.language_model.norm(state.hidden[:, src])  # RMSNorm is per token: norm(h)[src]
            else:
                cache = DynamicCache(config=model.language_model.config)
                state = run_llm(model, state, method, ctx, cache)
                answer, seg_hidden = greedy_decode(model, state, cache, ctx, max_new_tokens)
        logits = mask = None
        if model.sam is not None:
            image_embeddings = ctx.sam_embeddings()  # LISA's evaluate runs it whether or not [SEG] was generated
            ledger.sam_images = 1
            if seg_hidden is None:  # no [SEG] in the answer: LISA returns no mask, scored as an empty one
                mask = np.zeros(prep.original_size, dtype=bool)
            else:
                with watch("mask_decoder"):
                    seg_embedding = model.text_hidden_fcs[0](seg_hidden)
                    logits = model.decode_mask(seg_embedding, image_embeddings, prep)
                    ledger.seg_prompts = 1
                mask = (logits > 0).cpu().numpy()
    trace = Trace(tokens_per_layer=ledger.tokens_per_layer, image_tokens_per_layer=ledger.image_tokens_per_layer,
                  kept_patches=[r.patches for r in ledger.layers], n_avg=ledger.n_avg, members=ledger.members)
    flops = compute_flops(Arch.from_model(model), ledger, "exact")
    return SegmentResult(mask=mask, logits=logits, seg_hidden=seg_hidden, trace=trace, flops=flops,
                         latency=dict(watch.last), ledger=ledger,
                         answer=None if answer is None else model.tokenizer.decode(answer))

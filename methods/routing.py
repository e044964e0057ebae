"""Token Routing: late mask-token insertion and proxy-guided image-token FFN routing.

"Efficient Segmentation with MLLM via Token Routing", AAAI 2026 (no public code; the paper's eq. 7-12 are the
specification). Unlike pruning, every image token stays in every layer; what changes is how much computation tokens
get:

- **Mask routing** (eq. 7-8): the tokens that carry the mask are held back from layers 0..L_mask-1 and enter layer
  L_mask with their input embeddings.
- **Proxy-guided image routing** (eq. 9-12): per layer, N_s image tokens drawn at random (the proxies) take the full
  FFN; every other image token i gets g_i * sum_j alpha_ij dv_j, where dv_j = phi(FFN(v_j) - v_j) is proxy j's FFN
  update and alpha_i = softmax_j(<q_i, k_j> / sqrt(d_p)) compares token i with the proxies; all non-image tokens take
  the full FFN.

The paper trains the whole model with routing and learns W_q, W_k (d_p = 128) and the gate MLP (d_g = 512). A frozen
LISA has neither, so this is the training-free variant: alpha from a fixed projection and a constant gate.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import repeat_kv

from harness.engine import Context
from harness.ledger import LayerRecord
from harness.method import BUDGET_TOLERANCE, Method, ModelInfo, register
from harness.state import Kind, TokenState

PAPER_LAYERS, PAPER_MASK_SKIP = 24, 12  # Table 4: the mask queries skip 12 of Phi-1.5's 24 layers
PAPER_IMAGE, PAPER_PROXIES = 256, 8  # N_s = 8 proxies for 256 image tokens
LISA_ANSWER = 3  # "[SEG].</s>": the tokens after "ASSISTANT:" in LISA's evaluation template


@register("routing")
class TokenRouting(Method):
    """Token Routing, training-free: late mask-token insertion and proxy-guided image-token FFN routing.

    Which tokens are LISA's mask tokens: LISA's template answer is "[SEG].</s>" and the mask embedding is the final
    hidden state of the token *before* [SEG] (":" of "ASSISTANT:"), the row whose next-token prediction is [SEG].
    `mask_tokens="answer"` holds back [SEG] and what follows it (the answer tokens after "ASSISTANT:"): under causal
    attention no earlier row sees them, so the mask is unchanged by construction and the saving is exact but small
    (three tokens). `mask_tokens="carrier"` also holds back the token before [SEG], the one whose output LISA decodes:
    this is the analogue of PSALM's mask queries (the tokens whose outputs feed the mask decoder) and the setting that
    tests the paper's claim that mask tokens need no early layers. In generate mode's prefill there is no answer yet,
    so "answer" holds nothing and "carrier" holds the prompt's last token.

    Budget mapping: routing keeps every image token, so its N_avg stays N; a budget r is met on work instead: the
    image-token-equivalent N_avg = N - saved / (L c), where c is one token's projection and FFN work in one layer
    (the share `@r` removes for a pruning method) and saved is the FFN work of the routed tokens less their light
    path, plus the held-back answer tokens' work (LISA's three, "[SEG].</s>"). `mask_layer` stays at its default
    (or as given) and the number of proxies N_s is solved for; what one proxy per layer cannot reach is refused
    with the reachable range (LLaMA's FFN is about two thirds of a token's work, so about 65% is the most).

    The training-free defaults were chosen by measurement on the bundled model's calibration split
    (`benchmarks/routing_fidelity.py`, shapes-ref train, 24 samples): the random projection explains the routed
    tokens' FFN updates far better than the layer's own q/k (residual |g a - t|^2 / |t|^2 0.137 vs 0.508), and the
    least-squares constant gate for it is 0.94.

    Args:
        mask_layer: L_mask, the first decoder layer (0-based) the mask tokens run in; they skip layers 0..L_mask-1 and
            enter with their input embeddings. 0 turns mask routing off. Default: half the model's layers, the
            paper's 12 skipped of 24 (Table 4).
        mask_tokens: "answer" ([SEG] and the answer tokens after it) or "carrier" (also the token before [SEG], whose
            final state is LISA's mask embedding).
        image: "proxy" (eq. 9-12), "skip" (Table 5's w/o FFN: image tokens other than the proxies get no FFN update)
            or "full" (every token takes the full FFN: no image routing).
        proxies: N_s, the image tokens per layer that take the full FFN, drawn at random per layer; default 8 per 256
            image tokens (the paper's 8 of 256), at least 1. As many as the image tokens turns image routing off.
        alpha: the fixed similarity of eq. 10: "random" (a seeded Gaussian projection to d_p dimensions, shared by
            queries and keys) or "attn" (the layer's own attention q/k projections without RoPE, per-head softmax,
            averaged over heads).
        d_p: width of the random projection (the paper's d_p).
        gate: the constant that replaces eq. 12's gate sigma(MLP(v)) (default: measured, see above); 1 is Table
            5's "w/o gate".
        gate_width: d_g, the width of a learned gate MLP (the paper's 512); for analytic FLOPs of the paper's design
            on a named architecture only (a learned gate needs weights this variant does not have).
        adapter: the calibrated variant: a file from `segprune calibrate routing` with learned W_q, W_k and gate MLP
            per layer (they replace alpha, d_p, gate and gate_width). The resolved spec names it "PATH#<sha256[:12]>",
            so a run made with one adapter refuses to resume with another at the same path.
        seed: seed of the proxy draws (per sample and layer) and of the random projection.
    """

    stage = "in-llm"
    position_policy = "original"
    reduces_tokens = False  # every image token stays in every layer; routing saves FFN work
    citation = "Efficient Segmentation with MLLM via Token Routing, AAAI 2026 (no public code)"
    keep_all = {"mask_layer": 0, "image": "full"}
    exact_reference = False  # changes the FFN of image tokens: checked against a plain-torch eq. 9-12 instead
    deviations = ("training-free: alpha from a fixed projection (alpha=random: a seeded Gaussian projection, "
                  "alpha=attn: the layer's own q/k) instead of learned W_q, W_k, and a constant gate instead of "
                  "sigma(MLP(v)); alpha and the gate read the FFN's normalised input (post_attention_layernorm(h)), "
                  "where eq. 10 and 12 write v; phi in eq. 9 is the identity (the paper does not define it); "
                  "mask_layer counts skipped layers from 0 (the paper's 1-based L_mask=13 is mask_layer=12, "
                  "Table 5's L=6 and L=18 are 5 and 17); the model was not "
                  "trained with routing (the paper trains the whole LLM with it); LISA's mask tokens are its answer "
                  "tokens (mask_tokens=answer) or the [SEG]-predicting token too (carrier), see the docstring")

    def __init__(self, mask_layer: int | None = None, mask_tokens: Literal["answer", "carrier"] = "answer",
                 image: Literal["proxy", "skip", "full"] = "proxy", proxies: int | None = None,
                 alpha: Literal["random", "attn"] = "random", d_p: int = 128, gate: float = 0.94,
                 gate_width: int = 0, adapter: str | None = None, seed: int = 0):
        if mask_layer is not None and mask_layer < 0:
            raise ValueError(f"routing: mask_layer must be >= 0 (0: no mask routing), got {mask_layer}")
        if proxies is not None and proxies < 1:
            raise ValueError(f"routing: proxies must be >= 1, got {proxies}")
        if d_p < 1:
            raise ValueError(f"routing: d_p must be >= 1, got {d_p}")
        if not 0.0 <= gate <= 1.0:
            raise ValueError(f"routing: gate is a sigmoid's value and must be in [0, 1], got {gate}")
        if gate_width < 0:
            raise ValueError(f"routing: gate_width must be >= 0, got {gate_width}")
        self.mask_layer, self.mask_tokens, self.image, self.proxies = mask_layer, mask_tokens, image, proxies
        self.alpha, self.d_p, self.gate, self.gate_width, self.seed = alpha, d_p, gate, gate_width, seed
        if adapter is not None and (alpha, d_p, gate, gate_width) != ("random", 128, 0.94, 0):
            raise ValueError("routing: an adapter brings its own W_q, W_k and gate MLP; drop alpha, d_p, gate and "
                             "gate_width")
        self.adapter = None if adapter is None else adapter_identity(adapter)
        self._l_mask = 0
        self._projections: dict[tuple, Tensor] = {}
        self._adapter: Adapter | None = None

    def bind(self, info: ModelInfo) -> None:
        self._l_mask = self.resolved_mask_layer(info)
        if self._l_mask >= info.n_layers:
            raise ValueError(f"routing: mask_layer={self._l_mask} is beyond the model's {info.n_layers} layers; use "
                             f"0..{info.n_layers - 1}")
        if self.adapter is not None:
            self._adapter = Adapter.cached(self.adapter, info)
        if self.gate_width and info.weights:
            raise ValueError("routing: gate_width is the learned gate MLP of the paper's trained model; this "
                             "training-free variant has a constant gate (drop gate_width, or use it with "
                             "`segprune flops ARCH` for the paper's analytic FLOPs)")

    def resolved_mask_layer(self, info: ModelInfo) -> int:
        if self.mask_layer is not None:
            return self.mask_layer
        return round(PAPER_MASK_SKIP * info.n_layers / PAPER_LAYERS)

    def n_proxies(self, n_image: int) -> int:
        """N_s for `n_image` image tokens (all of them when N_s >= n_image: no routing)."""
        n_s = self.proxies if self.proxies is not None else max(1, round(PAPER_PROXIES * n_image / PAPER_IMAGE))
        return min(n_s, n_image)

    # -- mask routing (eq. 7-8) ---------------------------------------------------------------------------------
    def mask_rows(self, state: TokenState) -> Tensor:
        rows = ((state.kind == Kind.SEG) | (state.kind == Kind.ANSWER)).nonzero().squeeze(1)
        if self.mask_tokens == "carrier":  # the row that predicts [SEG] (generate's prefill: the last prompt row)
            rows = torch.cat([rows, torch.tensor([state.last_prompt_row], device=rows.device)])
        return rows

    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        rows = self.mask_rows(state) if self._l_mask else None
        return state if rows is None or rows.numel() == 0 else state.hold("mask", rows)

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        if i == self._l_mask and "mask" in state.held:
            return state.release("mask")  # with their input embeddings (eq. 8)
        return state

    # -- proxy-guided image routing (eq. 9-12) ------------------------------------------------------------------
    def ffn(self, i: int, mlp: nn.Module, x: Tensor, state: TokenState, ctx: Context) -> Tensor:
        img = state.image_rows
        n_s = self.n_proxies(len(img))
        if self.image == "full" or n_s >= len(img):
            return mlp(x)
        proxies, rest = self.draw(img, n_s, ctx)
        full = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        full[rest] = False
        rows = full.nonzero().squeeze(1)
        out = torch.zeros_like(x)
        out[:, rows] = mlp(x[:, rows])  # eq. 9: the proxies' FFN update FFN(v) - v (phi: identity)
        ctx.record.n_ffn = len(rows)
        if self.image == "skip":
            return out
        weights = self.alpha_weights(i, x, state.hidden, proxies, rest, ctx)  # (r, s) fp32, eq. 10
        update = weights.to(x.dtype) @ out[0, proxies]  # eq. 11
        gate = self._adapter.gate(i, x[0, rest]) if self._adapter else self.gate  # eq. 12
        out[0, rest] = gate * update
        ctx.record.light += self.light_matmuls(len(rest), n_s, ctx.info)
        ctx.record.routed, ctx.record.routed_dims = len(rest), self.path_dims(ctx.info)
        return out

    def draw(self, img: Tensor, n_s: int, ctx: Context) -> tuple[Tensor, Tensor]:
        """(proxies, the other image rows), both sorted: `n_s` of the image rows `img` drawn at random."""
        order = torch.randperm(len(img), generator=ctx.rng).to(img.device)
        return img[order[:n_s]].sort().values, img[order[n_s:]].sort().values

    def alpha_weights(self, i: int, x: Tensor, hidden: Tensor, proxies: Tensor, rest: Tensor,
                      ctx: Context) -> Tensor:
        """alpha (r, s): softmax over the proxies of the scaled similarity of each routed token with each proxy."""
        if self._adapter is not None:
            return self._adapter.alpha(i, x[0, rest], x[0, proxies])
        if self.alpha == "random":
            w = self.projection(x.shape[-1], x.device)
            q, k = x[0, rest].float() @ w, x[0, proxies].float() @ w
            return (q @ k.T / math.sqrt(self.d_p)).softmax(-1)
        layer = ctx.model.language_model.layers[i]
        attn = layer.self_attn
        z = layer.input_layernorm(hidden)  # the norm q/k expect, applied to the residual stream after attention
        hd = attn.head_dim
        q = attn.q_proj(z[:, rest]).view(1, len(rest), -1, hd).transpose(1, 2)  # (1, Hq, r, hd)
        k = repeat_kv(attn.k_proj(z[:, proxies]).view(1, len(proxies), -1, hd).transpose(1, 2),
                      attn.num_key_value_groups)  # (1, Hq, s, hd)
        return ((q.float() @ k.float().transpose(-1, -2)) * attn.scaling).softmax(-1)[0].mean(0)

    def projection(self, d: int, device: torch.device) -> Tensor:
        """The seeded (d, d_p) Gaussian projection, entries N(0, 1/d): a projected unit-RMS vector has unit-RMS
        entries, so <q, k> / sqrt(d_p) is scaled like an attention head's scores."""
        key = (d, str(device))
        if key not in self._projections:
            gen = torch.Generator().manual_seed(self.seed)
            self._projections[key] = (torch.randn(d, self.d_p, generator=gen) / math.sqrt(d)).to(device)
        return self._projections[key]

    def dims(self) -> tuple[int, int]:
        """(d_p, d_g) of the projection and the gate MLP (d_g 0: a constant gate)."""
        if self._adapter is not None:
            return self._adapter.d_p, self._adapter.d_g
        return self.d_p, self.gate_width

    def path_dims(self, info: ModelInfo) -> int:
        """d_p + d_g of the light path, as the paper's FLOPs formula counts it."""
        d_p, d_g = self.dims()
        return (d_p if self.alpha == "random" else info.n_heads * info.head_dim) + d_g

    def light_matmuls(self, r: int, s: int, info: ModelInfo) -> list[tuple[int, int, int]]:
        """The exact matmuls of the light path for r routed tokens and s proxies, as (m, k, n)."""
        d, (d_p, d_g) = info.hidden_size, self.dims()
        if self.alpha == "random":
            scores = [(r, d, d_p), (s, d, d_p), (r, d_p, s)]
        else:
            hd = info.head_dim
            scores = [(r, d, info.n_heads * hd), (s, d, info.n_kv_heads * hd)] + [(r, hd, s)] * info.n_heads
        gate = [(r, d, d_g), (r, d_g, d)] if d_g else []
        return scores + [(r, s, d)] + gate

    def check_data(self, dataset: str, split: str) -> None:
        if self._adapter is not None and self._adapter.calibrated_on == canonical_data(f"{dataset}:{split}"):
            raise ValueError(f"routing: the adapter {self.adapter} was calibrated on {dataset}:{split}; evaluate it on "
                             f"another split, or calibrate on one you do not evaluate (e.g. train)")

    # -- budgets ------------------------------------------------------------------------------------------------
    budget_params = ("proxies",)

    def budget_n_avg(self, info: ModelInfo) -> float:
        """N - saved / (L c): the N_avg a pruning method would need for the same projection + FFN work."""
        d, m = info.hidden_size, info.intermediate_size
        token = 2 * d * (info.n_heads + info.n_kv_heads) * info.head_dim + 3 * d * m  # projections + gated FFN
        base = self.layer_records(info, 0, LISA_ANSWER)
        full = TokenRouting(mask_layer=0, image="full").layer_records(info, 0, LISA_ANSWER)
        saved = sum((f.n - r.n) * token + (f.n_ffn - f.n + r.n - r.n_ffn) * 3 * d * m
                    - sum(a * b * c for a, b, c in r.light) for r, f in zip(base, full, strict=True))
        return info.n_image_tokens - saved / (info.n_layers * token)

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed) -> TokenRouting:
        n = info.n_image_tokens
        fixed = {**fixed, "image": fixed.get("image", "proxy")}
        if fixed["image"] == "full":
            raise ValueError("routing: a budget is met with proxies, which image=full turns off; drop image=full")
        candidates = [cls(**fixed, proxies=s) for s in range(1, n + 1)]
        for m in candidates:
            m.bind(info)  # an adapter's d_p, d_g count in the light path
        best = min(candidates, key=lambda m: abs(m.budget_n_avg(info) - n_avg))
        if abs(best.budget_n_avg(info) - n_avg) > BUDGET_TOLERANCE * n:
            lowest, highest = candidates[0].budget_n_avg(info), candidates[-1].budget_n_avg(info)
            raise ValueError(f"routing: N_avg {n_avg:.1f} ({1 - n_avg / n:.0%} reduction) is out of reach; with "
                             f"these settings routing reaches {1 - highest / n:.0%} to {1 - lowest / n:.0%} (one "
                             f"proxy per layer)")
        return best

    # -- analytic plan ------------------------------------------------------------------------------------------
    def image_schedule(self, info: ModelInfo) -> list[int]:
        return [info.n_image_tokens] * info.n_layers  # nothing is dropped

    def layer_records(self, info: ModelInfo, text: int, answer: int) -> list[LayerRecord]:
        n_img, l_mask = info.n_image_tokens, self.resolved_mask_layer(info)
        held = answer + (self.mask_tokens == "carrier") if l_mask else 0
        n_s = self.n_proxies(n_img)
        routed = n_img - n_s if self.image != "full" else 0
        out = []
        for i in range(info.n_layers):
            n = text + n_img - (held if i < l_mask else 0)
            rec = LayerRecord(n=n, n_image=n_img, n_ffn=n - routed)
            if routed and self.image == "proxy":
                rec.light, rec.routed, rec.routed_dims = self.light_matmuls(routed, n_s, info), routed, \
                    self.path_dims(info)
            out.append(rec)
        return out


# -- the calibrated variant ---------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """The learned parts of the paper's design, per layer: W_q, W_k (d x d_p) and the gate MLP d -> d_g -> d (GELU,
    then the sigmoid of eq. 12). Fitted with the LLM frozen by `calibrate`; starts as the training-free variant (the
    seeded random projection, a constant gate), so calibration can only refine it."""

    def __init__(self, n_layers: int, d: int, d_p: int, d_g: int, projection: Tensor | None = None,
                 gate: float = 0.94):
        super().__init__()
        self.d_p, self.d_g = d_p, d_g
        start = projection if projection is not None and projection.shape == (d, d_p) else torch.empty(d, d_p)
        self.w_q = nn.ParameterList(nn.Parameter(start.clone()) for _ in range(n_layers))
        self.w_k = nn.ParameterList(nn.Parameter(start.clone()) for _ in range(n_layers))
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(d, d_g), nn.GELU(), nn.Linear(d_g, d))
                                   for _ in range(n_layers))
        for g in self.gates:
            if not g[2].weight.is_meta:  # (built on the meta device only to be loaded)
                nn.init.zeros_(g[2].weight)
                nn.init.constant_(g[2].bias, math.log(gate / (1 - gate)))  # sigmoid(bias) = the constant gate
        self.calibrated_on = ""

    def _on(self, x: Tensor) -> None:
        if self.w_q[0].device != x.device:
            self.to(x.device)

    def alpha(self, i: int, routed: Tensor, proxies: Tensor) -> Tensor:
        self._on(routed)
        q, k = routed.float() @ self.w_q[i], proxies.float() @ self.w_k[i]
        return (q @ k.T / math.sqrt(self.d_p)).softmax(-1)

    def gate(self, i: int, routed: Tensor) -> Tensor:
        self._on(routed)
        return torch.sigmoid(self.gates[i](routed.float())).to(routed.dtype)

    def save(self, path: Path, provenance: dict) -> None:
        """Atomically, as safetensors with the provenance as metadata."""
        from safetensors.torch import save_file

        from harness.files import usual_mode

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, tmp, metadata={"segprune": json.dumps(provenance)})
        os.chmod(tmp, usual_mode(0o666))
        os.replace(tmp, path)

    @classmethod
    def cached(cls, identity: str, info: ModelInfo) -> Adapter:
        """The adapter `identity` ("PATH#sha") for a model shape, read once per process (`bind` runs per sample)."""
        key = (identity, info.n_layers, info.hidden_size)
        if key not in _ADAPTERS:
            _ADAPTERS[key] = cls.load(identity.rpartition("#")[0] or identity, info)
        return _ADAPTERS[key]

    @classmethod
    def load(cls, path: str | os.PathLike, info: ModelInfo) -> Adapter:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"routing: adapter {path} not found; make one with `segprune calibrate routing`")
        bad = f"routing: {path} is not a routing adapter of `segprune calibrate routing`"
        try:
            with safe_open(path, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("segprune", "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, json.JSONDecodeError, OSError) as err:
            raise ValueError(f"{bad} ({err}); calibrate again") from None
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("layers", "hidden_size",
                                                                                          "d_p", "d_g")):
            raise ValueError(f"{bad} (no layers, hidden_size, d_p, d_g in its metadata); calibrate again")
        want = (info.n_layers, info.hidden_size)
        if (meta["layers"], meta["hidden_size"]) != want:
            raise ValueError(f"routing: {path} was calibrated for {meta['layers']} layers of width "
                             f"{meta['hidden_size']}, the model has {want[0]} of width {want[1]}; calibrate on it")
        with torch.device("meta"):
            adapter = cls(info.n_layers, info.hidden_size, meta["d_p"], meta["d_g"], torch.zeros(1, 1))
        try:
            adapter.load_state_dict(state, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{bad} (its tensors do not fit its metadata: {str(err).splitlines()[0]}); calibrate "
                             f"again") from None
        adapter.calibrated_on = canonical_data(str(meta.get("data", "")))
        return adapter.requires_grad_(False)


_ADAPTERS: dict[tuple[str, int, int], Adapter] = {}
_DIGESTS: dict[tuple[str, int, int], str] = {}


def adapter_identity(path: str) -> str:
    """"PATH#<sha256[:12]>" for an adapter file (or check that "PATH#sha" still names the same content)."""
    import hashlib

    file, _, want = path.rpartition("#") if "#" in path else (path, "", "")
    if not Path(file).is_file():
        raise ValueError(f"routing: adapter {file} not found; make one with `segprune calibrate routing`")
    st = Path(file).stat()
    key = (str(Path(file).resolve()), st.st_size, st.st_mtime_ns)  # hashed once (a budget builds N candidates)
    if key not in _DIGESTS:
        with open(file, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    got = _DIGESTS[key]
    if want and want != got:
        raise ValueError(f"routing: {file} changed since this spec was resolved (sha256 {got}, not {want}); use a new "
                         f"run folder for the new adapter")
    return f"{file}#{got}"


def canonical_data(data: str) -> str:
    """"dataset:split" with the dataset's registered name (aliases resolved), for comparing calibration splits."""
    from harness.datasets import DATASETS

    name, _, split = data.partition(":")
    try:
        return f"{DATASETS.canonical(name)}:{split}"
    except ValueError:
        return data


class _Collector(Method):
    """The stock forward, keeping every layer's FFN input and update of the image tokens."""

    name = "routing-calibration"

    def __init__(self):
        self.layers: list[tuple[Tensor, Tensor]] = []

    def ffn(self, i, mlp, x, state, ctx):
        out = mlp(x)
        img = state.image_rows
        self.layers.append((x[0, img].float().clone(), out[0, img].float().clone()))
        return out


def calibrate(model, samples: list, *, data: str, proxies: int | None = None, d_p: int | None = None,
              d_g: int | None = None, epochs: int = 8, lr: float = 1e-3, holdout: float = 0.25, seed: int = 0,
              progress: Callable[[int], None] | None = None) -> tuple[Adapter, dict]:
    """Fit W_q, W_k and the gate MLP of every layer by regressing the true FFN updates of the routed image tokens
    from the proxies' (eq. 9-12), the LLM frozen; the last `holdout` of `samples` only measures the fit.

    `d_p`, `d_g` default to the paper's proportions, 1/16 of the hidden size and of the FFN's intermediate size
    (Phi-1.5: 2048 -> 128, 8192 -> 512). The adapter starts as the training-free variant with that d_p.

    Returns the adapter and its provenance (with the held-out residual |pred - true|^2 / |true|^2 before and after).
    """
    import harness

    info = model.info
    d_p = d_p or max(1, round(info.hidden_size / 16))
    d_g = d_g or max(1, round(info.intermediate_size / 16))
    if len(samples) < 2:
        raise ValueError("routing calibration needs at least 2 samples (one is held out to measure the fit)")
    plan = TokenRouting(mask_layer=0, proxies=proxies, d_p=d_p, seed=seed)
    n_s = plan.n_proxies(info.n_image_tokens)
    torch.manual_seed(seed)
    adapter = Adapter(info.n_layers, info.hidden_size, d_p, d_g, plan.projection(info.hidden_size, "cpu"))
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    n_val = max(1, round(holdout * len(samples)))
    train, held = samples[:-n_val], samples[-n_val:]
    gen = torch.Generator().manual_seed(seed)

    def features(s) -> list[tuple[Tensor, Tensor]]:
        collector = _Collector()
        model.segment(s.image, s.query, collector, is_sentence=s.is_sentence, sample_key=s.id)
        return [(x.cpu().clone(), t.cpu().clone()) for x, t in collector.layers]  # out of inference mode: autograd

    def residual(i: int, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.randperm(len(x), generator=gen)
        p, r = order[:n_s], order[n_s:]
        pred = adapter.gate(i, x[r]) * (adapter.alpha(i, x[r], x[p]) @ t[p])
        return ((pred - t[r]) ** 2).sum(), (t[r] ** 2).sum()

    def held_out() -> float:
        err = norm = 0.0
        with torch.no_grad():
            for s in held:
                for i, (x, t) in enumerate(features(s)):
                    e, n = residual(i, x, t)
                    err, norm = err + float(e), norm + float(n)
        return err / norm

    before = held_out()
    for _ in range(epochs):
        for s in train:
            for i, (x, t) in enumerate(features(s)):
                e, n = residual(i, x, t)
                (e / n).backward()  # each layer's own parameters, its own relative error
            opt.step()
            opt.zero_grad()
            if progress:
                progress(1)
    after = held_out()
    adapter.calibrated_on = data = canonical_data(data)
    provenance = {"model": model.config.name, "fingerprint": model.fingerprint(), "data": data,
                  "train_samples": len(train), "held_out_samples": len(held), "epochs": epochs, "lr": lr,
                  "seed": seed, "proxies": n_s, "d_p": d_p, "d_g": d_g, "layers": info.n_layers,
                  "hidden_size": info.hidden_size, "held_out_residual_before": round(before, 4),
                  "held_out_residual_after": round(after, 4), "segprune": harness.__version__,
                  "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    return adapter.requires_grad_(False), provenance

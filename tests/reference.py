"""Independent references for the contract tests: stock transformers modules, full-length sequences, masks.

`masked_reference` runs the *full* assembled sequence through the stock `LlamaDecoderLayer.forward`, hiding from
layer i on every key the pruned run did not have at layer i, and restoring a re-inserted token to the state it had
when it left. A method that only drops, holds back and re-inserts tokens must match it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from harness.engine import Context, assemble, run_vision
from harness.ledger import Ledger
from harness.method import Method
from harness.state import TokenState


class Recorder(Method):
    """Wraps a method and records the rows (sequence indices) present at every layer."""

    def __init__(self, inner: Method):
        self.inner = inner
        self.present: list[Tensor] = []
        self.position_policy = inner.policy
        self.seed = getattr(inner, "seed", 0)
        self.name = inner.name

    def bind(self, info):
        self.inner.bind(info)

    def on_vision(self, feats, ctx):
        return self.inner.on_vision(feats, ctx)

    def on_sequence(self, state, ctx):
        return self.inner.on_sequence(state, ctx)

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        state = self.inner.before_layer(i, state, ctx)
        self.present.append(state.index.clone())
        return state

    def ffn(self, i, mlp, x, state, ctx):
        return self.inner.ffn(i, mlp, x, state, ctx)


def assembled_sequence(model, image, query: str, method: Method) -> TokenState:
    """The sequence the LLM starts from, after the method's pre-LLM event (the method's own vision step)."""
    prep = model.prepare(image)
    ledger = Ledger()
    ctx = Context(model=model, info=model.info, ledger=ledger, rng=torch.Generator().manual_seed(0), image=image)
    with torch.inference_mode():
        feats = method.on_vision(run_vision(model, prep.clip_pixels, ledger), ctx)
        return assemble(model, model.projector(feats.patches), feats.patch_index, query, False, members=ledger.members)


def unpruned_positions(model, state: TokenState) -> Tensor:
    """GAP's ids for an assembled sequence whose image tokens each stand for one patch: the prompt 0..s-1, patch p at
    s + p, the text after the image at s + N + j (N: the model's full image-token count)."""
    img = (state.kind == 1).nonzero()[:, 0]
    s, end = int(img[0]), int(img[-1]) + 1
    assert (state.patch[img] >= 0).all(), "merged tokens have no single unpruned position"
    after = torch.arange(len(state) - end) + s + model.info.n_image_tokens
    return torch.cat([torch.arange(s), s + state.patch[img].cpu(), after]).to(state.index.device)


def masked_reference(model, state: TokenState, present: list[Tensor], policy: str) -> Tensor:
    """Final normed hidden state of LISA's [SEG] source token from a full-length masked run."""
    lm = model.language_model
    h = state.hidden.clone()
    n = h.shape[1]
    dev, dt = h.device, h.dtype
    original = unpruned_positions(model, state) if policy == "original" else None
    prev = torch.ones(n, dtype=torch.bool, device=dev)
    saved = torch.zeros_like(h)
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    with torch.inference_mode():
        for i, layer in enumerate(lm.layers):
            now = torch.zeros(n, dtype=torch.bool, device=dev)
            now[present[i]] = True
            left, back = prev & ~now, now & ~prev
            saved[:, left] = h[:, left]  # state when it left = input of the first layer without it
            h[:, back] = saved[:, back]
            pos = original
            if policy == "reindex":
                pos = torch.zeros(n, dtype=torch.long, device=dev)
                pos[now] = torch.arange(int(now.sum()), device=dev)
            allowed = causal & now[None, :]
            allowed |= torch.eye(n, dtype=torch.bool, device=dev)  # absent rows attend to themselves (ignored)
            mask = torch.zeros(n, n, dtype=dt, device=dev).masked_fill(~allowed, torch.finfo(dt).min)[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos[None]))
            prev = now
        src = int(state.row_of(4)[0]) - 1  # token before [SEG]
        return lm.norm(h[:, src])

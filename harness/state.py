"""The token state that flows through the decoder-layer loop.

Invariants (see DESIGN.md):
- rows are always ordered by `index` (the token's position in the assembled sequence), so plain causal attention
  stays correct after any drop or re-insertion;
- every row carries its kind and, for image tokens, the vision patch it came from;
- tokens held back by a method live in `held` with the hidden state they had when they left, and come back in
  original order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch
from torch import Tensor


class Kind(IntEnum):
    SYSTEM = 0  # everything before the image (BOS, system prompt, "USER:", <im_start>)
    IMAGE = 1
    QUERY = 2  # user text after the image, up to and including "ASSISTANT:"
    ANSWER = 3  # answer text other than [SEG]
    SEG = 4


@dataclass
class TokenState:
    """Rows of the sequence currently inside the LLM (batch size 1).

    Attributes:
        hidden: (1, n, d) hidden states.
        index: (n,) position of each row in the assembled sequence (the order of the rows).
        kind: (n,) `Kind` of each row.
        patch: (n,) vision-patch index (row-major on the patch grid) for image rows, -1 otherwise.
        position: (n,) RoPE position of each row under the "original" policy: where the token sits in the unpruned
            sequence (`engine.original_positions`); equal to `index` unless a pre-LLM method changed the image block.
        held: tokens held back by a method, by name, each a `TokenState` frozen when it left.
    """

    hidden: Tensor
    index: Tensor
    kind: Tensor
    patch: Tensor
    position: Tensor
    held: dict[str, TokenState] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.index.numel()

    @property
    def image_rows(self) -> Tensor:
        """(m,) row numbers of the image tokens, in sequence order."""
        return (self.kind == Kind.IMAGE).nonzero().squeeze(1)

    @property
    def n_image(self) -> int:
        return int((self.kind == Kind.IMAGE).sum())

    def row_of(self, kind: Kind) -> Tensor:
        return (self.kind == kind).nonzero().squeeze(1)

    @property
    def seg_source_row(self) -> int:
        """Row whose final hidden state is LISA's [SEG] embedding: the token *before* the first [SEG]."""
        seg = self.row_of(Kind.SEG)
        if seg.numel() == 0 or int(seg[0]) == 0:
            raise RuntimeError("the sequence has no [SEG] token with a predecessor: a method dropped text tokens")
        src = int(seg[0]) - 1
        if int(self.index[src]) != int(self.index[seg[0]]) - 1:
            raise RuntimeError("the token before [SEG] was dropped; methods may only drop image tokens")
        return src

    @property
    def last_prompt_row(self) -> int:
        """Row of the prompt's last token, the one before the answer: what generation's prefill ends with, and the
        query row of PyramidDrop's "last instruction token" (in LISA's template the answer starts with [SEG], so
        this is also the [SEG] source row)."""
        answer = ((self.kind == Kind.SEG) | (self.kind == Kind.ANSWER)).nonzero()
        return (int(answer[0, 0]) if answer.numel() else len(self)) - 1

    def select(self, rows: Tensor) -> TokenState:
        """Keep `rows` (sorted row numbers); `held` is carried over unchanged."""
        return replace(self, hidden=self.hidden[:, rows], index=self.index[rows], kind=self.kind[rows],
                       patch=self.patch[rows], position=self.position[rows])

    def keep_image(self, image_rows: Tensor) -> TokenState:
        """Keep every non-image row and the image rows in `image_rows` (any order); sequence order is preserved."""
        keep = self.kind != Kind.IMAGE
        keep[image_rows] = True
        return self.select(keep.nonzero().squeeze(1))

    def hold(self, name: str, rows: Tensor) -> TokenState:
        """Move `rows` out of the sequence into `held[name]`, keeping their current hidden states."""
        if name in self.held:
            raise ValueError(f"tokens are already held under {name!r}")
        out = torch.ones(len(self), dtype=torch.bool, device=self.index.device)
        out[rows] = False
        new = self.select(out.nonzero().squeeze(1))
        new.held = {**self.held, name: self.select(rows.sort().values)}
        new.held[name].held = {}
        return new

    def release(self, name: str) -> TokenState:
        """Re-insert `held[name]` with the hidden states they were held with, in original sequence order."""
        back = self.held[name]
        index = torch.cat([self.index, back.index])
        order = index.argsort()
        held = {k: v for k, v in self.held.items() if k != name}
        return TokenState(hidden=torch.cat([self.hidden, back.hidden], 1)[:, order], index=index[order],
                          kind=torch.cat([self.kind, back.kind])[order],
                          patch=torch.cat([self.patch, back.patch])[order],
                          position=torch.cat([self.position, back.position])[order], held=held)

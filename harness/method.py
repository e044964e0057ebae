"""The method contract: events, declarations, parameter parsing and the method registry.

The loop of `harness.engine` fires these events (pseudocode of one forward pass, batch size 1):

    feats = vision_tower(image)                      # VisionFeatures: patches (1, N, Dv), grid, CLS
    feats = method.on_vision(feats, ctx)             # pre-LLM: replace / merge / select patches
    tokens = projector(feats.patches)
    state = assemble(prompt, tokens)                 # TokenState: hidden, index, kind, patch, position
    state = method.on_sequence(state, ctx)           # hold tokens back before layer 0
    for i, layer in enumerate(llm.layers):
        state = method.before_layer(i, state, ctx)   # drop / re-insert tokens before layer i
        h = h + self_attn(input_layernorm(h))        # stock submodules, sdpa/flash, causal
        x = post_attention_layernorm(h)
        h = h + method.ffn(i, layer.mlp, x, state, ctx)   # default: layer.mlp(x) for every token
    e = text_hidden_fcs(norm(h)[token before [SEG]]) -> SAM mask decoder -> mask

In `generate` decode mode the sequence ends at "ASSISTANT:" and the loop above is the cached prefill: every event
fires there only, and the greedy decode steps that follow attend to each layer's (pruned) cache with the stock FFN.

A method is a plain class with typed keyword hyperparameters; it implements any subset of the events and never
touches the model outside them. Register it with `@register("name")`.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml

from harness.ledger import LayerRecord
from harness.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor, nn

    from harness.engine import Context, VisionFeatures
    from harness.state import TokenState

STAGES = ("control", "pre-llm", "in-llm", "multi-stage")
POSITION_POLICIES = ("original", "reindex")


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model it is bound to."""

    n_layers: int
    n_image_tokens: int  # image tokens the projector emits without any method
    grid: tuple[int, int]  # patch grid (h, w)
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vision_layers: int
    vision_hidden_size: int
    weights: bool = True  # False for a named architecture costed without weights (`segprune flops ARCH`)


class Method:
    """Base class of every reduction method and control.

    Class attributes a method declares:
        stage: one of `STAGES`.
        position_policy: the official RoPE position ids after a drop: "original" (every token keeps the position it
            has in the unpruned sequence, gaps and all; GAP's fix for pre-LLM methods) or "reindex" (0..n-1 in the
            current sequence, after every drop). A spec's `positions=` overrides it per run (`Method.policy`).
        reduces_tokens: whether it removes or merges tokens (False: the `positions` override means nothing to it).
        needs_llm_attention / needs_vision_attention: whether it recomputes attention rows.
        citation: short citation (title, venue, link).
        keep_all: hyperparameters under which the method keeps every token (None if it has no such setting);
            the shared test battery checks that this setting reproduces the unpruned model.
        exact_reference: True when the method only drops, holds back and re-inserts tokens of the assembled
            sequence and uses the stock FFN, so that a pruned run must equal a full-length run whose attention
            mask hides the missing keys (checked by the battery).
        deviations: where and why the implementation deviates from the official code ("" if it does not).
        in_default_grid: whether `segprune run` (the default grid) includes it; a method too slow for that run on a
            CPU says so and keeps its figures in a `results/` grid of its own.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "in-llm"
    position_policy: ClassVar[str] = "original"
    reduces_tokens: ClassVar[bool] = True
    needs_llm_attention: ClassVar[bool] = False
    needs_vision_attention: ClassVar[bool] = False
    citation: ClassVar[str] = ""
    keep_all: ClassVar[dict[str, Any] | None] = None
    exact_reference: ClassVar[bool] = True
    deviations: ClassVar[str] = ""
    in_default_grid: ClassVar[bool] = True
    budget_params: ClassVar[tuple[str, ...]] = ()  # the parameters `for_budget` solves for (cannot also be fixed)
    positions: str | None = None  # the run's override of `position_policy` (a spec's "positions="), None = official

    @property
    def policy(self) -> str:
        """The position-id policy this run uses: the `positions` override, else the method's own."""
        return self.positions or self.position_policy

    def bind(self, info: ModelInfo) -> None:
        """Check the hyperparameters against the model; raise ValueError with a fix-it message if they do not fit."""

    def on_vision(self, feats: VisionFeatures, ctx: Context) -> VisionFeatures:
        return feats

    def on_sequence(self, state: TokenState, ctx: Context) -> TokenState:
        return state

    def before_layer(self, i: int, state: TokenState, ctx: Context) -> TokenState:
        return state

    def ffn(self, i: int, mlp: nn.Module, x: Tensor, state: TokenState, ctx: Context) -> Tensor:
        return mlp(x)

    def image_schedule(self, info: ModelInfo) -> list[int] | None:
        """Image tokens per LLM layer if they do not depend on the input (for analytic FLOPs), else None."""
        return None

    def check_data(self, dataset: str, split: str) -> None:
        """Refuse (ValueError) a dataset split this method must not be evaluated on (one it was calibrated on)."""

    def budget_n_avg(self, info: ModelInfo) -> float | None:
        """The N_avg a budget is matched on: the mean of `image_schedule` (None when it depends on the input). A
        method that keeps every image token but saves their work otherwise (Token Routing) returns the N_avg a
        pruning method would need for the same saving."""
        sched = self.image_schedule(info)
        return None if sched is None else sum(sched) / len(sched)

    def layer_records(self, info: ModelInfo, text: int, answer: int) -> list[LayerRecord] | None:
        """The work of every LLM layer for analytic FLOPs, if it does not depend on the input, else None.

        Args:
            text: non-image tokens of the sequence, the answer included.
            answer: how many of them are the answer (LISA's "[SEG].</s>"; PSALM's mask queries).

        Default: every text token in every layer, `image_schedule`'s image tokens, everything through the stock FFN.
        """
        sched = self.image_schedule(info)
        return None if sched is None else [LayerRecord(n=text + k, n_image=k, n_ffn=text + k) for k in sched]

    @classmethod
    def for_budget(cls, info: ModelInfo, n_avg: float, **fixed: Any) -> Method:
        """The method with the parameters that make its average image tokens per LLM layer (N_avg, LVLM_CSP eq. 9)
        closest to `n_avg` on this model; `fixed` parameters are kept as given. Each method documents its rule."""
        raise ValueError(f"{cls.name} has no budget mapping; give its parameters explicitly (segprune methods)")

    # -- helpers ---------------------------------------------------------------------------------------------
    def overrides(self, event: str) -> bool:
        return getattr(type(self), event) is not getattr(Method, event)

    def params(self) -> dict[str, Any]:
        """The resolved hyperparameters, as passed to __init__."""
        return {p.name: getattr(self, p.name) for p in describe_params(type(self))}

    def spec(self) -> str:
        params = {**self.params(), **({"positions": self.positions} if self.positions else {})}
        kv = ",".join(f"{k}={_format_value(v)}" for k, v in params.items())
        return f"{self.name}:{kv}" if kv else self.name

    def __repr__(self) -> str:
        return f"<method {self.spec()}>"


METHODS: Registry[type[Method]] = Registry("method", Method)
register = METHODS.register


# -- parameters ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)


def describe_params(cls: type[Method]) -> list[Param]:
    """Keyword hyperparameters of a method class, with types, defaults and the help from its Google docstring."""
    hints = typing.get_type_hints(cls.__init__) if cls.__init__ is not object.__init__ else {}
    doc: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass inherits its parents' Args: entries and may override them
        doc.update(_arg_docs(klass.__dict__.get("__doc__") or ""))
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out.append(Param(p.name, hints.get(p.name, Any), p.default, doc.get(p.name, "")))
    return out


def _arg_docs(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    m = re.search(r"Args:\n(.*?)(\n\s*\n|\Z)", doc, re.S)
    if not m:
        return out
    current = None
    for line in m.group(1).splitlines():
        hit = re.match(r"\s+(\w+)(?: \(.*?\))?: (.*)", line)
        if hit and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = hit.group(1)
            out[current] = hit.group(2).strip()
        elif current:
            out[current] += " " + line.strip()
    return out


def _type_name(ann: Any) -> str:
    if typing.get_origin(ann) is Literal:
        return "{" + "|".join(str(a) for a in typing.get_args(ann)) + "}"
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if typing.get_origin(ann) is list:
        return f"list[{_type_name(typing.get_args(ann)[0])}]"
    return getattr(ann, "__name__", str(ann))


def _coerce(name: str, value: Any, ann: Any, method: str) -> Any:
    """Convert a parsed value to the annotated type, or raise ValueError saying what is expected."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    bad = ValueError(f"{method}: parameter {name!r} expects {_type_name(ann)}, got {value!r}")
    if ann is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a, method)
            except ValueError:
                pass
        raise bad
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{method}: parameter {name!r} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, v, args[0], method) for v in value]
    if ann is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, str) and ann in (int, float):  # YAML reads "5e-05" as a string
        try:
            value = ann(value)
        except ValueError:
            raise bad from None
    if ann is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad
        return int(value)
    if ann is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if ann is str:
        return str(value)
    return value


def _format_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return repr(v) if isinstance(v, float) else str(v)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse "name:key=value,key=value" (lists in brackets: "pdrop:layers=[8,16,24]") into (name, kwargs)."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ValueError(f"empty method name in {spec!r}; write it as name:key=value,...")
    kwargs: dict[str, Any] = {}
    depth, start = 0, 0
    parts = []
    for i, ch in enumerate(rest):
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(rest[start:i])
            start = i + 1
    parts.append(rest[start:])
    for part in filter(None, (p.strip() for p in parts)):
        key, eq, raw = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"cannot parse {part!r} in method spec {spec!r}; write it as name:key=value,...")
        try:
            kwargs[key.strip()] = yaml.safe_load(raw.strip())
        except yaml.YAMLError as err:
            raise ValueError(f"cannot parse value {raw!r} for {key.strip()!r} in {spec!r}") from err
    return name, kwargs


# -- budgets ---------------------------------------------------------------------------------------------------
def budget_rule(cls: type[Method]) -> str:
    """How a method meets a budget: the "Budget mapping:" paragraph of its docstring, else its `for_budget` doc."""
    if cls.for_budget.__func__ is Method.for_budget.__func__:
        return ""
    m = re.search(r"Budget mapping: (.*?)(\n\s*\n|\Z)", cls.__doc__ or "", re.S)
    text = m.group(1) if m else (cls.for_budget.__doc__ or "")
    return " ".join(text.split())


BUDGET_TOLERANCE = 0.02  # a budget is met when |achieved - target| N_avg is within 2% of the unpruned count N


@dataclass(frozen=True)
class Budget:
    """A cost target for a method: the image-token reduction r = 1 - N_avg / N (LVLM_CSP's pruning ratio, Table 6:
    the fraction of image-token-layer work removed, exactly the share of the per-token projection and FFN FLOPs),
    or the average image tokens per LLM layer N_avg itself."""

    reduction: float | None = None
    n_avg: float | None = None

    def __post_init__(self):
        if (self.reduction is None) == (self.n_avg is None):
            raise ValueError("a budget is either a reduction (e.g. @75% or @0.75) or an average count (@navg=64)")
        if self.reduction is not None and not 0.0 <= self.reduction < 1.0:
            raise ValueError(f"a budget reduction must be in [0, 1) (e.g. @75%), got {self.reduction}")
        if self.n_avg is not None and self.n_avg <= 0:
            raise ValueError(f"a budget N_avg must be > 0, got {self.n_avg}")

    def target(self, info: ModelInfo) -> float:
        """The target N_avg on a model."""
        return self.n_avg if self.n_avg is not None else (1.0 - self.reduction) * info.n_image_tokens

    def __str__(self) -> str:
        return f"navg={_format_value(self.n_avg)}" if self.n_avg is not None else f"{self.reduction * 100:g}%"


def split_budget(spec: str) -> tuple[str, Budget | None]:
    """Split "name:k=v@75%" (also "@0.75", "@navg=64") into ("name:k=v", Budget)."""
    head, at, tail = spec.partition("@")
    if not at:
        return spec, None
    t = tail.strip().replace(" ", "")
    number = t[5:] if t.startswith("navg=") else t[:-1] if t.endswith("%") else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read the budget {tail!r} in {spec!r}; write @75%, @0.75 or @navg=64") from None
    if t.startswith("navg="):
        return head, Budget(n_avg=value)
    return head, Budget(reduction=value / 100 if t.endswith("%") else value)


def scale_layers(layers: tuple[int, ...] | list[int], n_layers: int, depth: int = 32) -> list[int]:
    """Layer indices given for a `depth`-layer LLM (LLaVA-1.5-7B: 32) scaled to a model's depth: round(b L / depth),
    made strictly increasing inside 1..L-1 (8 layers: [8, 16, 24] -> [2, 4, 6])."""
    out: list[int] = []
    for b in layers:
        v = max(round(b * n_layers / depth), out[-1] + 1 if out else 1)
        if v >= n_layers:
            raise ValueError(f"the model's {n_layers} layers are too few for the boundaries {list(layers)} (given "
                             f"for {depth} layers); pass explicit layer indices")
        out.append(v)
    return out


def budget_spec(spec: str) -> str:
    """The canonical text of a budget spec ("fastv:score=seg@75%"): name, fixed parameters coerced and formatted
    like `Method.spec`, budget. Fails now on an unknown method or parameter, a missing mapping or a fixed
    parameter the mapping solves for."""
    head, budget = split_budget(spec)
    if budget is None:
        raise ValueError(f"{spec!r} has no budget")
    name, fixed = parse_spec(head)
    cls = METHODS.get(name)
    positions = pop_positions(cls, fixed)
    fixed = _check_budget_params(cls, resolve_params(cls, fixed), budget)
    fixed = {**fixed, **({"positions": positions} if positions else {})}
    kv = ",".join(f"{k}={_format_value(v)}" for k, v in sorted(fixed.items()))
    return f"{cls.name}{':' + kv if kv else ''}@{budget}"


def _check_budget_params(cls: type[Method], fixed: dict[str, Any], budget: Budget) -> dict[str, Any]:
    if cls.for_budget.__func__ is Method.for_budget.__func__:
        raise ValueError(f"{cls.name} has no budget mapping; give its parameters explicitly (segprune methods)")
    both = sorted(set(fixed) & set(cls.budget_params))
    if both:
        raise ValueError(f"{cls.name}: {', '.join(both)} is what @{budget} solves for; give either the budget or "
                         f"{', '.join(both)}")
    return fixed


def achieved_n_avg(method: Method, info: ModelInfo) -> float | None:
    """The N_avg a budget is matched on (`Method.budget_n_avg`); None when it depends on the input."""
    return method.budget_n_avg(info)


def create_method(spec_or_name: str | Method | None = None, *, info: ModelInfo | None = None,
                  **kwargs: Any) -> Method:
    """Build a method from "name:key=value,..." and/or keyword arguments (keywords win).

    A budget suffix ("fastv@75%", "pdrop@navg=64", "fastv:k=3@0.8") asks the method's `for_budget` mapping for the
    parameters that meet it on the model described by `info`; explicit parameters stay fixed. A mapping that
    cannot reach the target within `BUDGET_TOLERANCE` raises ValueError. Unknown names and parameters raise
    ValueError listing the valid choices; values are coerced to the annotated types; range checks happen in the
    method's __init__.
    """
    if isinstance(spec_or_name, Method):
        if kwargs:
            raise ValueError("cannot pass keyword arguments with an already-built method")
        return spec_or_name
    spec, budget = split_budget(spec_or_name or "none")
    if budget is not None:
        if info is None:
            raise ValueError(f"{spec_or_name!r} has a budget, which depends on the model; resolve it with the model "
                             f"(create_method(spec, info=model.info))")
        name, fixed = parse_spec(spec)
        cls = METHODS.get(name)
        fixed = {**fixed, **{k: v for k, v in kwargs.items() if v is not None}}
        positions = pop_positions(cls, fixed)
        fixed = resolve_params(cls, fixed)
        _check_budget_params(cls, fixed, budget)
        target = budget.target(info)
        method = cls.for_budget(info, target, **fixed)
        method.positions = positions
        method.bind(info)
        got = achieved_n_avg(method, info)
        if got is not None and abs(got - target) > BUDGET_TOLERANCE * info.n_image_tokens:
            raise ValueError(f"{cls.name} cannot reach {budget} (N_avg {target:.1f}) on this model: its closest "
                             f"setting {method.spec()} has N_avg {got:.1f}; ask for that budget or give parameters")
        return method
    name, spec_kwargs = parse_spec(spec)
    cls = METHODS.get(name)
    given = {**spec_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
    positions = pop_positions(cls, given)
    method = cls(**resolve_params(cls, given))
    method.positions = positions
    return method


def pop_positions(cls: type[Method], given: dict[str, Any]) -> str | None:
    """Take the `positions` override out of a method's parameters: None when absent or equal to the method's own
    policy (so `fastv` and `fastv:positions=original` are one cell); ValueError when it is not a policy or the
    method removes no token."""
    if "positions" not in given or "positions" in {p.name for p in describe_params(cls)}:
        return None
    value = given.pop("positions")
    if value not in POSITION_POLICIES:
        raise ValueError(f"{cls.name}: positions must be one of {', '.join(POSITION_POLICIES)}, got {value!r}")
    if not cls.reduces_tokens:
        raise ValueError(f"{cls.name} keeps every token, so positions={value} changes nothing; drop it")
    return None if value == cls.position_policy else value


def resolve_params(cls: type[Method], given: dict[str, Any]) -> dict[str, Any]:
    params = {p.name: p for p in describe_params(cls)}
    unknown = sorted(set(given) - set(params))
    if unknown:
        valid = ", ".join(params) or "none"
        raise ValueError(f"{cls.name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
    return {k: _coerce(k, v, params[k].annotation, cls.name) for k, v in given.items()}

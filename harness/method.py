"""The method contract: events, declarations, parameter parsing and the method registry.

The loop of `harness.engine` fires these events (pseudocode of one forward pass, batch size 1):

    feats = vision_tower(image)                      # VisionFeatures: patches (1, N, Dv), grid, CLS
    feats = method.on_vision(feats, ctx)             # pre-LLM: replace / merge / select patches
    tokens = projector(feats.patches)
    state = assemble(prompt, tokens)                 # TokenState: hidden, index, kind, patch
    state = method.on_sequence(state, ctx)           # hold tokens back before layer 0
    for i, layer in enumerate(llm.layers):
        state = method.before_layer(i, state, ctx)   # drop / re-insert tokens before layer i
        h = h + self_attn(input_layernorm(h))        # stock submodules, sdpa/flash, causal
        x = post_attention_layernorm(h)
        h = h + method.ffn(i, layer.mlp, x, state, ctx)   # default: layer.mlp(x) for every token
    e = text_hidden_fcs(norm(h)[token before [SEG]]) -> SAM mask decoder -> mask

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


class Method:
    """Base class of every reduction method and control.

    Class attributes a method declares:
        stage: one of `STAGES`.
        position_policy: "original" (kept tokens keep their RoPE positions) or "reindex" (0..n-1 after a drop).
        needs_llm_attention / needs_vision_attention: whether it recomputes attention rows.
        citation: short citation (title, venue, link).
        keep_all: hyperparameters under which the method keeps every token (None if it has no such setting);
            the shared test battery checks that this setting reproduces the unpruned model.
        exact_reference: True when the method only drops, holds back and re-inserts tokens of the assembled
            sequence and uses the stock FFN, so that a pruned run must equal a full-length run whose attention
            mask hides the missing keys (checked by the battery).
        deviations: where and why the implementation deviates from the official code ("" if it does not).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "in-llm"
    position_policy: ClassVar[str] = "original"
    needs_llm_attention: ClassVar[bool] = False
    needs_vision_attention: ClassVar[bool] = False
    citation: ClassVar[str] = ""
    keep_all: ClassVar[dict[str, Any] | None] = None
    exact_reference: ClassVar[bool] = True
    deviations: ClassVar[str] = ""

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

    # -- helpers ---------------------------------------------------------------------------------------------
    def overrides(self, event: str) -> bool:
        return getattr(type(self), event) is not getattr(Method, event)

    def params(self) -> dict[str, Any]:
        """The resolved hyperparameters, as passed to __init__."""
        return {p.name: getattr(self, p.name) for p in describe_params(type(self))}

    def spec(self) -> str:
        kv = ",".join(f"{k}={_format_value(v)}" for k, v in self.params().items())
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


def create_method(spec_or_name: str | Method | None = None, **kwargs: Any) -> Method:
    """Build a method from "name:key=value,..." and/or keyword arguments (keywords win).

    Unknown names and parameters raise ValueError listing the valid choices; values are coerced to the annotated
    types; range checks happen in the method's __init__.
    """
    if isinstance(spec_or_name, Method):
        if kwargs:
            raise ValueError("cannot pass keyword arguments with an already-built method")
        return spec_or_name
    name, spec_kwargs = parse_spec(spec_or_name or "none")
    cls = METHODS.get(name)
    params = {p.name: p for p in describe_params(cls)}
    given = {**spec_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
    unknown = sorted(set(given) - set(params))
    if unknown:
        valid = ", ".join(params) or "none"
        raise ValueError(f"{cls.name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
    resolved = {k: _coerce(k, v, params[k].annotation, cls.name) for k, v in given.items()}
    return cls(**resolved)

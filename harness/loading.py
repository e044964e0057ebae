"""Resolving a model name to a loaded model: registered names, `random:<arch>`, segprune folders, and released LISA
checkpoint folders (converted into the cache on first use). Above `harness.model` and `harness.convert`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from harness.archs import ARCHS
from harness.convert.common import converted
from harness.convert.lisa import convert_lisa, is_lisa_folder, lisa_clip
from harness.convert.llava import convert_llava, is_llava_folder
from harness.model import MODELS, TINY, SegModel, build_random, check_attention, check_device


def load_model(name_or_path: str | os.PathLike = "random:tiny", *, device: str | None = None,
               dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa") -> SegModel:
    """Load a model by name (`random:tiny`, `random:<arch>`), from a segprune model folder, or from a LISA checkpoint
    folder (converted into the cache on first use; see `harness.convert.lisa`)."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    device = check_device(device)
    check_attention(attn_implementation, device)
    name = str(name_or_path)
    if name.startswith("random:"):
        arch_name = name.split(":", 1)[1]
        arches = {"tiny": TINY, **ARCHS}
        if arch_name not in arches:
            raise ValueError(f"unknown model {name!r}; available: " + ", ".join(f"random:{a}" for a in arches)
                             + ", or a path to a segprune model folder")
        return build_random(arches[arch_name], name=name, device=device, dtype=dtype,
                            attn_implementation=attn_implementation)
    if name in MODELS:
        return MODELS.get(name)(device=device, dtype=dtype, attn_implementation=attn_implementation)
    path = Path(name)
    if path.is_dir():
        if is_lisa_folder(path):  # a released LISA checkpoint: converted once into the cache, with its CLIP
            try:
                clip = lisa_clip(path)
            except ValueError:
                clip = None  # gone since: an earlier conversion still serves (else convert_lisa says what is missing)
            path = converted(path, functools.partial(convert_lisa, clip=clip), inputs=None if clip is None else [clip])
        elif is_llava_folder(path):  # a transformers-layout LLaVA-1.5: a plain MLLM, converted once
            path = converted(path, convert_llava)
        return SegModel.from_pretrained(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    known = ["random:tiny", *(f"random:{a}" for a in ARCHS), *MODELS.names()]
    raise ValueError(f"unknown model {name!r}: not a registered name or a folder; available: {', '.join(known)}")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
    return DTYPES[name]

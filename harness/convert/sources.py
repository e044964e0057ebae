"""Reading released checkpoints safely, one shard at a time.

A checkpoint is a folder with one weights file (`pytorch_model.bin`, `model.safetensors`) or shards named by an
index (`pytorch_model.bin.index.json`, `model.safetensors.index.json`: `{"weight_map": {key: file}}`). Pickled
`.bin` files are read with `torch.load(weights_only=True)`, memory-mapped where the file allows it, so a 10 GB shard
costs page cache, not a private copy. Everything a folder can get wrong (a missing shard, an index naming tensors a
shard lacks, a pickle that needs more than tensors, a file that is not a checkpoint) is a one-line `ValueError`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from harness.files import read_json, refuse_lfs_pointer

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """The weight files of a folder and, when sharded, which keys each file must hold."""

    folder: Path
    files: list[Path]
    index: dict[str, str] | None  # key -> file name, from the index; None for a single file

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def keys(self) -> list[str] | None:
        """Every key, from the index alone (no shard opened); None for a single `.bin` (known only once loaded)."""
        if self.index is not None:
            return list(self.index)
        if self.files[0].suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(self.files[0], "pt") as f:
                return list(f.keys())
        return None


def find_checkpoint(folder: str | os.PathLike, what: str = "checkpoint", recover: str = "") -> Checkpoint:
    """The weight files of `folder`; safetensors preferred where a folder has both formats (as transformers does)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} folder not found: {folder}")
    for f in folder.iterdir():  # weights, tokenizer.model: a clone without git-lfs leaves pointers in their place
        if f.is_file():
            refuse_lfs_pointer(f)
    for name in INDEXES:
        path = folder / name
        if path.is_file():
            index = read_json(path, recover or "download it again").get("weight_map")
            if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
                raise ValueError(f"{path} is not a shard index (expected a weight_map of tensor name -> file); "
                                 f"{recover or 'download it again'}")
            files = [folder / f for f in dict.fromkeys(index.values())]
            for f in files:
                if not f.is_file():
                    raise ValueError(f"{f} is missing (named by {name}); {recover or f'download the whole {what}'}")
            return Checkpoint(folder, files, index)
    for name in SINGLES:
        if (folder / name).is_file():
            return Checkpoint(folder, [folder / name], None)
    raise ValueError(f"{folder} holds no weights (expected {', '.join(SINGLES)} or a shard index "
                     f"{' / '.join(INDEXES)})")


def load_file(path: Path, device: str = "cpu", recover: str = "download it again") -> dict[str, Tensor]:
    """All tensors of one weights file, on `device`; a `.bin` through the weights-only unpickler, memory-mapped.
    `recover` ends the error of a damaged file (how to get a good one)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path, device=device)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); {recover}") from None
    refuse_lfs_pointer(path)
    with open(path, "rb") as f:
        head = f.read(4)
    mmap = head == b"PK\x03\x04"  # torch.save's zip format maps; the legacy format (a pickle) must be read whole
    if not mmap and head[:1] != b"\x80":  # a pickle of protocol 2 or later begins with PROTO
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip nor a pickle); download it "
                         f"again")
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch names the first global it refused
        if not found and "Unsupported operand" in str(err) or found and not _importable(found.group(1)):
            # bytes that are no pickle opcode, or a "global" no module has: damage, not code
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt pickle); {recover}") from None
        what = f"it references {found.group(1)}" if found else "the weights-only unpickler refused it"
        raise ValueError(f"{path} needs more than tensors to unpickle ({what}); segprune reads only plain "
                         f"tensor checkpoints, never arbitrary pickled code") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file fails inside torch.load in many ways; all mean the same
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); "
                         f"{recover}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # some training scripts wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def _importable(name: str) -> bool:
    """False for a dotted global whose module is loaded but has no such attribute: a damaged name
    (torch.FloatStGrage), not code from another package."""
    import sys

    module, _, attr = name.rpartition(".")
    return module not in sys.modules or hasattr(sys.modules[module], attr)


def iter_shards(ckpt: Checkpoint) -> Iterator[tuple[Path, dict[str, Tensor]]]:
    """(file, its tensors) for every file in turn; a shard must hold exactly the keys its index gives it."""
    for path in ckpt.files:
        state = load_file(path)
        if ckpt.index is not None and path.name in ckpt.index.values():
            named = {k for k, f in ckpt.index.items() if f == path.name}
            absent, extra = sorted(named - state.keys()), sorted(state.keys() - named)
            if absent:
                raise ValueError(f"the index names {len(absent)} tensor(s) that {path.name} lacks (e.g. "
                                 f"{absent[0]}); the shard is truncated or the index is stale: download both again")
            if extra:
                raise ValueError(f"{path.name} holds {len(extra)} tensor(s) its index does not name (e.g. "
                                 f"{extra[0]}); the index is stale: download both again")
        yield path, state
        del state  # before the next file is read: one shard in memory at a time (the caller drops its own)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

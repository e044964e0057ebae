"""What every converter shares: the output writer, the strict check against the model, the manifest."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from harness.convert.sources import Checkpoint, iter_shards, sha256
from harness.files import usual_mode

if TYPE_CHECKING:
    from tqdm import tqdm

MAX_FILE_BYTES = 2 * 1024**3  # output safetensors files are cut at this size
# Bumped whenever a converter's output changes, so that folders converted on first use are made again.
# 2: the LLaVA tokenizer rebuilt from tokenizer.model under 4.31's rules.
CONVERTER_VERSION = 2


class Writer:
    """Tensors into safetensors files of at most `MAX_FILE_BYTES`, named model-0000k-of-0000n at the end."""

    def __init__(self, folder: Path, dtype: torch.dtype | None):
        self.folder, self.dtype = folder, dtype
        self.pending: dict[str, Tensor] = {}
        self.parts: list[Path] = []
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, int] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self.shapes:
            raise ValueError(f"two source tensors map to {name}; the checkpoint holds duplicates")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        if self.pending and sum(t.nbytes for t in self.pending.values()) + tensor.nbytes > MAX_FILE_BYTES:
            self.flush()  # files stay under the cap (unless one tensor alone is larger)
        self.pending[name] = tensor.contiguous()
        self.shapes[name] = tuple(tensor.shape)
        key = str(tensor.dtype).removeprefix("torch.")
        self.dtypes[key] = self.dtypes.get(key, 0) + 1

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            part = self.folder / f"part-{len(self.parts) + 1}.safetensors"
            save_file(self.pending, part, metadata={"format": "pt"})
            os.chmod(part, usual_mode(0o666))  # safetensors creates 0600: a model folder shared by a group must read
            self.parts.append(part)
            self.weight_map.update(dict.fromkeys(self.pending, part.name))
            self.pending = {}

    def finish(self) -> None:
        self.flush()
        n = len(self.parts)
        names = {p.name: f"model-{i:05d}-of-{n:05d}.safetensors" for i, p in enumerate(self.parts, 1)}
        for p in self.parts:
            p.rename(self.folder / names[p.name])
        index = {"metadata": {"total_size": sum((self.folder / f).stat().st_size for f in names.values())},
                 "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_weights(ckpt: Checkpoint, rename: Callable[[str], str | None], writer: Writer, progress: tqdm | None,
                 what: Path, family: str = "LISA") -> None:
    """Every tensor of `ckpt`, renamed, into `writer`, one file at a time; `progress` (a bar) counts their bytes."""
    unknown: list[str] = []
    if progress is not None:
        progress.total = (progress.total or 0) + ckpt.nbytes
        progress.refresh()
    for path, state in iter_shards(ckpt):
        done = 0
        for key, tensor in state.items():
            try:
                name = rename(key)
            except KeyError:
                unknown.append(key)
                continue
            if name is not None:
                writer.add(name, tensor)
            if progress is not None:
                progress.update(tensor.nbytes)
                done += tensor.nbytes
        if progress is not None:
            progress.update(max(0, path.stat().st_size - done))  # the file's own overhead: the bar ends at its size
        writer.flush()
        del state
    if unknown:
        raise ValueError(f"{len(unknown)} tensor(s) of {what} are not part of a {family} model (e.g. {unknown[0]}); "
                         f"is this a {family} checkpoint?")


def check_against_model(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], src: Path,
                        family: str = "LISA") -> None:
    """Strict: the converted tensors are exactly the model's, with its shapes."""
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing:
        raise ValueError(f"{src} lacks {len(missing)} tensor(s) a {family} model needs (e.g. {missing[0]}); the "
                         f"checkpoint is incomplete")
    if unexpected:
        raise ValueError(f"{src} has {len(unexpected)} tensor(s) the model has no place for (e.g. {unexpected[0]})")
    bad = [k for k in want if got[k] != want[k]]
    if bad:
        raise ValueError(f"{src}: {bad[0]} has shape {list(got[bad[0]])} but config.json implies {list(want[bad[0]])} "
                         f"({len(bad)} such tensors); config and weights do not belong together")


def manifest(fmt: str, ckpt: Checkpoint, extra_files: list[Path], writer: Writer, projector: str) -> dict:
    from importlib.metadata import version

    from harness import __version__

    def describe(files: list[Path]) -> dict:
        return {str(f): {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files}

    return {"format": fmt, "source": str(ckpt.folder.resolve()), "source_files": describe(ckpt.files),
            "other_files": describe(extra_files), "projector": projector, "tensors": len(writer.shapes),
            "dtypes": writer.dtypes, "segprune": __version__, "converter": CONVERTER_VERSION,
            "transformers": version("transformers"), "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


@contextlib.contextmanager
def staged(dst: Path) -> Iterator[Path]:
    """A staging folder next to `dst`, renamed to `dst` when the block succeeds and removed when it fails, so `dst`
    appears whole or not at all; one converter per destination (a second one is refused, not queued)."""
    from harness.files import Busy, exclusive, fsync_path, sync_folder

    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.parent / f".{dst.name}.partial"
    try:
        with exclusive(dst.parent / f".{dst.name}.lock", wait=False):
            if dst.exists():  # checked under the lock: a converter that just finished has renamed its stage
                raise ValueError(f"{dst} exists; remove it or choose another destination")
            shutil.rmtree(stage, ignore_errors=True)  # left by a killed conversion
            stage.mkdir()
            try:
                yield stage
                sync_folder(stage)  # the data is on disk before the rename makes the folder visible
                os.replace(stage, dst)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            fsync_path(dst.parent)  # dst is complete: a failure here must not look like a lost conversion
    except Busy as busy:
        raise ValueError(f"another process (pid {busy.holder}) is converting into {dst}; wait for it") from None


def write_folder(stage: Path, writer: Writer, config, tokenizer, manifest_: dict, source_config: Path) -> None:
    """The rest of a segprune model folder, once the weights are written and checked."""
    writer.finish()
    (stage / "segprune.json").write_text(config.to_json())
    tokenizer.save_pretrained(stage)
    shutil.copyfile(source_config, stage / "source_config.json")
    (stage / "convert.json").write_text(json.dumps(manifest_, indent=2))


def progress_bar(desc: str, enabled: bool = True) -> tqdm:
    """A byte-counting bar on stderr (off when stderr is no terminal); `read_weights` sets its total."""
    import sys

    from tqdm import tqdm

    return tqdm(total=0, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=None if enabled else True,
                leave=False)


def converted(src: str | os.PathLike, convert: Callable[..., Path], *, inputs: list[Path] | None = (),
              progress: bool = True) -> Path:
    """The segprune folder of the checkpoint folder `src` in the cache ($SEGPRUNE_CACHE/converted), made by
    `convert(src, dst, progress=bar)` on first use (one process converts, others wait for it).

    Keyed by the converter version and the names, sizes and times of the files of `src`, then of the other `inputs`
    folders (LISA's CLIP). `inputs=None` means they cannot be found now: a folder converted from this source before
    is used (the newest), and only if there is none is the error of finding them raised, by `convert`.
    """
    import hashlib

    from harness.datasets.shapes import cache_dir
    from harness.files import exclusive

    def stamp(folder: Path) -> str:
        files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]
        return hashlib.sha256(json.dumps([str(folder), files]).encode()).hexdigest()[:12]

    src = Path(src).resolve()
    root = cache_dir() / "converted"
    base = f"{src.name}-{hashlib.sha256(f'{CONVERTER_VERSION}:{stamp(src)}'.encode()).hexdigest()[:12]}"
    if inputs is None:
        done = sorted(root.glob(f"{base}*/segprune.json"), key=lambda f: f.stat().st_mtime)
        if done:
            return done[-1].parent
        inputs = []
    dst = root / "-".join([base, *(stamp(Path(i).resolve()) for i in inputs)])
    if (dst / "segprune.json").is_file():
        return dst
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{dst.name}.first-use.lock", wait=True):  # later callers wait, then load
        if not (dst / "segprune.json").is_file():
            with progress_bar(f"converting {src.name} (once)", progress) as bar:
                convert(src, dst, progress=bar)
    return dst

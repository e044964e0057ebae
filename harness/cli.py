"""`segprune` command line: one verb per job. User errors are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from harness.launch import LAUNCHERS
from harness.model import ATTENTION
from harness.shards import ENCODER_BATCH

DEFAULT_MODEL = "lisa-tiny-shapes"  # bundled (issue 3); random:tiny stays available for tests
DEFAULT_DATASET = "shapes-ref:val"
DTYPES = ("fp32", "bf16", "fp16")


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another --out; finished samples are saved",
    errno.EDQUOT: "the disk quota is used up: free space or choose another --out; finished samples are saved",
    errno.EFBIG: "past the file-size limit (ulimit -f) or what the file system allows; finished samples are saved",
    errno.EROFS: "the file system is read-only: choose a writable --out or cache ($SEGPRUNE_CACHE)",
    errno.EACCES: "no permission: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write to, or fix its permissions",
}


def os_error_line(err: OSError) -> str:
    """One line for an OSError: what failed, on which file, and what to do."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    what = err.strerror or str(err)
    hint = _OS_HINTS.get(err.errno or -1)
    return f"{what}{f': {where}' if where else ''}{f' ({hint})' if hint else ''}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): unwound like Ctrl-C, so summaries are written on the way out."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one readable line (exit 2), and Ctrl-C or SIGTERM into a resumable stop (exit 130 or
    143, after the summaries are written)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (an embedding application): leave its signals alone
            pass
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except OSError as err:  # a read-only folder, a full disk, a failed rename: what the machine did to us
            click.echo(f"error: {os_error_line(err)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as stop:
            what = "terminated" if isinstance(stop, Terminated) else "interrupted"
            click.echo(f"\n{what}: finished samples are saved; rerun the same command to resume", err=True)
            sys.exit(143 if isinstance(stop, Terminated) else 130)

    return wrapper


def third_parties_offline_and_quiet(command: str | None) -> None:
    """Switch the Hugging Face Hub and ultralytics off the network, and ultralytics out of the user's terminal and
    home, for this process only; no settings file of the user's is edited.

    segprune never needs the Hub, so it is offline unconditionally: `huggingface_hub.constants.HF_HUB_OFFLINE`,
    which every Hub request checks when it is made (the environment variable was read when transformers imported
    it), plus the variables for anything imported later. ultralytics through its environment switches (a user's
    own setting wins): `YOLO_OFFLINE` stops its DNS probes and analytics; `YOLO_CONFIG_DIR` keeps the settings file
    it creates on first import (and announces on stdout) in segprune's cache instead of ~/.config, one per
    ultralytics version (a version that finds another's file resets it, with a warning); `YOLO_VERBOSE=False` keeps
    its INFO lines out of every command but `train`, whose progress they are. ultralytics is only imported lazily,
    after this runs.
    """
    from importlib.metadata import version

    import huggingface_hub.constants

    from harness.datasets.shapes import cache_dir

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    os.environ.setdefault("YOLO_OFFLINE", "True")
    if "YOLO_CONFIG_DIR" not in os.environ:
        config = cache_dir() / f"ultralytics-{version('ultralytics')}"
        with contextlib.suppress(OSError):  # made here: some releases (8.4.0) only use a folder whose parent exists
            config.mkdir(parents=True, exist_ok=True)  # (unwritable: ultralytics falls back to a temp folder)
        os.environ["YOLO_CONFIG_DIR"] = str(config)
    if command != "train":
        os.environ.setdefault("YOLO_VERBOSE", "False")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segprune")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Benchmark training-free visual-token reduction on LISA-style segmentation MLLMs."""
    third_parties_offline_and_quiet(ctx.invoked_subcommand)


def _progress(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label[:48], unit="sample", leave=False, file=sys.stderr,
                disable=None)  # disable=None: off when stderr is not a terminal (CI logs)


def _run_and_report(cells: list, out: Path, device: str | None, fmt: str) -> None:
    from harness.report import format_table
    from harness.runner import run_grid

    rows = run_grid(cells, out, device=device, progress_factory=_progress)
    click.echo(format_table(rows, fmt))
    click.echo(f"\nrun folder: {out}")


@main.command()
@click.option("--model", "models", multiple=True, default=[DEFAULT_MODEL], show_default=True,
              help="model name (lisa-tiny-shapes, random:tiny, random:<arch>), a segprune model folder, or a LISA "
                   "checkpoint folder (converted once into the cache); repeatable")
@click.option("--method", "methods", multiple=True,
              help="method spec name:key=value,...; repeatable (default: every registered method)")
@click.option("--dataset", "datasets", multiple=True, default=[DEFAULT_DATASET], show_default=True,
              help="dataset:split; repeatable")
@click.option("--limit", type=int, default=None, help="first N samples of each split")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="run folder (default: runs/default); rerunning with the same folder resumes")
@click.option("--data-root", envvar="SEGPRUNE_DATA", default=None, help="root of the datasets [env SEGPRUNE_DATA]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cpu)")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@click.option("--attn", type=click.Choice(ATTENTION), default="sdpa", show_default=True)
@click.option("--decode", type=click.Choice(["template", "generate"]), default="template", show_default=True,
              help="template: LISA's evaluation (answer teacher-forced); generate: greedy decoding with a KV cache")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown"]), default="text", show_default=True)
@friendly
def run(models, methods, datasets, limit, out, data_root, device, dtype, attn, decode, fmt) -> None:
    """Run methods x datasets on a model and print the table (defaults: shapes-ref val, every method)."""
    from harness.runner import default_methods, default_run_dir, expand_grid

    cells = expand_grid(models, methods or default_methods(), datasets, limit=limit, dtype=dtype, attn=attn,
                        decode=decode, data_root=data_root)
    _run_and_report(cells, out or default_run_dir(), device, fmt)


GRID_CHOICES = {"dtype": DTYPES, "attn": ATTENTION}  # decode is checked by expand_grid
_GRID_EXAMPLES = {"models": DEFAULT_MODEL, "methods": "none, fastv@75%", "datasets": DEFAULT_DATASET}


def _grid_spec(config: Path, spec: Any) -> dict[str, Any]:
    """A grid file's mapping with every value checked against its type: one line naming the key otherwise."""
    if not isinstance(spec, dict):
        raise ValueError(f"{config}: a grid is a mapping of keys (models, methods, datasets, ...), "
                         f"not a {type(spec).__name__}")
    known = {"models", "model", "methods", "datasets", "limit", "decode", *GRID_CHOICES}
    unknown = sorted(set(map(str, spec)) - known)
    if unknown:
        raise ValueError(f"{config}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    out = dict(spec)
    for key in ("models", "methods", "datasets"):
        if key not in spec:
            continue
        value = [spec[key]] if isinstance(spec[key], str) else spec[key]  # `methods: none` is the list [none]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{config}: '{key}' must be a list of names, e.g. {key}: [{_GRID_EXAMPLES[key]}]")
        out[key] = value
    if not out.get("methods") or not out.get("datasets"):
        raise ValueError(f"{config}: a grid needs 'methods' and 'datasets' lists, e.g. methods: [none, fastv@75%]")
    if "model" in spec and not isinstance(spec["model"], str):
        raise ValueError(f"{config}: 'model' must be one model name or folder")
    limit = spec.get("limit")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValueError(f"{config}: 'limit' must be a whole number of samples, at least 1 (got {limit!r})")
    for key, choices in GRID_CHOICES.items():
        if key in spec and spec[key] not in choices:
            raise ValueError(f"{config}: '{key}' must be one of {', '.join(choices)} (got {spec[key]!r})")
    if "decode" in spec and not isinstance(spec["decode"], str):
        raise ValueError(f"{config}: 'decode' must be template or generate (got {spec['decode']!r})")
    return out


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="run folder (default: runs/<config name>)")
@click.option("--data-root", envvar="SEGPRUNE_DATA", default=None)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cpu)")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown"]), default="text", show_default=True)
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="none", show_default=True,
              help="none: this process; local: --workers shard processes on this machine; slurm: a job array of "
                   "--shards tasks (returns at once; see `segprune status`)")
@click.option("--shards", type=int, default=None, help="slurm: shards, one array task each (default 1); with --shard: "
                                                       "how many the grid is cut into")
@click.option("--shard", type=int, default=None, help="run only shard K (0-based) of --shards in this process")
@click.option("--workers", type=int, default=None, help="local: shard processes (on CUDA one per visible GPU)")
@click.option("--partition", default=None, help="slurm: partition (default: the cluster's default)")
@click.option("--gpus-per-task", type=int, default=None, help="slurm: GPUs per shard (default: 1 on CUDA, else 0)")
@click.option("--cpus-per-task", type=int, default=None, help="slurm: CPU cores per shard")
@click.option("--mem-gb", type=float, default=None, help="slurm: memory per shard in GB")
@click.option("--time", "time_min", type=int, default=1440, show_default=True, help="slurm: minutes per shard")
@click.option("--encoder-batch", type=int, default=ENCODER_BATCH, show_default=True,
              help="images per CLIP / SAM encoder batch (each image is encoded once for all its queries)")
@click.option("--no-reuse", is_flag=True, help="encode the image again for every query (throughput comparisons)")
@friendly
def grid(config, out, data_root, device, fmt, launcher, shards, shard, workers, partition, gpus_per_task,
         cpus_per_task, mem_gb, time_min, encoder_batch, no_reuse) -> None:
    """Run a YAML grid: models, methods, datasets (name:split), limit, dtype, attn, decode."""
    import yaml

    from harness.runner import expand_grid

    try:
        spec = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config}: not valid YAML ({' '.join(str(err).split())})") from None
    spec = _grid_spec(config, spec)
    cells = expand_grid(spec.get("models") or [spec.get("model", DEFAULT_MODEL)], spec["methods"], spec["datasets"],
                        limit=spec.get("limit"), dtype=spec.get("dtype", "fp32"), attn=spec.get("attn", "sdpa"),
                        decode=spec.get("decode", "template"), data_root=data_root)
    out = out or Path("runs") / config.stem
    _check_launch_options(launcher, shards, shard, workers, partition, gpus_per_task, cpus_per_task, mem_gb,
                          time_min, encoder_batch)
    from harness.launch import launch_file, launch_local, launch_slurm, local_threads, read_launch, record_resolved
    from harness.report import format_table
    from harness.runner import run_grid, write_summary

    if launcher == "none":
        from harness.shards import Shard

        part, path = None, None
        if shard is not None:  # a launch file, so that `status` knows the plan this shard belongs to
            part = Shard(shard, shards)
            path = launch_file(out, cells, shards, encoder_batch, device, reuse=not no_reuse)
        rows = run_grid(cells, out, device=device, shard=part, encoder_batch=encoder_batch, reuse=not no_reuse,
                        progress_factory=_progress, on_prepared=(lambda ready: record_resolved(path, ready))
                        if path else None)
        click.echo(format_table(rows, fmt))
        click.echo(f"\nrun folder: {out}" + (f" ({part}; `segprune status {out}` shows the others)" if part else ""))
        return
    if launcher == "local":
        from harness.analysis import analyze_run

        path = launch_file(out, cells, workers, encoder_batch, device, reuse=not no_reuse,
                           threads=local_threads(workers, device))
        bar = _progress(0, f"{workers} local workers")

        def show(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        try:
            launch_local(path, workers, on_progress=show)
        finally:
            bar.close()
        ids = read_launch(path).get("resolved") or []
        by_id = {r["cell"]: r for r in write_summary(out)}
        analyze_run(out)
        click.echo(format_table([by_id[i] for i in ids if i in by_id], fmt))
        click.echo(f"\nrun folder: {out}")
        return
    cuda = bool(device and device.startswith("cuda"))
    if cuda and device != "cuda":
        raise ValueError(f"--launcher slurm gives each task its own GPU(s): use --device cuda, not {device}")
    if cuda and gpus_per_task == 0:
        raise ValueError("--device cuda with --gpus-per-task 0: a task would have no GPU; leave out --gpus-per-task")
    path = launch_file(out, cells, shards or 1, encoder_batch, device, reuse=not no_reuse)
    result = launch_slurm(path, partition=partition, gpus_per_task=gpus_per_task if gpus_per_task is not None
                          else int(cuda), cpus_per_task=cpus_per_task, mem_gb=mem_gb, time_min=time_min)
    sub = result["submitted"]
    if sub:
        ids = sorted({j["job_id"].split("_")[0] for j in sub.values()})
        click.echo(f"submitted shard(s) {', '.join(map(str, sorted(sub)))} of {shards or 1} as Slurm job "
                   f"{', '.join(ids)}; logs in {out / 'logs'}")
    if result["waiting"]:
        click.echo(f"shard(s) {', '.join(map(str, result['waiting']))} already queued or running: not resubmitted")
    if not sub and not result["waiting"]:
        click.echo(f"every shard is finished; `segprune table {out}` shows the results")
    else:
        click.echo(f"`segprune status {out}` shows their progress")


def _check_launch_options(launcher: str, shards: int | None, shard: int | None, workers: int | None,
                          partition: str | None, gpus_per_task: int | None, cpus_per_task: int | None,
                          mem_gb: float | None, time_min: int, encoder_batch: int) -> None:
    """Options that belong to another launcher, or out of range: one line each, before anything runs."""
    slurm_only = {"--partition": partition, "--gpus-per-task": gpus_per_task, "--cpus-per-task": cpus_per_task,
                  "--mem-gb": mem_gb}
    if launcher != "slurm":
        given = [name for name, v in slurm_only.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]} is an option of --launcher slurm")
    if launcher != "local" and workers is not None:
        raise ValueError("--workers is an option of --launcher local (Slurm: --shards)")
    if launcher == "local" and (workers is None or workers < 1):
        raise ValueError("--launcher local needs --workers N (N >= 1 shard processes)")
    if launcher == "local" and shards is not None:
        raise ValueError("--launcher local cuts the grid into --workers shards; leave out --shards")
    if shard is not None and launcher != "none":
        raise ValueError(f"--shard runs one shard in this process; it does not go with --launcher {launcher}")
    if shard is not None and shards is None:
        raise ValueError("--shard K needs --shards N (how many shards the grid is cut into)")
    if shards is not None and shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    if launcher == "none" and shards is not None and shard is None:
        raise ValueError("--shards without a launcher: add --launcher slurm, or --shard K to run one shard here")
    if time_min < 1:
        raise ValueError(f"--time is in minutes and must be at least 1, got {time_min}")
    if encoder_batch < 1:
        raise ValueError(f"--encoder-batch must be at least 1 image, got {encoder_batch}")
    for name, v in (("--gpus-per-task", gpus_per_task), ("--cpus-per-task", cpus_per_task), ("--mem-gb", mem_gb)):
        if v is not None and v < (0 if name == "--gpus-per-task" else 1e-9):
            raise ValueError(f"{name} must be positive, got {v}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@friendly
def status(run_dir: Path) -> None:
    """Progress of a run folder: per launch, each shard's finished samples, state, and log."""
    from harness.launch import launches, read_launch, shard_states
    from harness.runner import load_run, write_summary

    if (run_dir / "config.json").is_file() or not launches(run_dir):
        rows = load_run(run_dir)  # also says when the folder is not a run
        click.echo(f"{run_dir}: {len(rows)} cell(s), {sum(r['n'] for r in rows)} finished sample(s), "
                   f"{sum(r['complete'] for r in rows)} cell(s) complete")
    else:
        click.echo(f"{run_dir}: no shard has started yet")
    for path in launches(run_dir):
        states = shard_states(path)
        spec = read_launch(path)
        if all(s["state"] == "finished" for s in states) and (run_dir / "config.json").is_file():
            from harness.analysis import analyze_run

            write_summary(run_dir)  # shards leave the summary to this: one pass once they are all done
            analyze_run(run_dir)
        kind = next((j["launcher"] for j in spec.get("jobs", {}).values()), "not launched")
        click.echo(f"\nlaunch {spec['id']} ({kind}, {spec['shards']} shard(s), {len(spec['cells'])} cell(s))")
        click.echo(f"{'shard':>5}  {'done':>12}  {'job':<12}  state / log")
        for s in states:
            line = f"{s['shard']:>5}  {s['done']:>5} / {s['total']:<5}  {s['job'] or '-':<12}  {s['state']}"
            if s["state"] not in ("finished", "not submitted") and s["log"]:
                line += f"  (log: {s['log']})"
            click.echo(line)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["markdown", "text", "latex", "csv"]), default="markdown",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write to a file")
@click.option("--per-cell", is_flag=True, help="one line per cell (method x split) instead of the paper layout")
@friendly
def table(run_dir, fmt, out, per_cell) -> None:
    """Paper-style table of a run: methods grouped by stage, gIoU/cIoU per split, the drop vs the unpruned model with
    a paired bootstrap 95% interval, N_avg, TFLOPs, LLM latency. Missing or incomplete cells are marked."""
    from harness.report import format_table, paper_frame, render_paper_table
    from harness.runner import load_run

    if not run_dir.exists():
        raise ValueError(f"run folder {run_dir} does not exist; make one with `segprune run --out {run_dir}`")
    if per_cell:
        if fmt not in ("text", "markdown"):
            raise ValueError("--per-cell prints text or markdown; drop --per-cell for latex or csv")
        text = format_table(load_run(run_dir), fmt)
    else:
        text = render_paper_table(*paper_frame(run_dir), fmt)
    if out is None:
        click.echo(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        click.echo(f"table written to {out}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("specs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["markdown", "text"]), default="markdown", show_default=True)
@friendly
def compare(run_dir, specs, fmt) -> None:
    """Paired comparisons of methods in one run: `segprune compare RUN A B [A2 B2 ...]` gives, for each pair, mean
    gIoU of A and B over the splits both ran and A - B with a paired bootstrap 95% interval (images resampled
    together for both), e.g. `segprune compare runs/x dart@50% fastv@50% fastv@50% fastv:positions=reindex@50%`."""
    from harness.report import compare_frame

    if len(specs) % 2:
        raise ValueError(f"compare takes pairs of methods (A B A2 B2 ...); got {len(specs)}: {' '.join(specs)}")
    if not run_dir.exists():
        raise ValueError(f"run folder {run_dir} does not exist; make one with `segprune grid` or `segprune run`")
    frame = compare_frame(run_dir, list(zip(specs[0::2], specs[1::2], strict=True)))
    for col in ("gIoU A", "gIoU B", "A - B", "lo", "hi"):
        frame[col] = (100 * frame[col]).round(1)
    frame["A - B [95% CI]"] = [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in zip(frame["A - B"], frame["lo"],
                                                                                        frame["hi"], strict=True)]
    shown = frame[["model", "decode", "A", "B", "splits", "n", "gIoU A", "gIoU B", "A - B [95% CI]"]]
    click.echo(shown.to_markdown(index=False) if fmt == "markdown" else shown.to_string(index=False))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", default=None, help="output path without extension (default: RUN/plots/tradeoff)")
@click.option("--metric", default="mean gIoU", show_default=True,
              help="accuracy column: 'mean gIoU' or '<dataset>:<split> gIoU' / 'cIoU'")
@friendly
def plot(run_dir, out, metric) -> None:
    """Accuracy vs TFLOPs, LLM latency and N_avg: one line per method across budgets, the unpruned model marked,
    the Pareto front highlighted (PNG and PDF)."""
    from harness.report import plot_run

    if not run_dir.exists():
        raise ValueError(f"run folder {run_dir} does not exist; make one with `segprune run --out {run_dir}`")
    for path in plot_run(run_dir, out, metric):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--method", "methods", multiple=True, help="a method of the run (its table label or spec); repeatable")
@click.option("--sample", "samples", multiple=True, help="a sample id; repeatable (default: the first --limit)")
@click.option("--split", default=None, help="dataset:split to draw (default: the run's first)")
@click.option("--limit", type=int, default=4, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the PNGs (default: RUN/viz)")
@friendly
def viz(run_dir, methods, samples, split, limit, out) -> None:
    """Per sample: the ground truth, each method's mask and the image tokens it kept at each stage (one PNG)."""
    from harness.viz import visualize

    if not run_dir.exists():
        raise ValueError(f"run folder {run_dir} does not exist; make one with `segprune run --out {run_dir}`")
    for path in visualize(run_dir, methods=list(methods), samples=list(samples), split=split, limit=limit, out=out):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("source")
@click.option("--dataset", default=None, help=f"dataset:split (default: the run's first, else {DEFAULT_DATASET})")
@click.option("--method", "methods", multiple=True, help="method spec; repeatable (default: the run's methods, else "
                                                          "none)")
@click.option("--limit", type=int, default=16, show_default=True, help="first N samples")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for token_analysis.csv and .png (default: RUN/token_analysis, else runs/token_analysis)")
@click.option("--data-root", envvar="SEGPRUNE_DATA", default=None, help="root of the datasets [env SEGPRUNE_DATA]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cpu)")
@friendly
def analyze(source, dataset, methods, limit, out, data_root, device) -> None:
    """Token Routing's analyses per LLM layer (eq. 1-3) for a run folder's model or a model (SOURCE): attention to
    image tokens, from LISA's mask token, and token entropy by kind, with and without methods."""
    import harness
    from harness.files import read_json, write_atomic
    from harness.runner import CONFIG_RECOVER
    from harness.token_analysis import analyze_tokens, plot_tokens

    path = Path(source)
    cells = read_json(path / "config.json", CONFIG_RECOVER).get("cells") if (path / "config.json").is_file() \
        and not (path / "segprune.json").is_file() else None
    if cells is not None and not isinstance(cells, list) or cells == []:
        raise ValueError(f"{path}/config.json lists no cells: not a run folder (run `segprune run --out {path}`)")
    if cells:
        model_name = cells[0]["model"]
        dataset = dataset or f"{cells[0]['dataset']}:{cells[0]['split']}"
        data_root = data_root or cells[0].get("data_root")
        methods = methods or tuple(dict.fromkeys(c["method"] for c in cells))
        out = out or path / "token_analysis"
    else:
        model_name = source
        out = out or Path("runs") / "token_analysis"
    name, _, split = (dataset or DEFAULT_DATASET).partition(":")
    model = harness.load_model(model_name, device=device)
    samples = harness.load_dataset(name, split or "val", root=data_root, limit=limit)
    frame = analyze_tokens(model, samples, list(methods or ["none"]))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "token_analysis.csv", frame.to_csv(index=False))
    plot_tokens(frame, out / "token_analysis.png")
    for m in dict.fromkeys(frame["method"]):
        sub = frame[(frame["method"] == m) & (frame["metric"] != "entropy")]
        cols = {k: " ".join(f"{v:.2f}" for v in sub[sub["metric"] == k]["value"]) for k in ("img_attn", "mask2img")}
        click.echo(f"{m}: attention to image per layer {cols['img_attn']}; from the mask token {cols['mask2img']}")
    click.echo(f"wrote {out / 'token_analysis.csv'} and {out / 'token_analysis.png'} ({len(samples)} samples)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def methods(as_json) -> None:
    """Every registered method with its stage, parameters, defaults and citation.

    Every method that removes or merges tokens also takes `positions=original|reindex` (e.g. `fastv:positions=reindex`,
    `visionzip:positions=original@75%`): the RoPE position ids after the drop, overriding the official policy shown
    here; "original" keeps each token's position in the unpruned sequence (GAP), "reindex" numbers the current
    sequence 0..n-1."""
    from harness.method import METHODS, budget_rule, describe_params

    entries = []
    for name, cls in sorted(METHODS.items()):
        params = [{"name": p.name, "type": p.type_name, "default": p.default, "help": p.help}
                  for p in describe_params(cls)]
        entries.append({"name": name, "stage": cls.stage, "position_policy": cls.position_policy,
                        "positions_override": cls.reduces_tokens,
                        "citation": cls.citation, "deviations": cls.deviations, "budget": budget_rule(cls),
                        "params": params})
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
        return
    for e in entries:
        override = " (positions=original|reindex overrides)" if e["positions_override"] else ""
        click.echo(f"{e['name']}  [{e['stage']}, positions: {e['position_policy']}{override}]  {e['citation']}")
        for p in e["params"]:
            click.echo(f"    {p['name']}: {p['type']} = {p['default']!r}  {p['help']}")
        if e["deviations"]:
            click.echo(f"    deviations: {e['deviations']}")
        click.echo(f"    budget (name@75% or name@navg=64): {e['budget'] or 'no mapping; give parameters'}")


@main.command()
@click.argument("arch", required=False)
@click.option("--model", default=None, help="use a loadable model's architecture instead of a named one")
@click.option("--text-tokens", type=int, default=None,
              help="non-image tokens (system prompt, query, answer); default: the paper's own count where the "
                   "architecture has one (psalm-phi-1.5: 194, 100 of them mask queries), else 62 (it reproduces "
                   "LVLM_CSP Table 6), the LISA prompt's length for --model")
@click.option("--method", default=None, help="a method whose work per layer does not depend on the input")
@click.option("--schedule", default=None, help="image tokens per LLM layer, e.g. '256x2,128x30'")
@click.option("--image-tokens", type=int, default=None, help="image tokens in every layer (e.g. PSALM: 256)")
@friendly
def flops(arch, model, text_tokens, method, schedule, image_tokens) -> None:
    """Analytic FLOPs of a named architecture (no weights needed), per component and convention."""
    from tabulate import tabulate

    from harness.archs import ARCHS
    from harness.flops import COMPONENTS, CONVENTIONS, Arch, compute_flops, schedule_ledger
    from harness.method import ModelInfo, create_method

    answer = 3  # LISA's answer "[SEG].</s>"
    if model:
        from harness.loading import load_model

        loaded = load_model(model)
        a = Arch.from_model(loaded)
        pre, post = loaded.prompt_ids("the object")
        answer = len(post) - post.index(loaded.seg_token_id)
        if text_tokens is None:
            text_tokens = len(pre) + len(post)
    elif arch:
        a = Arch.named(arch)
    else:
        raise ValueError(f"name an architecture ({', '.join(ARCHS)}) or pass --model")
    paper = a.tokens or {}
    answer = paper.get("answer", answer)
    text_tokens = paper.get("text", 62) if text_tokens is None else text_tokens
    if image_tokens is None:
        image_tokens = a.n_image_tokens if a.vision is not None else paper.get("image", 0)
    n_layers = a.llm["num_hidden_layers"]
    records = None
    sched = [image_tokens] * n_layers
    if schedule:
        sched = _parse_schedule(schedule)
    elif method:
        d, h, kv, hd, inter, _ = a.llm_dims
        info = ModelInfo(n_layers=n_layers, n_image_tokens=image_tokens, grid=(int(image_tokens**0.5),) * 2,
                         hidden_size=d, n_heads=h, n_kv_heads=kv, head_dim=hd, intermediate_size=inter,
                         vision_layers=a.vision_layers_run,
                         vision_hidden_size=(a.vision or {}).get("hidden_size", 0), weights=bool(model))
        m = create_method(method, info=info)  # "fastv@75%" resolves against this architecture
        m.bind(info)
        click.echo(f"method: {m.spec()}")
        records = m.layer_records(info, text_tokens, answer)
        if records is None and hasattr(m, "nominal_schedule"):
            sched = m.nominal_schedule(info)
            click.echo("note: the nominal schedule (eq. 9, as LVLM_CSP's Table 6 prints it); the realised count "
                       "depends on each image: run it on a model for measured FLOPs")
        elif records is None:
            raise ValueError(f"{m.name} chooses its token count per input; run it on a model to get its FLOPs")
    ledger = schedule_ledger(a, text_tokens, sched, vision_tokens=a.n_image_tokens if a.vision else None,
                             records=records)
    rows = []
    for conv in CONVENTIONS:
        f = compute_flops(a, ledger, conv)
        rows.append([conv] + [f"{f[c] / 1e9:,.2f}" for c in (*COMPONENTS, "total")])
    click.echo(f"{a.name}: {n_layers} LLM layers, {text_tokens} text tokens ({answer} of them the answer), "
               f"N_avg {ledger.n_avg:.1f} image tokens per layer (GFLOPs)")
    click.echo(tabulate(rows, headers=["convention", *COMPONENTS, "total"], stralign="right", disable_numparse=True))


def _parse_schedule(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        count, _, times = part.strip().partition("x")
        try:
            out += [int(count)] * int(times or 1)
        except ValueError:
            raise ValueError(f"cannot parse schedule part {part!r}; write e.g. '256x2,128x30'") from None
    return out


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--device", default=None)
@click.option("--method", "drop", default="random:k=2,ratio=0.75", show_default=True,
              help="pruning condition compared with the unpruned loop")
@friendly
def bench(model, repeats, warmup, device, drop) -> None:
    """Interleaved timing: our loop vs the stock forward, and a pruned run vs its FLOPs-ideal speedup."""
    from harness.bench import bench_llm

    click.echo(bench_llm(model, drop=drop, repeats=repeats, warmup=warmup, device=device))


@main.command()
@friendly
def doctor() -> None:
    """Check the installation: torch/torchvision ops, transformers, ultralytics, bundled assets, a tiny forward."""
    from harness.doctor import checks

    ok = True
    for name, passed, detail in checks():
        ok &= passed
        click.echo(f"[{'ok' if passed else 'FAIL'}] {name}: {detail}")
    if not ok:
        sys.exit(1)



@main.group()
def convert() -> None:
    """Convert a released checkpoint into a segprune model folder (once; `--model FOLDER` then loads it)."""


@convert.command("lisa")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--clip", type=click.Path(file_okay=False, path_type=Path), envvar="SEGPRUNE_CLIP", default=None,
              help="local openai/clip-vit-large-patch14 (or -336) folder; LISA checkpoints carry no CLIP "
                   "[default: the config's tower in the Hugging Face cache; env SEGPRUNE_CLIP]")
@click.option("--dtype", type=click.Choice(["keep", *DTYPES]), default="keep", show_default=True,
              help="cast floating tensors (keep: as stored, bf16 LLM and fp32 SAM in LISA's releases)")
@friendly
def convert_lisa_cmd(src: Path, dst: Path, clip: Path | None, dtype: str) -> None:
    """Convert the LISA checkpoint folder SRC (LISA-7B/13B-v0/v1, LLaVA-1.5-based variants) into DST.

    SRC is the folder as downloaded: config.json, tokenizer files and pytorch_model-*.bin (or safetensors) shards
    with their index. Reads one shard at a time; DST is written whole or not at all.
    """
    from harness.convert.lisa import convert_lisa

    _convert(convert_lisa, src, dst, dtype, clip=clip)


@convert.command("llava")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sam", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="original SAM checkpoint (sam_vit_h_4b8939.pth); with --seg-head: a segmentation model")
@click.option("--seg-head", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="file with the text_hidden_fcs weights trained with this LLaVA's [SEG] token")
@click.option("--dtype", type=click.Choice(["keep", *DTYPES]), default="keep", show_default=True)
@friendly
def convert_llava_cmd(src: Path, dst: Path, sam: Path | None, seg_head: Path | None, dtype: str) -> None:
    """Convert a transformers-layout LLaVA-1.5 folder SRC (llava-hf/llava-1.5-7b-hf) into DST.

    Without --sam/--seg-head the result is a plain MLLM: FLOPs, latency, generate and token analyses, no masks.
    """
    from harness.convert.llava import convert_llava

    _convert(convert_llava, src, dst, dtype, sam=sam, seg_head=seg_head)


def _convert(fn: Callable[..., Path], src: Path, dst: Path, dtype: str, **options: Any) -> None:
    from harness.convert.common import progress_bar
    from harness.files import read_json
    from harness.loading import parse_dtype

    with progress_bar(f"converting {src.name}") as bar:
        out = fn(src, dst, dtype=None if dtype == "keep" else parse_dtype(dtype), progress=bar, **options)
    cfg = read_json(out / "segprune.json", "convert again")
    info = read_json(out / "convert.json", "convert again")
    grid = cfg["vision"]["image_size"] // cfg["vision"]["patch_size"]
    if cfg["sam"] is None:
        sam = "no SAM (a plain MLLM: FLOPs, latency, generate; no masks)"
    else:
        width = cfg["sam"]["vision"]["hidden_size"]
        sam = "SAM " + {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}.get(width, f"a ViT of width {width}")
    click.echo(f"{out}: {info['tensors']} tensors ({', '.join(f'{n} {d}' for d, n in info['dtypes'].items())}); "
               f"LLaMA {cfg['llm']['num_hidden_layers']} layers x {cfg['llm']['hidden_size']}, "
               f"{info['projector']} projector, {grid * grid} image tokens, {sam}")
    click.echo(f"next: segprune {'run' if cfg['sam'] else 'bench'} --model {out}")


@main.group()
def calibrate() -> None:
    """Fit the learned parts of a method's calibrated variant on a calibration split (the LLM frozen)."""


@calibrate.command("routing")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="model name or folder")
@click.option("--data", default="shapes-ref:train", show_default=True,
              help="dataset:split to calibrate on; runs evaluating the adapter on it are refused")
@click.option("--limit", type=int, default=48, show_default=True, help="first N samples (a quarter held out)")
@click.option("--epochs", type=int, default=8, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("runs/routing-adapter.safetensors"), show_default=True, help="the adapter file")
@click.option("--data-root", envvar="SEGPRUNE_DATA", default=None, help="root of the datasets [env SEGPRUNE_DATA]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cpu)")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly
def calibrate_routing_cmd(model, data, limit, epochs, out, data_root, device, seed) -> None:
    """Token Routing's W_q, W_k and gate MLP per layer (d_p, d_g: 1/16 of the hidden and FFN sizes, the paper's
    128 and 512 for Phi-1.5), regressing the routed image tokens' true FFN updates; use it as routing:adapter=FILE."""
    from tqdm import tqdm

    import harness
    from harness.methods.routing import calibrate as fit

    name, _, split = data.partition(":")
    loaded = harness.load_model(model, device=device)
    samples = harness.load_dataset(name, split or "train", root=data_root, limit=limit)
    n_val = max(1, round(0.25 * len(samples)))
    with tqdm(total=epochs * (len(samples) - n_val), desc="calibrating routing", file=sys.stderr, disable=None,
              leave=False) as bar:
        adapter, info = fit(loaded, samples, data=f"{name}:{split or 'train'}", epochs=epochs, seed=seed,
                            progress=bar.update)
    adapter.save(out, info)
    click.echo(f"{out}: {info['layers']} layers, held-out residual {info['held_out_residual_before']:.3f} -> "
               f"{info['held_out_residual_after']:.3f} ({info['train_samples']} + {info['held_out_samples']} samples "
               f"of {info['data']})")
    click.echo(f"next: segprune run --model {model} --method 'routing:adapter={out}' (not on {info['data']})")


@main.group()
def train() -> None:
    """Train the project's bundled models (deterministic given --seed)."""


@train.command("tiny")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/train-tiny"),
              show_default=True, help="model folder to write")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--vision-steps", type=int, default=None, help="CLIP + SAM pre-training steps")
@click.option("--clip-steps", type=int, default=None, help="CLIP-only steps after the joint ones (0: none)")
@click.option("--llm-steps", type=int, default=None, help="LISA-stage steps")
@click.option("--batch", type=int, default=None)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--bundle", is_flag=True, help="also write the result as the package's bundled lisa-tiny-shapes")
@friendly
def train_tiny_cmd(out, seed, vision_steps, clip_steps, llm_steps, batch, device, bundle) -> None:
    """Train lisa-tiny-shapes on shapes-ref train (about 75 minutes on a 2-core CPU); reruns resume after stage 1."""
    from harness.train import TrainConfig, train_tiny

    given = dict(vision_steps=vision_steps, clip_steps=clip_steps, llm_steps=llm_steps, batch=batch)
    cfg = TrainConfig(seed=seed, device=device, **{k: v for k, v in given.items() if v is not None})
    log_path = Path(out) / "train.log"
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        def log(line: str) -> None:
            click.echo(line)
            log_file.write(line + "\n")
            log_file.flush()

        folder = train_tiny(out, cfg, log)
    click.echo(f"model written to {folder} (log: {log_path})")
    if bundle:
        from harness.model import bundle_model

        click.echo(f"bundled as {bundle_model(folder)}")


@train.command("yolo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/train-yolo"),
              show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--imgsz", type=int, default=256, show_default=True)
@click.option("--fraction", type=float, default=1.0, show_default=True, help="fraction of shapes-ref train to use")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--bundle", is_flag=True, help="also write the best weights as the package's bundled YOLO-seg")
@friendly
def train_yolo_cmd(out, epochs, imgsz, fraction, seed, device, bundle) -> None:
    """Train yolo11n-seg from scratch on shapes-ref (for LVLM_CSP's Seg-First clustering), offline."""
    import time

    import torch
    import ultralytics

    from harness.yolo import bundle_yolo, train_yolo

    t0 = time.time()
    best, map50 = train_yolo(out, epochs=epochs, imgsz=imgsz, fraction=fraction, seed=seed, device=device)
    click.echo(f"best weights: {best}; mask mAP50 on shapes-ref val: {map50:.3f}")
    if bundle:
        record = {"command": f"segprune train yolo --epochs {epochs} --imgsz {imgsz} --fraction {fraction} "
                             f"--seed {seed} --device {device} --bundle",
                  "mask_map50_val": round(map50, 4), "minutes": round((time.time() - t0) / 60, 1),
                  "ultralytics": ultralytics.__version__, "torch": torch.__version__,
                  "threads": torch.get_num_threads()}
        click.echo(f"bundled as {bundle_yolo(best, record=record)}")


@main.command()
@click.argument("dataset", default="shapes-ref")
@click.option("--split", "splits", multiple=True, help="split(s) to prepare and count (default: every split)")
@click.option("--data-root", envvar="SEGPRUNE_DATA", default=None, help="root of the datasets [env SEGPRUNE_DATA]")
@friendly
def data(dataset, splits, data_root) -> None:
    """Prepare a dataset (shapes-ref is generated into the cache, or into --data-root when given) and count its
    samples per split."""
    import harness
    from harness.datasets import DATASETS, shapes

    name = DATASETS.canonical(dataset)
    if not splits:
        splits = tuple(shapes.SPLITS) if name == "shapes-ref" else ("val",)
    for split in splits:
        folder = Path(data_root or ".") / shapes.VERSION / split
        if name == "shapes-ref" and data_root and not (folder / "refs(unc).p").is_file():
            shapes.generate(split, folder, progress=True)  # asked for: the one place shapes-ref leaves the cache
        samples = harness.load_dataset(name, split, root=data_root)
        where = f"  ({shapes.split_dir(split, progress=False)})" if name == "shapes-ref" and not data_root else ""
        click.echo(f"{name}:{split}  {len(samples)} queries on {len({s.image_id for s in samples})} images{where}")


if __name__ == "__main__":
    main()

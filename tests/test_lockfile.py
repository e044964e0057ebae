"""Lock provenance: which locked packages this interpreter selects, and whether the installed ones match."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from harness.lockfile import _selected, lock_provenance

ROOT = Path(__file__).resolve().parents[1]


def _lock(click: str, numpy: str) -> str:
    """A lock in uv's layout: two numpy versions split by a marker, an extra, an edge that never applies here."""
    return f'''version = 1
revision = 3
requires-python = ">=3.11"

[[package]]
name = "proj"
version = "0.1"
source = {{ editable = "." }}
dependencies = [
    {{ name = "click" }},
    {{ name = "numpy", version = "{numpy}", source = {{ registry = "x" }}, marker = "python_full_version >= '3.0'" }},
    {{ name = "numpy", version = "0.0.1", source = {{ registry = "x" }}, marker = "python_full_version < '3.0'" }},
    {{ name = "nowhere", marker = "sys_platform == 'no-such-platform'" }},
]
[package.dev-dependencies]
dev = [{{ name = "devtool" }}]

[[package]]
name = "click"
version = "{click}"
source = {{ registry = "x" }}
dependencies = [{{ name = "helper", extra = ["more"] }}]

[[package]]
name = "helper"
version = "1.0"
source = {{ registry = "x" }}
[package.optional-dependencies]
more = [{{ name = "numpy", version = "{numpy}", source = {{ registry = "x" }} }}, {{ name = "extra-only" }}]

[[package]]
name = "extra-only"
version = "2.0"
source = {{ registry = "x" }}

[[package]]
name = "numpy"
version = "{numpy}"
source = {{ registry = "x" }}

[[package]]
name = "numpy"
version = "0.0.1"
source = {{ registry = "x" }}

[[package]]
name = "nowhere"
version = "1.0"
source = {{ registry = "x" }}

[[package]]
name = "devtool"
version = "1.0"
source = {{ registry = "x" }}
'''


def test_selection_follows_markers_versions_and_extras():
    lock = tomllib.loads(_lock("8.0", "2.0"))
    assert _selected(lock) == {"click": "8.0", "helper": "1.0", "extra-only": "2.0", "numpy": "2.0"}


def test_locked_only_when_every_selected_package_is_installed_at_its_version(tmp_path):
    click, numpy = importlib.metadata.version("click"), importlib.metadata.version("numpy")
    (tmp_path / "uv.lock").write_text(_lock(click, numpy))
    got = lock_provenance(tmp_path)
    assert got["locked"] is False and got["sha256"] and got["file"] == str(tmp_path / "uv.lock")
    assert got["differences"] == ["extra-only missing (locked 2.0)", "helper missing (locked 1.0)"]

    (tmp_path / "uv.lock").write_text(_lock("0.0.0", numpy))
    assert f"click {click} (locked 0.0.0)" in lock_provenance(tmp_path)["differences"]


def test_project_lock_selects_the_runtime_closure_without_dev_tools():
    selected = _selected(tomllib.loads((ROOT / "uv.lock").read_text()))
    assert {"torch", "torchvision", "transformers", "ultralytics", "pycocotools"} <= set(selected)
    assert not {"pytest", "ruff"} & set(selected)


def test_no_lock_is_not_locked(tmp_path):
    got = lock_provenance(tmp_path)
    assert got["locked"] is False and got["sha256"] is None and "no uv.lock" in got["differences"][0]

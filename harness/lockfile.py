"""Whether this process runs in the environment `uv.lock` pins: the provenance `environment.json` records.

The lock is universal (every platform and Python the project admits), so the packages it selects here are found by
walking its dependency graph from the project's runtime dependencies with each edge's marker evaluated for this
interpreter, the way `uv sync` selects them. The run is *locked* when every selected package is installed at its
locked version; packages installed beside them (pytest, flash-attn) do not change that.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.utils import canonicalize_name

LOCK_NAME = "uv.lock"
CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding harness/ (site-packages for a wheel install)


def _selected(lock: dict[str, Any]) -> dict[str, str]:
    """{package: version} the lock installs on this interpreter: the project's runtime closure (no dev groups)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pkg in lock["package"]:
        by_name.setdefault(pkg["name"], []).append(pkg)
    root = next(p for p in lock["package"] if {"editable", "virtual"} & p.get("source", {}).keys())

    def applies(dep: dict[str, Any]) -> bool:
        return "marker" not in dep or Marker(dep["marker"]).evaluate()

    selected: dict[str, str] = {}
    seen: set[tuple[str, str, str]] = set()  # (package, version, extra or "") already expanded
    todo = [d for d in root.get("dependencies", []) if applies(d)]
    while todo:
        dep = todo.pop()
        pkg = next(p for p in by_name[dep["name"]] if dep.get("version", p["version"]) == p["version"])
        selected[pkg["name"]] = pkg["version"]
        for extra in ["", *dep.get("extra", [])]:
            if (pkg["name"], pkg["version"], extra) not in seen:
                seen.add((pkg["name"], pkg["version"], extra))
                deps = pkg.get("optional-dependencies", {}).get(extra, []) if extra else pkg.get("dependencies", [])
                todo += [d for d in deps if applies(d)]
    return selected


def lock_provenance(project_root: Path = CHECKOUT) -> dict[str, Any]:
    """The lock file's hash and whether the installed packages are the ones it pins for this interpreter.

    Args:
        project_root: the folder whose `uv.lock` to compare with; by default the checkout this package runs from.

    Returns:
        `{"file", "sha256", "locked", "differences"}`; `differences` lists each selected package that is missing or at
        another version ("torch 2.14.1 (locked 2.15.0)"). Without a lock beside the package (an install from a
        wheel) `file` and `sha256` are None and `locked` is False.
    """
    path = project_root / LOCK_NAME
    if not path.is_file():
        return {"file": None, "sha256": None, "locked": False,
                "differences": [f"no {LOCK_NAME} beside the installed package (not a source checkout)"]}
    raw = path.read_bytes()
    installed: dict[str, str] = {}
    for dist in importlib.metadata.distributions():  # in sys.path order: the first of a name is the one imported
        installed.setdefault(canonicalize_name(dist.metadata["Name"] or ""), dist.version)
    differences = []
    for name, version in sorted(_selected(tomllib.loads(raw.decode())).items()):
        have = installed.get(canonicalize_name(name))
        if have != version:
            differences.append(f"{name} {have or 'missing'} (locked {version})")
    return {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "locked": not differences,
            "differences": differences}

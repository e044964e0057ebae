"""segprune: a benchmark harness for training-free visual-token reduction in segmentation MLLMs.

Stable Python API:
    load_model(name_or_path)            -> SegModel (model.segment(image, query, method=None))
    create_method(spec_or_name, **kw)   -> Method
    load_dataset(name, split, root=None, limit=None) -> list of samples
"""

from __future__ import annotations

__version__ = "0.1.0"

from harness import methods as _builtin_methods  # noqa: E402,F401  (fills the method registry; patches nothing)
from harness.loading import load_model  # noqa: E402
from harness.method import METHODS, Method, create_method, register  # noqa: E402
from harness.model import SegModel  # noqa: E402


def load_dataset(name: str, split: str = "val", root: str | None = None, limit: int | None = None):
    """Samples of a dataset split (see `harness.datasets`)."""
    from harness.datasets import load_dataset as _load

    return _load(name, split, root=root, limit=limit)


__all__ = ["METHODS", "Method", "SegModel", "create_method", "load_dataset", "load_model", "register", "__version__"]

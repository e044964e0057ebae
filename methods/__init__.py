"""Built-in reduction methods. Importing this package registers them in `harness.method.METHODS`."""

from harness.methods import controls, csp, fastv, feather, pdrop, prumerge, sparsevlm, visionzip  # noqa: F401

"""Built-in reduction methods. Importing this package registers them in `harness.method.METHODS`."""

from harness.methods import (  # noqa: F401
    controls,
    csp,
    dart,
    divprune,
    fastv,
    feather,
    pdrop,
    prumerge,
    routing,
    sparsevlm,
    superpixel,
    visionzip,
    vispruner,
)

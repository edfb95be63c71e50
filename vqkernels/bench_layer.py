"""``python -m vqkernels.bench_layer``: the layer training-step benchmark, :mod:`vqkernels.bench.layer` (whose
docstring and ``--help`` say what it runs)."""

import sys

from .bench.layer import main

if __name__ == "__main__":
    sys.exit(main())

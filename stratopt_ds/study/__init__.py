"""Optimizer studies: YAML plans -> resumable runs of the training entry -> statistics -> report.

    python -m stratopt_ds.study run stratopt_ds/study/plans/cpu_small.yaml --jobs 2
    python -m stratopt_ds.study report runs/study_cpu_small

Modules: :mod:`.plan` (load and validate plans, expand them into runs), :mod:`.runner` (execute,
resume, record failures), :mod:`.results` (run states, reading a study directory),
:mod:`.stats` (tests via scipy/statsmodels), :mod:`.layers` (layer-wise norm analysis),
:mod:`.plots` and :mod:`.report`. See README.md in this folder.
"""
from .plan import Plan, PlanError, Run, load_plan

__all__ = ["Plan", "PlanError", "Run", "load_plan"]

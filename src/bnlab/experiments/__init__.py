"""Experiments as data: TOML specs, variants x seeds, a resumable runner, SQLite store, statistics."""

from bnlab.experiments.read import load_probes, load_results
from bnlab.experiments.runner import ExperimentInterrupted, Progress, plan_workers, run_experiment
from bnlab.experiments.spec import (ExperimentSpec, RunPlan, SpecError, apply_quick, expand, load_experiment,
                                    parse_experiment, preset_names)
from bnlab.experiments.store import RunStore, StoreError

__all__ = ["ExperimentInterrupted", "ExperimentSpec", "Progress", "RunPlan", "RunStore", "SpecError", "StoreError",
           "apply_quick", "expand", "load_experiment", "load_probes", "load_results", "parse_experiment",
           "plan_workers", "preset_names", "run_experiment"]

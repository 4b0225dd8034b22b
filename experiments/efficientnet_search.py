"""Experiment `efficientnet_search`: the compound-coefficient grid search (see efficientnet.py)."""
from experiments.efficientnet import run_search as run, validate_search as validate  # noqa: F401

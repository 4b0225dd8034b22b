"""Training: train state, jit-compiled steps over a mesh, optimizers/schedules, the fit loop.

The trainer's API:
    fit(config, workdir, *, mesh=None, variables=None, on_log=None, until_step=None,
        hparams=None) -> dict          train (or resume) into a run directory (scaling.rundir)
    prepare(config, mesh=None) -> Run  the model, optimizer, schedule, durations and train step
    restore(config, run_dir, mesh=None) -> dict   the newest checkpoint's variables
    Diverged                           raised by fit when training diverges
    build_model, default_train_config, validate_config
"""
from scaling.train.config import default_train_config, validate_config
from scaling.train.loop import Diverged, fit
from scaling.train.run import Run, build_model, prepare, restore

__all__ = ["fit", "prepare", "restore", "Run", "Diverged", "build_model", "default_train_config",
           "validate_config"]

"""Training: train state, jit-compiled steps over a mesh, optimizers/schedules, the fit loop.

The trainer's API:
    fit(config, workdir, *, mesh=None, variables=None, on_log=None, until_step=None,
        hparams=None) -> dict          train (or resume) into a run directory (scaling.rundir)
    prepare(config, mesh=None) -> Run  the model, optimizer, schedule, durations and train step
    restore(config, run_dir, mesh=None) -> dict   the newest checkpoint's variables
    load_run(run_dir, mesh=None) -> (config, Run, variables)   a run directory's recorded
                                       config and newest checkpoint (eval, predict, export)
    Diverged                           raised by fit when training diverges
    build_model, default_train_config, validate_config
    data_config(config)                the data section with the model's mean/std/crop where unset
    resolve_image_size(config, user_set)   data.image_size follows the model unless the user set it
"""
from scaling.train.config import default_train_config, validate_config
from scaling.train.loop import Diverged, fit
from scaling.train.run import (Run, build_model, data_config, load_run, prepare, resolve_image_size,
                               restore, run_config)

__all__ = ["fit", "prepare", "restore", "load_run", "run_config", "Run", "Diverged", "build_model",
           "data_config", "default_train_config", "resolve_image_size", "validate_config"]

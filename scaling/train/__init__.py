"""Training: train state, jit-compiled steps over a mesh, optimizers/schedules, the fit loop."""
from scaling.train.loop import Diverged, build_model, fit
from scaling.train.config import default_train_config, validate_config

__all__ = ["fit", "Diverged", "build_model", "default_train_config", "validate_config"]

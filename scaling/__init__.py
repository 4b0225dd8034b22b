"""scaling: image-classification scaling experiments in JAX/Flax.

Importing the package sets the fast CPU convolution path for XLA (see `scaling._env`)
before JAX is loaded, so import `scaling` before `jax` in entry points.
"""
from scaling import _env

_env.configure_xla()

__version__ = "0.1.0"

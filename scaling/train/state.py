"""Train state: everything a step needs and a checkpoint restores, as one pytree."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: number of optimizer updates done
    params: Any
    batch_stats: Any           # {} for models without BatchNorm
    opt_state: Any
    rng: jax.Array             # uint32[2] root key; per step: fold_in(rng, step)


def init_variables(model, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """Initialises on the host without jit (jitting init costs 5x more compile time than it saves)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)
    return flax.core.unfreeze(variables)


def create_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, ...], variables: dict | None = None) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model, init_rng, image_shape)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=state_rng)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))

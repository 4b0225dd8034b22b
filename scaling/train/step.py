"""Jit-compiled train and eval steps over a device mesh.

The step functions are pure; `make_train_step` / `make_eval_step` wrap them in `jax.jit` with
the batch sharded over the mesh's 'data' axis, the state replicated and donated. On one CPU
and on a pod slice the code is the same.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from scaling import parallel
from scaling.train import finetune
from scaling.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing (as torch / TF)."""
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k largest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # rank = number of classes with a strictly larger logit
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank < k).astype(jnp.float32)


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               label_smoothing: float = 0.0, compute_dtype: Any = jnp.float32,
               plan: finetune.Plan = finetune.TRAIN_ALL):
    """One optimizer update on a global batch; returns the new state and scalar metrics.

    `plan` (scaling.train.finetune) picks the parameters that train (only those are
    differentiated and updated) and how BatchNorm runs."""
    rng = jax.random.fold_in(state.rng, state.step)
    images = batch["image"].astype(compute_dtype)
    labels = batch["label"]
    has_bn = bool(jax.tree.leaves(state.batch_stats))
    update_bn = has_bn and plan.update_bn
    trainable, frozen = plan.split(state.params)

    def loss_fn(trainable):
        variables = {"params": plan.merge(trainable, frozen)}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
        with plan.frozen_bn():
            logits, updates = model.apply(variables, images, train=plan.train, rngs={"dropout": rng},
                                          mutable=["batch_stats"] if update_bn else [])
        loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = plan.merge(optax.apply_updates(trainable, param_updates), frozen)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=updates["batch_stats"] if update_bn else state.batch_stats)
    metrics = {
        "loss": loss,
        "top1": jnp.mean(topk_correct(logits, labels, 1)),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, compute_dtype: Any = jnp.float32):
    """Sums of loss / top-1 / top-5 over the real (mask == 1) examples of a padded batch."""
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    logits = model.apply(variables, batch["image"].astype(compute_dtype), train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    return {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
        "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
        "count": jnp.sum(mask),
    }


def make_train_step(model, tx, mesh, *, label_smoothing: float = 0.0,
                    compute_dtype: Any = jnp.float32, donate: bool = True,
                    compiler_options: dict | None = None,
                    plan: finetune.Plan = finetune.TRAIN_ALL) -> Callable:
    fn = functools.partial(train_step, model=model, tx=tx, label_smoothing=label_smoothing,
                           compute_dtype=compute_dtype, plan=plan)
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, data), out_shardings=(rep, rep),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options)


def make_eval_step(model, mesh, *, compute_dtype: Any = jnp.float32,
                   compiler_options: dict | None = None) -> Callable:
    fn = functools.partial(eval_step, model=model, compute_dtype=compute_dtype)
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, data), out_shardings=rep,
                   compiler_options=compiler_options)

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
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    # rank = number of classes with a strictly larger logit
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank < k).astype(jnp.float32)


def model_input(batch: dict) -> jax.Array:
    """What the model reads from a batch: 'audio' [N, T, 1] in audio batches, else 'image'."""
    return batch["audio"] if "audio" in batch else batch["image"]


def label_key(model) -> str:
    """The batch field a model's logits are scored against: 'label' unless the model names
    another (a next-sample WaveNet: 'next_sample', one class per time step)."""
    return getattr(model, "label_key", "label")


def per_example(values: jax.Array) -> jax.Array:
    """[N] or [N, T] per-example (per-step) values -> [N]: the mean over an example's steps."""
    return values.reshape(values.shape[0], -1).mean(axis=1)


def classifier_losses(outputs, labels: jax.Array, aux_weight: float | None = None,
                      label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """(main logits, {'loss': ...[, 'total_loss': ...]}) of a classifier's train-mode output.

    Models with auxiliary classifiers (GoogLeNet, Inception v3 with `aux_logits=True`) return
    `(logits, *aux_logits)` in train mode and carry `aux_weight`; the objective `total_loss`
    adds `aux_weight` times each auxiliary head's (equally label-smoothed) loss, as their papers
    train them. `loss` is always the main head's loss: the quantity eval reports and other
    models log, so curves compare across models."""
    logits, *aux = outputs if isinstance(outputs, tuple) else (outputs,)
    losses = {"loss": jnp.mean(cross_entropy(logits, labels, label_smoothing))}
    if aux:
        if aux_weight is None:
            raise TypeError("a model that returns auxiliary logits needs an `aux_weight` field")
        aux_loss = sum(jnp.mean(cross_entropy(a, labels, label_smoothing)) for a in aux)
        losses["total_loss"] = losses["loss"] + aux_weight * aux_loss
    return logits, losses


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               label_smoothing: float = 0.0, compute_dtype: Any = jnp.float32,
               plan: finetune.Plan = finetune.TRAIN_ALL):
    """One optimizer update on a global batch; returns the new state and scalar metrics.

    `plan` (scaling.train.finetune) picks the parameters that train (only those are
    differentiated and updated) and how BatchNorm runs."""
    rng = jax.random.fold_in(state.rng, state.step)
    inputs = model_input(batch).astype(compute_dtype)
    labels = batch[label_key(model)]
    has_bn = bool(jax.tree.leaves(state.batch_stats))
    update_bn = has_bn and plan.update_bn
    trainable, frozen = plan.split(state.params)

    def loss_fn(trainable):
        variables = {"params": plan.merge(trainable, frozen)}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
        with plan.frozen_bn():
            outputs, updates = model.apply(variables, inputs, train=plan.train, rngs={"dropout": rng},
                                           mutable=["batch_stats"] if update_bn else [])
        logits, losses = classifier_losses(outputs, labels, getattr(model, "aux_weight", None),
                                           label_smoothing)
        return losses.get("total_loss", losses["loss"]), (logits, losses, updates)

    (_, (logits, losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = plan.merge(optax.apply_updates(trainable, param_updates), frozen)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=updates["batch_stats"] if update_bn else state.batch_stats)
    metrics = {
        **losses,  # loss (main head) [, total_loss (the objective, with auxiliary heads)]
        "top1": jnp.mean(topk_correct(logits, labels, 1)),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, compute_dtype: Any = jnp.float32,
              per_class: bool = False):
    """Sums of loss / top-1 / top-5 over the real (mask == 1) examples of a padded batch
    (a model with per-step outputs counts each example's mean over its steps).

    per_class (classifiers with one label per example): also 'class_top1' [C], the top-1 hits
    by true class (the same rule as 'top1', so they sum to it), and 'confusion' [C, C], the
    example counts by true class (rows) and arg-max prediction (columns)."""
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    logits = model.apply(variables, model_input(batch).astype(compute_dtype), train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch[label_key(model)]
    top1 = topk_correct(logits, labels, 1)
    out = {
        "loss": jnp.sum(per_example(cross_entropy(logits, labels)) * mask),
        "top1": jnp.sum(per_example(top1) * mask),
        "top5": jnp.sum(per_example(topk_correct(logits, labels, 5)) * mask),
        "count": jnp.sum(mask),
    }
    if per_class:
        num_classes = logits.shape[-1]
        truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
        predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.float32)
        out["class_top1"] = jnp.sum(truth * top1[:, None], axis=0)
        out["confusion"] = jnp.matmul(truth.T, predicted, precision=jax.lax.Precision.HIGHEST)
    return out


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
                   compiler_options: dict | None = None, per_class: bool = False) -> Callable:
    fn = functools.partial(eval_step, model=model, compute_dtype=compute_dtype, per_class=per_class)
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, data), out_shardings=rep,
                   compiler_options=compiler_options)

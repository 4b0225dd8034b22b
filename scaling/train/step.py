"""Jit-compiled train and eval steps over a device mesh.

The step functions are pure; `make_train_step` / `make_eval_step` wrap them in `jax.jit` with
the batch sharded over the mesh's batch axes ('data', 'fsdp'), the state donated and placed
with `state_sharding` (replicated by default; `parallel.state_shardings` for FSDP). On one CPU
and on a pod slice the code is the same.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scaling import parallel
from scaling.train import finetune
from scaling.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing (as torch / TF), in
    float32 or wider."""
    num_classes = logits.shape[-1]
    dtype = jnp.promote_types(logits.dtype, jnp.float32)   # bf16 -> float32; float64 stays
    onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(dtype), onehot)


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
               plan: finetune.Plan = finetune.TRAIN_ALL, grad_accum_steps: int = 1,
               microbatch_sharding: Any = None):
    """One optimizer update on a global batch; returns the new state and scalar metrics.

    `plan` (scaling.train.finetune) picks the parameters that train (only those are
    differentiated and updated) and how BatchNorm runs.

    `grad_accum_steps` = k > 1 splits the batch into k microbatches (rows i, i+k, i+2k, ...:
    every device keeps its own rows) and runs them one after another in a `lax.scan`, summing
    the gradients; the update is the one of their mean. Without BatchNorm this is the full
    batch's update (up to float rounding; dropout draws per microbatch). With BatchNorm each
    microbatch is normalised with its own statistics (ghost batches of batch_size / k) and
    the running averages are updated once per microbatch, k times a step."""
    rng = jax.random.fold_in(state.rng, state.step)
    trainable = plan.split(state.params)[0]
    grad_fn = _grad_fn(state.params, state.batch_stats, model=model,
                       label_smoothing=label_smoothing, compute_dtype=compute_dtype, plan=plan)
    if grad_accum_steps == 1:
        (_, (metrics, batch_stats)), grads = grad_fn(trainable, state.batch_stats, batch, rng)
    else:
        k = grad_accum_steps
        micro = jax.tree.map(lambda x: _by_microbatch(x, k).swapaxes(0, 1), batch)  # [k, b / k, ...]
        if microbatch_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding)

        def accumulate(carry, xs):
            grad_sum, batch_stats = carry
            mb, i = xs
            (_, (metrics, batch_stats)), grads = grad_fn(trainable, batch_stats, mb,
                                                         jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), metrics

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grad_sum, batch_stats), metrics = jax.lax.scan(
            accumulate, (zeros, state.batch_stats), (micro, jnp.arange(k)))
        grads = jax.tree.map(lambda g: g / k, grad_sum)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    return _apply(state, grads, batch_stats, metrics, tx=tx, plan=plan)


def _grad_fn(params, batch_stats, *, model, label_smoothing: float, compute_dtype: Any,
             plan: finetune.Plan) -> Callable:
    """(trainable, batch_stats, batch, rng) -> ((objective, (metrics, new batch_stats)), grads)
    of one (micro)batch; `params` give the frozen parameters, `batch_stats` whether BatchNorm
    statistics exist."""
    labels_key = label_key(model)
    has_bn = bool(jax.tree.leaves(batch_stats))
    update_bn = has_bn and plan.update_bn
    frozen = plan.split(params)[1]

    def loss_fn(trainable, batch_stats, batch, rng):
        variables = {"params": plan.merge(trainable, frozen)}
        if has_bn:
            variables["batch_stats"] = batch_stats
        with plan.frozen_bn():
            outputs, updates = model.apply(variables, model_input(batch).astype(compute_dtype),
                                           train=plan.train, rngs={"dropout": rng},
                                           mutable=["batch_stats"] if update_bn else [])
        logits, losses = classifier_losses(outputs, batch[labels_key],
                                           getattr(model, "aux_weight", None), label_smoothing)
        losses["top1"] = jnp.mean(topk_correct(logits, batch[labels_key], 1))
        stats = updates["batch_stats"] if update_bn else batch_stats
        return losses.get("total_loss", losses["loss"]), (losses, stats)

    return jax.value_and_grad(loss_fn, has_aux=True)


def _by_microbatch(x: jax.Array, k: int) -> jax.Array:
    """[batch, ...] -> [batch / k, k, ...]: microbatch i is [:, i], rows i, i + k, i + 2k, ...
    (a device's rows stay on it when its share of the batch is a multiple of k)."""
    return x.reshape(x.shape[0] // k, k, *x.shape[1:])


def _apply(state: TrainState, grads, batch_stats, metrics: dict, *, tx, plan: finetune.Plan):
    """The optimizer update of `state` with `grads` (of the trainable parameters)."""
    trainable, frozen = plan.split(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = plan.merge(optax.apply_updates(trainable, param_updates), frozen)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats)
    # loss (main head) [, total_loss (the objective, with auxiliary heads)], top1, grad_norm
    return new_state, {**metrics, "grad_norm": optax.tree.norm(grads)}


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
                    plan: finetune.Plan = finetune.TRAIN_ALL, grad_accum_steps: int = 1,
                    state_sharding: Any = None, accumulate: str = "auto") -> Callable:
    """The jitted train step (`.lower(state, batch).compile()` gives its executable).

    With `grad_accum_steps` > 1, `accumulate` picks how its microbatches run: 'scan' (a
    `lax.scan` inside the one compiled step), 'host' (`HostAccumulation`: one compiled
    microbatch step called k times from Python, then the update) or 'auto' (host on the CPU
    backend, where XLA runs convolutions inside a loop body ~10x slower, jax-ml/jax#12868;
    scan elsewhere). Both give the same update."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"make_train_step: accumulate={accumulate!r}; use one of {', '.join(ACCUMULATE)}.")
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = rep if state_sharding is None else state_sharding
    if accumulate == "auto":
        accumulate = "host" if jax.default_backend() == "cpu" else "scan"
    if grad_accum_steps > 1 and accumulate == "host":
        return HostAccumulation(model, tx, mesh, state, label_smoothing=label_smoothing,
                                compute_dtype=compute_dtype, donate=donate,
                                compiler_options=compiler_options, plan=plan, k=grad_accum_steps)
    micro = NamedSharding(mesh, P(None, *data.spec))  # [k, batch / k, ...]: rows stay put
    fn = functools.partial(train_step, model=model, tx=tx, label_smoothing=label_smoothing,
                           compute_dtype=compute_dtype, plan=plan,
                           grad_accum_steps=grad_accum_steps, microbatch_sharding=micro)
    return jax.jit(fn, in_shardings=(state, data), out_shardings=(state, rep),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options)


ACCUMULATE = ("auto", "scan", "host")


class HostAccumulation:
    """A train step in k microbatches driven from Python: a compiled microbatch step (forward,
    backward, gradients added to a running sum that is donated back) is called k times, then
    a compiled update applies the mean. The update is `train_step`'s with the same k (rows
    i, i+k, ... in microbatch i, its own dropout key, BN statistics carried from one
    microbatch to the next), but no convolution runs inside an XLA loop, and at most one
    microbatch's activations are live at a time. Used like the jitted step:
    `.lower(state, batch).compile()` gives a callable `(state, batch) -> (state, metrics)`
    with `memory_analysis()` (the larger of its two phases) and `cost_analysis()`."""

    def __init__(self, model, tx, mesh, state_sharding, *, label_smoothing: float,
                 compute_dtype: Any, donate: bool, compiler_options: dict | None,
                 plan: finetune.Plan, k: int):
        self.k, self._compiled = k, {}
        rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        state = state_sharding if isinstance(state_sharding, TrainState) else None
        grads = plan.split(state.params)[0] if state is not None else rep
        stats = state.batch_stats if state is not None else rep
        params = state.params if state is not None else rep

        def zeros(params):
            return jax.tree.map(jnp.zeros_like, plan.split(params)[0])

        def micro(params, batch_stats, rng, step, grad_sum, batch, i):
            grad_fn = _grad_fn(params, batch_stats, model=model, label_smoothing=label_smoothing,
                               compute_dtype=compute_dtype, plan=plan)
            mb = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
                _by_microbatch(x, k), i, axis=1, keepdims=False), batch)
            key = jax.random.fold_in(jax.random.fold_in(rng, step), i)
            (_, (metrics, batch_stats)), g = grad_fn(plan.split(params)[0], batch_stats, mb, key)
            return jax.tree.map(jnp.add, grad_sum, g), batch_stats, metrics

        def update(state, grad_sum, batch_stats, metrics):
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            mean = jax.tree.map(lambda *m: sum(m) / k, *metrics)
            return _apply(state, grads, batch_stats, mean, tx=tx, plan=plan)

        opts = dict(compiler_options=compiler_options)
        self._zeros = jax.jit(zeros, in_shardings=(params,), out_shardings=grads, **opts)
        self._micro = jax.jit(micro, in_shardings=(params, stats, rep, rep, grads, data, rep),
                              out_shardings=(grads, stats, rep), donate_argnums=(4,), **opts)
        self._update = jax.jit(update, in_shardings=(state_sharding, grads, stats, rep),
                               out_shardings=(state_sharding, rep),
                               donate_argnums=(0,) if donate else (), **opts)

    def lower(self, state, batch) -> "_HostLowered":
        i = jax.ShapeDtypeStruct((), jnp.int32)
        grads = jax.eval_shape(self._zeros, state.params)
        micro = self._micro.lower(state.params, state.batch_stats, state.rng, state.step, grads,
                                  batch, i)
        _, stats, metrics = micro.out_info
        update = self._update.lower(state, grads, stats, [metrics] * self.k)
        sizes = {"opt_state": _device_bytes(state.opt_state), "state": _device_bytes(state),
                 "batch": _device_bytes(batch)}
        return _HostLowered(self.k, (self._zeros.lower(state.params), micro, update), sizes)

    def __call__(self, state, batch):
        """Compiles for these arrays' shapes (once) and runs one step."""
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            (state, batch))
        key = str(jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), spec))
        if key not in self._compiled:
            self._compiled[key] = self.lower(*spec).compile()
        return self._compiled[key](state, batch)


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs (its shard of each)."""
    def nbytes(x):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return sum(nbytes(x) for x in jax.tree.leaves(tree))


class _HostLowered:
    def __init__(self, k, parts, sizes):
        self.k, self.parts, self.sizes = k, parts, sizes

    def compile(self) -> "_HostCompiled":
        return _HostCompiled(self.k, *(p.compile() for p in self.parts), self.sizes)


class _HostCompiled:
    def __init__(self, k, zeros, micro, update, sizes):
        self.k, self.zeros, self.micro, self.update, self.sizes = k, zeros, micro, update, sizes

    def __call__(self, state, batch):
        grad_sum, stats, metrics = self.zeros(state.params), state.batch_stats, []
        for i in range(self.k):  # i as a host scalar: the same value on every process
            grad_sum, stats, m = self.micro(state.params, stats, state.rng, state.step, grad_sum,
                                            batch, np.int32(i))
            metrics.append(m)
        return self.update(state, grad_sum, stats, metrics)

    def memory_analysis(self):
        """Per device, as the fused step's: the state and the batch in, the state out (donated),
        and as temporaries what the larger phase needs beyond them: a microbatch step (its
        peak, plus the optimizer state it does not read) or the update (its peak, plus the
        batch that stays alive)."""
        def peak(c):
            m = c.memory_analysis()
            return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)
        need = max(peak(self.micro) + self.sizes["opt_state"],
                   peak(self.update) + self.sizes["batch"])
        update = self.update.memory_analysis()
        args, out = self.sizes["state"] + self.sizes["batch"], update.output_size_in_bytes
        alias = min(update.alias_size_in_bytes, self.sizes["state"])
        return types.SimpleNamespace(
            argument_size_in_bytes=args, output_size_in_bytes=out, alias_size_in_bytes=alias,
            temp_size_in_bytes=max(need - args - out + alias, 0),
            generated_code_size_in_bytes=sum(c.memory_analysis().generated_code_size_in_bytes
                                             for c in (self.zeros, self.micro, self.update)))

    def cost_analysis(self):
        """FLOPs of one step: k microbatch steps and the update."""
        def flops(c):
            cost = c.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            return float((cost or {}).get("flops", 0.0))
        return {"flops": self.k * flops(self.micro) + flops(self.update) + flops(self.zeros)}


def make_eval_step(model, mesh, *, compute_dtype: Any = jnp.float32,
                   compiler_options: dict | None = None, per_class: bool = False,
                   state_sharding: Any = None) -> Callable:
    fn = functools.partial(eval_step, model=model, compute_dtype=compute_dtype, per_class=per_class)
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = rep if state_sharding is None else state_sharding
    return jax.jit(fn, in_shardings=(state, data), out_shardings=rep,
                   compiler_options=compiler_options)

"""What a training config compiles to (`prepare`), and the trained variables of a run
directory (`restore`): the trainer's API for code that needs the model, its train step or its
weights without training (a grid's preflight, weight export, transfer)."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from scaling import checkpoint as ckpt_lib
from scaling import parallel, rundir
from scaling.models import create_model, model_fields, model_info
from scaling.train import finetune
from scaling.train.config import check_accumulation
from scaling.data import example_spec
from scaling.train.state import abstract_state
from scaling.train.step import make_train_step, model_input

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: Any, num_classes: int, compute_dtype: str = "float32", *,
                image_size: int | None = None):
    """Creates the registered model named `model_cfg.name` with the config's other fields as
    overrides; the head size comes from the data unless `model.num_classes` is set. A model
    with an `image_size` field (a ViT: its position embeddings) is built for `image_size`,
    the data's (`data.image_size`), so the two never need to be kept equal by hand."""
    overrides = {k: (tuple(v) if isinstance(v, list) else v)
                 for k, v in model_cfg.items() if k != "name"}
    if not overrides.get("num_classes"):
        overrides["num_classes"] = num_classes
    fields = model_fields(model_cfg.name)
    if "dtype" in fields and compute_dtype != "float32":
        overrides["dtype"] = COMPUTE_DTYPES[compute_dtype]
    if "image_size" in fields and image_size is not None:
        if overrides.get("image_size") not in (None, image_size):
            raise ValueError(f"model.image_size={overrides['image_size']} differs from data.image_size="
                             f"{image_size}; leave model.image_size unset: it follows data.image_size.")
        overrides["image_size"] = image_size
    return create_model(model_cfg.name, **overrides)


def data_config(config: Any) -> ml_collections.ConfigDict:
    """`config.data` with the model's defaults where the config leaves them unset (None):
    `mean`, `std` and `crop_fraction` from the registry record of `config.model.name`, the
    preprocessing its reference weights expect. What the pipeline is built from."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    info = model_info(config.model.name)
    for field in ("mean", "std", "crop_fraction"):
        if data.get(field) is None and getattr(info, field) is not None:
            data[field] = getattr(info, field)
    return data


def resolve_image_size(config: Any, user_set: bool) -> int:
    """The input resolution rule for a run that switches model (`--config.model.name=X`):
    unless the user set `data.image_size`, it becomes the model's registered resolution
    (`model_info(X).resolution`; image models). Sets `config.data.image_size` and returns it."""
    info = model_info(config.model.name)
    if not user_set and info.modality == "image":
        config.data.image_size = info.resolution
    return config.data.image_size


@dataclasses.dataclass
class Run:
    """What a training config compiles to: model, optimizer, schedule, durations and the
    jitted train step with its input shapes. `fit` trains with it; a grid's preflight
    compiles the very same step (so the second compile is a persistent-cache hit)."""
    model: Any
    tx: Any
    schedule: Callable
    steps_per_epoch: int
    total_steps: int
    step_fn: Callable
    state_spec: Any         # ShapeDtypeStructs with the shardings on this run's mesh
    batch_spec: dict
    key: str | None = None  # what the compiled step depends on; None: never reused

    @property
    def state_sharding(self) -> Any:
        """The train state's shardings (a TrainState of NamedShardings): where `fit` places
        the state and what a checkpoint is restored into, on whatever mesh it was saved."""
        return jax.tree.map(lambda s: s.sharding, self.state_spec)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's model input, e.g. (32, 32, 3), or (T, 1) for audio."""
        return tuple(model_input(self.batch_spec).shape[1:])

    def compile(self):
        """The compiled train step. Runs whose configs differ only in `seed` (a sweep's seeds,
        a preflight and its trial) share one executable within a process: a step of a deep
        EfficientNet costs ~30 s to trace and read back from the persistent cache."""
        if self.key is not None and self.key in _COMPILED:
            _COMPILED.move_to_end(self.key)
            return _COMPILED[self.key]
        compiled = self.step_fn.lower(self.state_spec, self.batch_spec).compile()
        if self.key is not None:
            _COMPILED[self.key] = compiled
            while len(_COMPILED) > _COMPILED_KEEP:
                _COMPILED.popitem(last=False)
        return compiled


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEEP = 2


# train fields the train step does not depend on (evaluation, logging, checkpoints, planning)
_NOT_IN_STEP = ("eval_batch_size", "eval_every_epochs", "eval_every_steps", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "progress_bar", "auto_accumulate",
                "device_memory_gb")


def step_key(config: Any, mesh, num_classes: int, num_examples: int) -> str | None:
    """The compiled step's identity: the config without its seed (the seed only reaches the
    step through the train state's rng) and the train fields no step reads, the mesh, and
    the data's class and example counts."""
    try:
        cfg = json.loads(config.to_json_best_effort(sort_keys=True))
    except (AttributeError, TypeError, ValueError):
        return None
    cfg.pop("seed", None)
    for field in _NOT_IN_STEP:
        cfg.get("train", {}).pop(field, None)
    where = (mesh.axis_names, mesh.devices.shape, [d.id for d in mesh.devices.flat])
    return json.dumps([cfg, repr(where), num_classes, num_examples], sort_keys=True, default=repr)


def make_run(config: Any, mesh, num_classes: int, num_examples: int) -> Run:
    """The Run of `config` for a training split of `num_examples` images of `num_classes`."""
    tc = config.train
    parallel.check_batch_size(tc.batch_size, mesh, "train.batch_size")
    check_accumulation(tc.batch_size, int(tc.get("grad_accum_steps", 1)), mesh.devices.size)
    sharding = config.get("sharding")
    steps_per_epoch = max(math.ceil(num_examples / tc.batch_size), 1)
    total_steps = int(tc.num_steps) if tc.num_steps > 0 else int(round(tc.num_epochs * steps_per_epoch))
    size = config.data.get("image_size")           # None for audio data
    model = build_model(config.model, num_classes, tc.compute_dtype, image_size=size)
    data = parallel.batch_sharding(mesh)
    batch_spec = {k: jax.ShapeDtypeStruct((tc.batch_size, *shape), dtype, sharding=data)
                  for k, (shape, dtype) in example_spec(config.data).items()}
    x1 = jax.ShapeDtypeStruct((1, *model_input(batch_spec).shape[1:]), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x1)
    params = variables["params"]
    plan = finetune.make_plan(config, model, params)  # scratch / linear_probe / finetune[_bn]
    tx, schedule = finetune.build_optimizer(tc, plan, steps_per_epoch, total_steps)
    state_spec = abstract_state(variables, tx,
                                lambda state: parallel.state_shardings(state, mesh, sharding))
    step_fn = make_train_step(model, tx, mesh, label_smoothing=tc.label_smoothing,
                              compute_dtype=COMPUTE_DTYPES[tc.compute_dtype], plan=plan,
                              grad_accum_steps=int(tc.get("grad_accum_steps", 1)),
                              state_sharding=jax.tree.map(lambda s: s.sharding, state_spec))
    return Run(model, tx, schedule, steps_per_epoch, total_steps, step_fn, state_spec, batch_spec,
               step_key(config, mesh, num_classes, num_examples))


def prepare(config: Any, mesh=None) -> Run:
    """The Run of `config` (nothing is compiled or initialised: shapes only). Opens the
    training split's source to learn its class and example counts (once per source in a
    process: validation has usually opened it already)."""
    from scaling.train.config import source_counts

    num_classes, num_examples = source_counts(config.data, config.data.train_split)
    return make_run(config, mesh or parallel.mesh_from_config(config), num_classes, num_examples)


def restore(config: Any, run_dir: str, mesh=None, *, run: Run | None = None) -> dict:
    """The variables {'params': ..., 'batch_stats': ... (models with BatchNorm only)} of the
    newest readable checkpoint of `fit(config, run_dir)`, finished or not, as host numpy
    arrays. Pass `run` (this config's `prepare`) to reuse it. Raises FileNotFoundError naming
    the directory when it holds no checkpoint.

    The checkpoint is read onto `mesh` (default: the config's mesh when this process's devices
    allow it, else data parallelism over them), whatever mesh it was saved from."""
    directory = rundir.checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {directory}: the directory does not exist.")
    run = run or prepare(config, mesh or restore_mesh(config))
    checkpointer = ckpt_lib.Checkpointer(directory)
    try:
        state, step = checkpointer.restore(run.state_spec)
    finally:
        checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}.")
    variables = {"params": parallel.fetch(state.params)}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = parallel.fetch(state.batch_stats)
    return variables


def run_config(run_dir: str) -> Any:
    """The config `fit` recorded in the run directory `run_dir` (scaling.rundir), once it is
    known to hold a checkpoint. Raises FileNotFoundError naming what is missing and the fix."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such directory; give the workdir of a training "
                                "run.")
    directory = rundir.checkpoint_dir(run_dir)
    has_checkpoint = os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))
    config = rundir.read_config(run_dir)
    if config is not None and has_checkpoint:
        return config
    if os.path.isdir(os.path.join(run_dir, "trials")):
        hint = f"it is a sweep's workdir: give one of its trials, {run_dir}/trials/<id>"
    elif has_checkpoint:
        hint = ("it was trained before runs recorded their config: relaunch its training command "
                "once (it resumes at its last step and records it)")
    else:
        hint = ("train into it first (python launch.py --config configs/train.py --workdir "
                f"{run_dir}), or wait for its first checkpoint")
    missing = rundir.CONFIG if config is None else f"checkpoint in {rundir.CHECKPOINTS}/"
    raise FileNotFoundError(f"{run_dir} has no {missing}; {hint}.")


def load_run(run_dir: str, mesh=None) -> tuple[Any, Run, dict]:
    """(config, Run, variables) of a run directory: the config `fit` recorded there, what it
    compiles to (`prepare`) and its newest checkpoint's variables (`restore`)."""
    config = run_config(run_dir)
    run = prepare(config, mesh or restore_mesh(config))
    return config, run, restore(config, run_dir, mesh, run=run)


def restore_mesh(config: Any):
    """Where a recorded run's state is read back: the config's mesh, or, when this process has
    other devices than it was trained on (fsdp=8 read on one CPU), data parallelism over them."""
    try:
        return parallel.mesh_from_config(config)
    except ValueError:
        return parallel.make_mesh()

"""Starting from pretrained weights: the `init` config section, which parameters train, how
BatchNorm runs, and per-group learning rates.

    init.path              pretrained weights (.safetensors; .pth/.pt with torch installed)
    init.source            torchvision | timm | auto: the file's naming (scaling.weights)
    init.mode              scratch | linear_probe | finetune | finetune_bn
    init.new_head          True: drop the file's classifier and train a fresh one
    init.head_lr_mult      learning rate of the head = train.lr schedule x this
    init.backbone_lr_mult  ... and of everything else

Modes:
  scratch       random initialisation (init.path empty); everything trains, BatchNorm as usual.
  linear_probe  only the head trains. The network runs in inference mode (BatchNorm on its
                running statistics, dropout and drop-path off): the backbone is a fixed
                feature extractor. Its parameters and statistics stay bit-identical.
  finetune      everything trains; BatchNorm normalises with the running statistics and
                keeps them frozen (as torchvision's FrozenBatchNorm), while dropout and
                drop-path stay active.
  finetune_bn   everything trains and the BatchNorm statistics update, as in normal training.
Models without BatchNorm (ViT) train the same under finetune and finetune_bn.

Frozen parameters get neither gradients nor optimizer state: the step differentiates only
with respect to the trainable subset, and the optimizer is built on that subset
(`build_optimizer`). Per-group learning rates use `optax.multi_transform` with 'head' and
'backbone' labels; global-norm clipping, when set, applies to the gradients of both.
For a ViT at a new resolution build the model with that `image_size`: the file's position
embeddings are interpolated on load.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from scaling.train import optim

log = logging.getLogger(__name__)

MODES = ("scratch", "linear_probe", "finetune", "finetune_bn")
FILE_TYPES = (".safetensors", ".pth", ".pt", ".bin")


def default_init_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        path="",                 # pretrained weights; '' = none
        source="auto",           # torchvision | timm | auto
        mode="scratch",          # scratch | linear_probe | finetune | finetune_bn
        new_head=True,           # drop the file's classifier, train a fresh one
        head_lr_mult=1.0,
        backbone_lr_mult=1.0,
    ))


def validate_init_config(config: Any) -> None:
    """Raises ValueError naming the bad `init.*` field; a config without `init` trains from scratch."""
    from scaling.models import model_info
    from scaling.weights import FAMILIES, SOURCES

    init = config.get("init")
    if init is None:
        return
    if init.mode not in MODES:
        raise ValueError(f"init.mode: unknown {init.mode!r}; use one of {', '.join(MODES)}.")
    if init.source not in SOURCES:
        raise ValueError(f"init.source: unknown {init.source!r}; use one of {', '.join(SOURCES)}.")
    for field in ("head_lr_mult", "backbone_lr_mult"):
        if not init[field] > 0:
            raise ValueError(f"init.{field}={init[field]}: must be > 0 (freeze parameters with "
                             "init.mode=linear_probe instead).")
    path = init.path or ""
    if init.mode == "scratch":
        if path:
            raise ValueError(f"init.path={path!r} is set but init.mode='scratch' trains from a random "
                             "initialisation; choose init.mode=linear_probe, finetune or finetune_bn, "
                             "or clear init.path.")
        return
    if not path:
        raise ValueError(f"init.path: init.mode={init.mode!r} starts from pretrained weights; set "
                         "--config.init.path=/path/to/weights.safetensors (.pth/.pt with torch installed).")
    if os.path.splitext(path)[1].lower() not in FILE_TYPES:
        raise ValueError(f"init.path={path!r}: unsupported file type; use one of {', '.join(FILE_TYPES)}.")
    if not os.path.isfile(path):
        raise ValueError(f"init.path={path!r} does not exist or is not a file.")
    if not path.lower().endswith(".safetensors") and importlib.util.find_spec("torch") is None:
        raise ValueError(f"init.path={path!r} is a PyTorch pickle and reading it needs torch, an "
                         "optional extra (pip install torch); or convert it to .safetensors.")
    if model_info(config.model.name).weights not in FAMILIES:
        raise ValueError(f"model.name: {config.model.name!r} has no weight importer; init.path works "
                         f"with the models of the families {', '.join(sorted(FAMILIES))}.")


@contextlib.contextmanager
def _batchnorm_inference():
    """Every nn.BatchNorm in the forward pass normalises with its running statistics and
    leaves them unchanged, whatever `train` the model was called with."""
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
                and not module.use_running_average):
            frozen = module.clone(parent=None, use_running_average=True)
            return frozen.apply(module.variables, *args, **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a train step trains: `trainable` param keys (None = all), the head modules, the
    BatchNorm behaviour of `mode` and the per-group learning-rate multipliers."""
    mode: str = "scratch"
    trainable: frozenset | None = None
    heads: tuple[tuple[str, ...], ...] = ()
    head_lr_mult: float = 1.0
    backbone_lr_mult: float = 1.0

    @property
    def train(self) -> bool:
        """The `train` flag the model runs with (dropout, drop-path, BatchNorm mode)."""
        return self.mode != "linear_probe"

    @property
    def update_bn(self) -> bool:
        return self.mode in ("scratch", "finetune_bn")

    def frozen_bn(self):
        return _batchnorm_inference() if self.mode == "finetune" else contextlib.nullcontext()

    def split(self, params: Any) -> tuple[Any, Any]:
        """(trainable, frozen) sub-trees of `params`; frozen is None when everything trains."""
        if self.trainable is None:
            return params, None
        flat = flatten_dict(params)
        return (unflatten_dict({k: v for k, v in flat.items() if k in self.trainable}),
                unflatten_dict({k: v for k, v in flat.items() if k not in self.trainable}))

    def merge(self, trainable: Any, frozen: Any) -> Any:
        if frozen is None:
            return trainable
        return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})

    def is_head(self, key: tuple[str, ...]) -> bool:
        return any(key[:len(h)] == h for h in self.heads)

    def labels(self, params: Any) -> Any:
        flat = flatten_dict(params)
        return unflatten_dict({k: "head" if self.is_head(k) else "backbone" for k in flat})


TRAIN_ALL = Plan()


def make_plan(config: Any, model: Any, params: Any) -> Plan:
    """The plan of `config.init` for `model` with (abstract) `params`. The heads are those of
    the model's registry record (`ModelInfo.heads`) that `params` holds."""
    init = config.get("init")
    if init is None:
        return TRAIN_ALL
    from scaling.models import info_of

    keys = list(flatten_dict(params))
    info = info_of(model)
    heads = tuple(h for h in (tuple(p.split("/")) for p in (info.heads if info else ()))
                  if any(k[:len(h)] == h for k in keys))
    plan = Plan(init.mode, None, heads, float(init.head_lr_mult), float(init.backbone_lr_mult))
    if init.mode == "linear_probe":
        if not heads:
            raise ValueError(f"init.mode='linear_probe': {config.model.name!r} has no classifier head "
                             "here (include_top=False?); nothing would train.")
        plan = dataclasses.replace(plan, trainable=frozenset(k for k in keys if plan.is_head(k)))
    return plan


def build_optimizer(cfg: Any, plan: Plan, steps_per_epoch: int,
                    total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """`optim.build` for a plan: per-group learning rates, state only for trainable params.

    The returned transformation's `init` takes the full parameters (as `create_state` passes
    them) and keeps only the trainable ones; `update` sees the trainable subset, which is what
    the train step differentiates and updates."""
    schedule = optim.make_schedule(cfg, steps_per_epoch, total_steps)
    if plan.head_lr_mult == plan.backbone_lr_mult == 1.0:
        tx = optim.make_optimizer(cfg, schedule)
    else:
        inner = copy.deepcopy(cfg)
        inner.grad_clip_norm = 0.0   # clipped once below, over both groups
        groups = {g: optim.make_optimizer(inner, _scaled(schedule, m))
                  for g, m in (("head", plan.head_lr_mult), ("backbone", plan.backbone_lr_mult))}
        tx = optax.multi_transform(groups, plan.labels)
        if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
            tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    if plan.trainable is None:
        return tx, schedule
    return optax.GradientTransformation(lambda params: tx.init(plan.split(params)[0]), tx.update), schedule


def _scaled(schedule: Callable, mult: float) -> Callable:
    return lambda step: mult * schedule(step)


def initial_variables(config: Any, model: Any, rng: jax.Array, image_size: int) -> dict | None:
    """Variables loaded from `config.init.path` (None without one). `rng` is the train
    state's root key: a new head gets exactly the initial values a scratch run would."""
    init = config.get("init")
    if init is None or not init.path:
        return None
    from scaling.weights import load

    init_rng = jax.random.split(rng)[0]   # the key create_state hands to model.init
    variables = load(model, init.path, source=init.source, new_head=bool(init.new_head), rng=init_rng,
                     image_size=image_size)
    log.info("init: %s weights from %s (%s, new head: %s)", init.mode, init.path, init.source,
             bool(init.new_head))
    return variables

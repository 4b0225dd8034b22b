"""One registry for every architecture: `create_model(name, **overrides)` and one record per
model, `model_info(name)`.

Each family file registers its named variants with `register_model(name, factory, head=...,
...)`, where `factory` is usually a `functools.partial` of the family's Linen module. Overrides
are the module's own fields (width, depth, norm, dropout, num_classes, include_top, ...), so a
sweep can set any scaling knob by name.

The record (`ModelInfo`) holds everything else the code needs to know about a model, in one
place (as timm's `default_cfg`): its input (resolution, shape, modality), the normalisation and
eval crop its reference weights were trained with, the classifier head's parameter path, and
the weight-naming family that `scaling.weights` imports and exports with. The trainer, the data
defaults, weight import, fine-tuning and the summary all read it; nothing keys on class names.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from typing import Any, Callable

import flax.linen as nn
import ml_collections
from ml_collections import config_dict

# Per-channel normalisation on the 0-1 scale, as timm.data.constants and torchvision name them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)   # Google's [-1, 1] scaling
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

MODALITIES = ("image", "audio")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the code knows about one registered model besides its module.

    resolution     default input side in pixels (images) or length in samples (audio)
    channels       input channels: 3 (RGB) or 1 (a raw waveform)
    num_classes    head size of the reference model
    head           the classifier's parameter path in the module's tree ('fc', 'classifier_1',
                   'head', ...; '/' separates levels)
    aux_heads      auxiliary classifiers' paths, present when the module builds them
    weights        the family `scaling.weights` imports with (a key of its FAMILIES); None:
                   no importer
    modality       'image' or 'audio'
    mean, std      per-channel normalisation on the 0-1 scale of the reference weights
                   (images; None for audio)
    crop_fraction  eval crop: the shorter side is resized to resolution / crop_fraction, then
                   centre-cropped (images; None for audio)
    sample_rate    Hz (audio; None for images)
    """
    name: str
    head: str
    resolution: int = 224
    channels: int = 3
    num_classes: int = 1000
    aux_heads: tuple[str, ...] = ()
    weights: str | None = None
    modality: str = "image"
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    crop_fraction: float | None = 0.875
    sample_rate: int | None = None

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(f"model {self.name!r}: incomplete registry record: {problem}")

    def problem(self) -> str:
        """What makes this record incomplete or inconsistent ('' when nothing does)."""
        if self.modality not in MODALITIES:
            return f"modality={self.modality!r}; use one of {', '.join(MODALITIES)}"
        if not self.head or self.resolution < 1 or self.channels < 1 or self.num_classes < 1:
            return "head, resolution, channels and num_classes must all be set"
        if self.modality == "image":
            if not (self.mean and self.std and len(self.mean) == len(self.std) == self.channels):
                return f"an image model needs mean and std with {self.channels} values each"
            if min(self.std) <= 0 or not (self.crop_fraction and 0 < self.crop_fraction <= 1):
                return "std must be > 0 and crop_fraction in (0, 1]"
            if self.sample_rate is not None:
                return "sample_rate is for audio models"
        elif not self.sample_rate or (self.mean, self.std, self.crop_fraction) != (None, None, None):
            return "an audio model needs a sample_rate and no mean, std or crop_fraction"
        return ""

    @property
    def heads(self) -> tuple[str, ...]:
        """Every module whose shape depends on num_classes: the head, then the auxiliary ones."""
        return (self.head, *self.aux_heads)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example input at the default resolution: (H, W, C) or (T, C) for audio."""
        return self.input_shape_at(self.resolution)

    def input_shape_at(self, resolution: int | None = None) -> tuple[int, ...]:
        """Per-example input at `resolution` (None: the default)."""
        r = resolution or self.resolution
        return (r, r, self.channels) if self.modality == "image" else (r, self.channels)

    def __getitem__(self, field: str) -> Any:
        """`info['resolution']` reads `info.resolution` (records used to be dicts)."""
        return getattr(self, field)


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(name: str, factory: Callable[..., nn.Module], *, head: str, **info: Any) -> None:
    """Registers `factory` under `name` with its record: `head` and any other `ModelInfo`
    field (resolution, num_classes, aux_heads, weights, mean, std, crop_fraction, modality,
    channels, sample_rate); unset fields take the ImageNet/torchvision conventions."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _INFO[name] = ModelInfo(name=name, head=head, **info)
    _MODELS[name] = factory


def _module_class(factory: Callable[..., Any]) -> type | None:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory if isinstance(factory, type) else None


def _registered_fields(factory: Callable[..., Any]) -> dict[str, Any]:
    """The field values a factory fixes: its partials' keywords (outermost wins)."""
    fixed: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        fixed = {**factory.keywords, **fixed}
        factory = factory.func
    return fixed


def _fields(factory: Callable[..., Any]) -> list[str]:
    cls = _module_class(factory)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


def list_models(pattern: str = "*") -> list[str]:
    """Registered names, sorted; `pattern` is a shell glob such as 'resnet*'."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def check_model_name(name: str, field: str = "model.name") -> None:
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{field}: unknown model {name!r}.{hint} "
                         f"Known models: {', '.join(list_models())}.")


def model_info(name: str) -> ModelInfo:
    """The record of a registered model (see `ModelInfo`)."""
    check_model_name(name)
    return _INFO[name]


def info_of(model: nn.Module) -> ModelInfo | None:
    """The record of the registered model that `model` (a module instance) was built from, or
    None when its class is not registered. Among the names registered with the module's class,
    it is the one whose registered field values the module shares most (first registered on a
    tie), so efficientnet_b0 with width=0.5 still maps to efficientnet_b0 and not to
    tf_efficientnet_b0, which fixes other padding, naming and BatchNorm fields."""
    best, best_score = None, -1
    for name, factory in _MODELS.items():
        if _module_class(factory) is not type(model):
            continue
        score = sum(getattr(model, k, object()) == v for k, v in _registered_fields(factory).items())
        if score > best_score:
            best, best_score = name, score
    return _INFO[best] if best is not None else None


def model_fields(name: str) -> list[str]:
    """The fields (scaling knobs) that `create_model(name, **overrides)` accepts."""
    check_model_name(name)
    return _fields(_MODELS[name])


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Returns the Linen module for `name`, with `overrides` applied to its fields.

    Image models take NHWC float input and `train: bool`; `include_top=False` makes them
    return pooled features instead of logits. `model_info(name).input_shape` is the input.
    """
    check_model_name(name)
    factory = _MODELS[name]
    fields = _fields(factory)
    unknown = sorted(k for k in overrides if fields and k not in fields)
    if unknown:
        raise ValueError(f"model.{unknown[0]}: {name!r} has no field {unknown[0]!r}. "
                         f"Its fields are: {', '.join(fields)}.")
    return factory(**overrides)


# Fields a training config never carries in its model section: the head size and a ViT's
# image_size follow the data, the compute dtype follows train.compute_dtype, and a trained
# model has its head.
_NOT_IN_CONFIG = ("num_classes", "image_size", "dtype", "include_top")
_CONFIG_TYPES = (bool, int, float, str)


def default_model_config(name: str) -> ml_collections.ConfigDict:
    """The model section a config gets when it switches to model `name`: `name` and the
    model's scalar knobs (int, float, bool, str fields; None-valued ones as typed
    placeholders) at their registered values, so `--config.model.<knob>=v` overrides parse
    with the right type after the switch. Architecture tables (tuples such as stage_sizes)
    are not knobs and stay with the registered name. Building the section gives exactly
    `create_model(name)` (with the data's num_classes and image_size), except that a model
    whose record lists auxiliary heads (GoogLeNet, Inception v3) gets `aux_logits=True`: a
    training config trains them with their auxiliary classifiers, as their papers did
    (`--config.model.aux_logits=False` turns them off)."""
    check_model_name(name)
    factory = _MODELS[name]
    cls = _module_class(factory)
    section: dict[str, Any] = {"name": name}
    if cls is None or not dataclasses.is_dataclass(cls):
        return ml_collections.ConfigDict(section)
    fixed = _registered_fields(factory)
    for f in dataclasses.fields(cls):
        if f.name in ("parent", "name", *_NOT_IN_CONFIG):
            continue
        value = fixed.get(f.name, f.default)
        if value is None:
            kind = _optional_scalar(f.type)
            if kind is not None:
                section[f.name] = config_dict.placeholder(kind)
        elif type(value) in _CONFIG_TYPES:
            section[f.name] = value
    if _INFO[name].aux_heads and "aux_logits" in section:
        section["aux_logits"] = True
    return ml_collections.ConfigDict(section)


def _optional_scalar(annotation: Any) -> type | None:
    """A field annotation 'int | None' -> int (one scalar type or None); anything else -> None.
    Annotations are strings here (`from __future__ import annotations`)."""
    names = [n.strip() for n in str(annotation).split("|")]
    kinds = [t for t in _CONFIG_TYPES if t.__name__ in names]
    return kinds[0] if len(names) == 2 and "None" in names and len(kinds) == 1 else None

"""One registry for every architecture: `create_model(name, **overrides)`.

Each family file registers its named variants with `register_model(name, factory, ...)`,
where `factory` is usually a `functools.partial` of the family's Linen module. Overrides
are the module's own fields (width, depth, norm, dropout, num_classes, include_top, ...),
so a sweep can set any scaling knob by name.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from typing import Any, Callable

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, dict[str, Any]] = {}


def register_model(name: str, factory: Callable[..., nn.Module], *, resolution: int = 224,
                   num_classes: int = 1000, family: str | None = None, **info: Any) -> None:
    """Registers `factory` under `name` with its default input resolution and head size."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = factory
    family = family or getattr(_module_class(factory), "__name__", name)
    _INFO[name] = dict(resolution=resolution, num_classes=num_classes, family=family, **info)


def _module_class(factory: Callable[..., Any]) -> type | None:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory if isinstance(factory, type) else None


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
        close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{field}: unknown model {name!r}.{hint} "
                         f"Known models: {', '.join(list_models())}.")


def model_info(name: str) -> dict[str, Any]:
    """Default resolution, num_classes and family of a registered model."""
    check_model_name(name)
    return dict(_INFO[name])


def model_fields(name: str) -> list[str]:
    """The fields (scaling knobs) that `create_model(name, **overrides)` accepts."""
    check_model_name(name)
    return _fields(_MODELS[name])


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Returns the Linen module for `name`, with `overrides` applied to its fields.

    Every model takes NHWC float input and `train: bool`; `include_top=False` makes it
    return pooled features instead of logits.
    """
    check_model_name(name)
    factory = _MODELS[name]
    fields = _fields(factory)
    unknown = sorted(k for k in overrides if fields and k not in fields)
    if unknown:
        raise ValueError(f"model.{unknown[0]}: {name!r} has no field {unknown[0]!r}. "
                         f"Its fields are: {', '.join(fields)}.")
    return factory(**overrides)

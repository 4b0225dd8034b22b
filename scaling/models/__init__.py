"""Architectures as functional Flax Linen modules, one family per file, one registry.

    from scaling.models import create_model, list_models, model_info
    model = create_model("resnet50", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *model_info("resnet50").input_shape)),
                           train=False)
"""
import importlib
import pkgutil

from scaling.models.registry import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD,
                                     INCEPTION_MEAN, INCEPTION_STD, ModelInfo, check_model_name,
                                     create_model, default_model_config, info_of, list_models,
                                     model_fields, model_info, register_model)

_NOT_FAMILIES = {"registry", "layers"}

# Every other file in this package is one family that registers its variants on import.
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m not in _NOT_FAMILIES and not _m.startswith("_"):
        importlib.import_module(f"{__name__}.{_m}")

__all__ = ["create_model", "list_models", "model_info", "info_of", "model_fields", "register_model",
           "check_model_name", "default_model_config", "ModelInfo", "IMAGENET_MEAN", "IMAGENET_STD",
           "INCEPTION_MEAN", "INCEPTION_STD", "CIFAR10_MEAN", "CIFAR10_STD"]

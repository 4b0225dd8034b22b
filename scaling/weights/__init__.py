"""Pretrained weights from other ecosystems: torchvision / timm state dicts <-> our variables.

    from scaling import weights
    variables = weights.load("resnet18", "resnet18.safetensors")                # exact import
    variables = weights.load("resnet50", "resnet50.pth", num_classes=5, new_head=True)
    weights.save("wrn.safetensors", model, variables)                          # torch names/layouts

One generic rule maps torch keys onto our module paths (a `Sequential` index joins the name
before it: `layer1.0.conv1.weight` -> params/layer1_0/conv1/kernel, transposed); each family
lists only its exceptions (scaling.weights.families); a model's family and head are its
registry record's (`scaling.models.model_info(name).weights`, `.heads`). Anything that does not
fit raises one `WeightsMismatchError` listing every missing, unexpected and wrongly shaped
tensor. Covered: resnet*, wide_resnet*, CIFAR resnet*/wrn_*/densenet_*, vgg* (+bn),
alexnet/zfnet, googlenet, inception_v3, inception_v4, inception_resnet_v2, densenet*,
mobilenet_v1/v2/v3, efficientnet_b* (torchvision; timm's efficientnet_b* too),
tf_efficientnet_b* (timm), vit_* (timm and torchvision names).
"""
from scaling.weights.convert import (SOURCES, WeightsMismatchError, from_state_dict, load,
                                     path_to_torch_key, reference_key, save, to_state_dict,
                                     torch_key_to_path, variable_shapes)
from scaling.weights.families import FAMILIES, efficientnet_timm_to_torchvision, head_paths
from scaling.weights.io import read_metadata, read_state_dict, write_state_dict

__all__ = [
    "FAMILIES", "SOURCES", "WeightsMismatchError", "efficientnet_timm_to_torchvision",
    "from_state_dict", "head_paths", "load", "path_to_torch_key", "read_metadata",
    "read_state_dict", "reference_key", "save", "to_state_dict", "torch_key_to_path",
    "variable_shapes", "write_state_dict",
]

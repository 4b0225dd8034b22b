"""ResNets: torchvision's ImageNet ResNet / Wide ResNet, and He et al.'s CIFAR ResNets.

`ResNet` follows torchvision's layout (v1.5: the stride of a bottleneck block is on its 3x3
conv) and module names, so `layer1.0.conv1.weight` maps onto `layer1_0/conv1/kernel`:

    conv1, bn1, [maxpool], layer{i}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3]}
    layer{i}_{j}/{downsample_conv,downsample_bn}, fc

`CifarResNet` is the 6n+2 network of He et al. 2016, section 4.2: a 3x3 stem with 16
filters, three stages of n basic blocks with 16/32/64 filters and *option A* shortcuts by
default (identity, stride-2 subsampling and zero-padded extra channels: no parameters).
resnet20/32/44/56/110 have 0.27/0.46/0.66/0.85/1.7 M parameters with 10 classes.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.layers import Dtype, classifier, conv, global_avg_pool, make_norm
from scaling.models.registry import CIFAR10_MEAN, CIFAR10_STD, register_model

BLOCKS = ("basic", "bottleneck")
SHORTCUTS = ("A", "B")


# torch `Conv2d(padding=k // 2, bias=False)`; convs with tiny output maps run as a matmul.
torch_conv = functools.partial(conv, small_maps=True)


def pad_shortcut(x, features: int, strides: int):
    """Option A shortcut: subsample spatially by `strides`, zero-pad the new channels evenly."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _Block(nn.Module):
    """Shared shortcut and output of the residual blocks: conv projection (option B,
    torchvision's `downsample`) or the parameter-free option A, then add and ReLU."""

    def residual_out(self, x, y, features: int, norm: Callable):
        if x.shape[-1] != features or self.strides != 1:
            if self.shortcut == "A":
                x = pad_shortcut(x, features, self.strides)
            else:
                x = torch_conv(features, 1, self.strides, dtype=self.dtype, name="downsample_conv")(x)
                x = norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class BasicBlock(_Block):
    """3x3 conv -> norm -> ReLU -> 3x3 conv -> norm, plus the shortcut, then ReLU."""
    features: int
    strides: int = 1
    norm: Callable[..., nn.Module] = nn.BatchNorm
    zero_init_residual: bool = False
    shortcut: str = "B"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = torch_conv(self.features, 3, self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = torch_conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = self.norm(name="bn2", scale_init=last_scale)(y)
        return self.residual_out(x, y, self.features, self.norm)


class Bottleneck(_Block):
    """1x1 reduce -> 3x3 (strided, grouped) -> 1x1 expand (x4), torchvision v1.5."""
    features: int
    strides: int = 1
    norm: Callable[..., nn.Module] = nn.BatchNorm
    zero_init_residual: bool = False
    groups: int = 1
    width_per_group: int = 64
    shortcut: str = "B"
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = int(self.features * (self.width_per_group / 64.0)) * self.groups
        out = self.features * self.expansion
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = torch_conv(width, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = torch_conv(width, 3, self.strides, groups=self.groups, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = torch_conv(out, 1, dtype=self.dtype, name="conv3")(y)
        y = self.norm(name="bn3", scale_init=last_scale)(y)
        return self.residual_out(x, y, out, self.norm)


class ResNet(nn.Module):
    """torchvision ResNet / ResNeXt / Wide ResNet.

    `cifar_stem=True` replaces the 7x7/2 stem and max-pool with a 3x3/1 conv (for 32x32
    inputs). `zero_init_residual` starts the last norm of every block at scale 0.
    BatchNorm: epsilon 1e-5, flax momentum 0.9 (torch 0.1).
    """
    stage_sizes: Sequence[int]
    block: str = "basic"
    num_filters: int = 64
    width_per_group: int = 64
    groups: int = 1
    num_classes: int = 1000
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    zero_init_residual: bool = False
    cifar_stem: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"model.block: unknown block {self.block!r}; use one of {', '.join(BLOCKS)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        if self.block == "basic":
            block = functools.partial(BasicBlock, norm=norm, zero_init_residual=self.zero_init_residual,
                                      dtype=self.dtype)
        else:
            block = functools.partial(Bottleneck, norm=norm, zero_init_residual=self.zero_init_residual,
                                      groups=self.groups, width_per_group=self.width_per_group,
                                      dtype=self.dtype)
        x = x.astype(self.dtype)
        if self.cifar_stem:
            x = torch_conv(self.num_filters, 3, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
        else:
            x = torch_conv(self.num_filters, 7, 2, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(self.num_filters * 2 ** i, strides, name=f"layer{i + 1}_{j}")(x, train)
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, self.dropout, train, self.dtype)


class CifarResNet(nn.Module):
    """He et al. 2016 (sec. 4.2) CIFAR ResNet: depth = 6n + 2, stages of n basic blocks with
    `num_filters` x (1, 2, 4) channels, 3x3 stem, no max-pool.

    `shortcut='A'` (the paper's CIFAR choice, default): identity shortcuts, subsampled with
    stride 2 and zero-padded channels, no parameters. `shortcut='B'`: 1x1 conv + norm
    projections where the shape changes.
    """
    depth: int = 20
    num_filters: int = 16
    shortcut: str = "A"
    num_classes: int = 10
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    zero_init_residual: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.depth < 8 or (self.depth - 2) % 6:
            valid = ", ".join(str(6 * n + 2) for n in (1, 2, 3, 5, 7, 9, 18))
            raise ValueError(f"model.depth: CIFAR ResNet depth must be 6n + 2 (n >= 1), got "
                             f"{self.depth}; e.g. {valid}.")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"model.shortcut: unknown shortcut {self.shortcut!r}; use one of "
                             f"{', '.join(SHORTCUTS)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        n = (self.depth - 2) // 6
        x = torch_conv(self.num_filters, 3, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        x = nn.relu(norm(name="bn1")(x))
        for i in range(3):
            for j in range(n):
                x = BasicBlock(self.num_filters * 2 ** i, 2 if i > 0 and j == 0 else 1, norm=norm,
                               zero_init_residual=self.zero_init_residual, shortcut=self.shortcut,
                               dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, self.dropout, train, self.dtype)


_IMAGENET = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": dict(stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    "resnet200": dict(stage_sizes=(3, 24, 36, 3), block="bottleneck"),
    "wide_resnet50_2": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", width_per_group=128),
    "wide_resnet101_2": dict(stage_sizes=(3, 4, 23, 3), block="bottleneck", width_per_group=128),
}
for _name, _kw in _IMAGENET.items():
    register_model(_name, functools.partial(ResNet, **_kw), head="fc", weights="resnet")

for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", functools.partial(CifarResNet, depth=_depth), head="fc",
                   weights="cifar_resnet", resolution=32, num_classes=10, mean=CIFAR10_MEAN,
                   std=CIFAR10_STD)

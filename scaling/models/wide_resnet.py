"""Wide Residual Networks (Zagoruyko & Komodakis 2016) for CIFAR: WRN-d-k with l convs per block.

Pre-activation blocks (norm -> ReLU -> conv), a 3x3 stem with 16 filters, three groups of
N blocks with 16k, 32k and 64k channels (strides 1, 2, 2), a final norm -> ReLU, global
average pooling and the linear head. As in the reference PyTorch implementation, a block
whose input and output shapes differ gets a 1x1 projection shortcut that reads the block's
first norm-ReLU output; otherwise the shortcut is the identity. Dropout, when set, sits
between the convs of a block (so it has no effect when l = 1).
BatchNorm: epsilon 1e-5, flax momentum 0.9 (torch defaults).

Module names follow the reference (`block1.layer.0.conv1` -> `block1_0/conv1`):
conv1, block{g}_{i}/{bn1,conv1,bn2,conv2,...,conv_shortcut}, bn1 (final), fc.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.layers import Dtype, classifier, global_avg_pool, make_norm
from scaling.models.registry import CIFAR10_MEAN, CIFAR10_STD, register_model
from scaling.models.resnet import torch_conv

_BLOCK_TYPE = re.compile(r"^B\((\d+(?:,\d+)*)\)$")


def block_kernels(block_type: str, convs_per_block: int) -> tuple[int, ...]:
    """Kernel sizes of the convs in one block.

    An all-3x3 type (the default 'B(3,3)') names the basic block family: `convs_per_block`
    3x3 convs (l=1 'B(3)', l=3 'B(3,3,3)', ...). A mixed type such as 'B(1,3,1)' or 'B(3,1)'
    is taken literally and must have `convs_per_block` entries.
    """
    match = _BLOCK_TYPE.match(block_type.replace(" ", ""))
    if match is None:
        raise ValueError(f"model.block_type: {block_type!r} is not of the form 'B(k1,k2,...)' "
                         "with odd kernel sizes, e.g. 'B(3,3)', 'B(1,3,1)', 'B(3,1)'.")
    kernels = tuple(int(k) for k in match.group(1).split(","))
    if any(k % 2 == 0 for k in kernels):
        raise ValueError(f"model.block_type: kernel sizes in {block_type!r} must be odd.")
    if set(kernels) == {3}:
        return (3,) * convs_per_block
    if len(kernels) != convs_per_block:
        raise ValueError(f"model.convs_per_block: block_type {block_type!r} has {len(kernels)} convs; "
                         f"set model.convs_per_block={len(kernels)}.")
    return kernels


def valid_depths(convs_per_block: int, count: int = 6) -> list[int]:
    return [3 * n * convs_per_block + 4 for n in range(1, count + 1)]


class WideBlock(nn.Module):
    """Pre-activation block: [norm -> ReLU -> (dropout) -> conv] x l, plus the shortcut."""
    features: int
    strides: int = 1
    kernels: Sequence[int] = (3, 3)
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        project = x.shape[-1] != self.features or self.strides != 1
        y = x
        for j, k in enumerate(self.kernels):
            y = nn.relu(self.norm(name=f"bn{j + 1}")(y))
            if j == 0 and project:
                x = y  # the projection shares the first pre-activation, as the reference
            if j > 0 and self.dropout > 0:
                y = nn.Dropout(self.dropout, deterministic=not train)(y)
            y = torch_conv(self.features, k, self.strides if j == 0 else 1, dtype=self.dtype,
                           name=f"conv{j + 1}")(y)
        if project:
            x = torch_conv(self.features, 1, self.strides, dtype=self.dtype, name="conv_shortcut")(x)
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-k with l = `convs_per_block` convs per block.

    Depth rule: depth = 3 * N * l + 4, i.e. N = (depth - 4) / (3 l) blocks per group
    (for the paper's l = 2: N = (depth - 4) / 6, so WRN-28-10 has N = 4; l = 1 allows
    depths 7, 10, 13, ...). Invalid depths raise a ValueError listing valid ones.
    """
    depth: int = 28
    widen_factor: int = 10
    convs_per_block: int = 2
    dropout: float = 0.0
    num_classes: int = 10
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    block_type: str = "B(3,3)"

    def __post_init__(self):
        if self.convs_per_block < 1:
            raise ValueError(f"model.convs_per_block must be >= 1, got {self.convs_per_block}.")
        if self.widen_factor <= 0:
            raise ValueError(f"model.widen_factor must be > 0, got {self.widen_factor}.")
        block_kernels(self.block_type, self.convs_per_block)
        l = self.convs_per_block
        if self.depth < 3 * l + 4 or (self.depth - 4) % (3 * l):
            raise ValueError(f"model.depth: WRN depth must be 3 * N * l + 4 with l = convs_per_block "
                             f"= {l}, got {self.depth}; valid depths: "
                             f"{', '.join(map(str, valid_depths(l)))}, ...")
        super().__post_init__()

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // (3 * self.convs_per_block)

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        block = functools.partial(WideBlock, kernels=block_kernels(self.block_type, self.convs_per_block),
                                  norm=norm, dropout=self.dropout, dtype=self.dtype)
        x = torch_conv(16, 3, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        for g in range(3):
            features = int(round(16 * 2 ** g * self.widen_factor))
            for i in range(self.blocks_per_group):
                x = block(features, 2 if g > 0 and i == 0 else 1, name=f"block{g + 1}_{i}")(x, train)
        x = nn.relu(norm(name="bn1")(x))
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, 0.0, train, self.dtype)


_CIFAR = dict(head="fc", weights="wide_resnet", resolution=32, num_classes=10, mean=CIFAR10_MEAN,
              std=CIFAR10_STD)
register_model("wide_resnet", WideResNet, **_CIFAR)
for _d, _k in ((16, 1), (16, 2), (16, 4), (16, 8), (22, 8), (28, 2), (28, 10),
               (40, 1), (40, 2), (40, 4), (40, 8)):
    register_model(f"wrn_{_d}_{_k}", functools.partial(WideResNet, depth=_d, widen_factor=_k), **_CIFAR)

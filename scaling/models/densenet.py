"""DenseNets (Huang et al. 2017): torchvision's ImageNet models and the paper's CIFAR models.

Every dense layer sees the concatenation of all earlier feature maps in its block and adds
`growth_rate` (k) new ones: norm -> ReLU -> [1x1 conv to bn_size * k -> norm -> ReLU] -> 3x3
conv to k (the bracket is the "B" bottleneck). Transitions between blocks are norm -> ReLU ->
1x1 conv to floor(compression * channels) -> 2x2 average pool ("C" when compression < 1).
After the last block: norm -> ReLU -> global average pool -> linear classifier.
Dropout, when set, follows every conv except the first (the paper's rule; torchvision
drops only after a dense layer's 3x3 conv).
BatchNorm: epsilon 1e-5, flax momentum 0.9 (torch defaults).

- `DenseNet`: torchvision's densenet121/161/169/201: 7x7/2 stem conv with
  `num_init_features` channels, norm, ReLU, 3x3/2 max pool, four blocks, bn_size 4,
  compression 0.5.
- `CifarDenseNet`: the paper's CIFAR networks of depth L: a 3x3 stem conv (16 channels, or
  2k with bottlenecks) and three blocks of (L - 4) / 3 layers, or (L - 4) / 6 with
  bottlenecks. DenseNet (L=40, k=12) has 1,019,722 parameters and DenseNet-BC (L=100, k=12,
  compression 0.5) 769,162 for 10 classes.

Names follow torchvision's state dict (`features.denseblock1.denselayer1.norm1.weight` ->
`features/denseblock1/denselayer1/norm1/scale`): features/{conv0, norm0, denseblock{i}/
denselayer{j}/{norm1, conv1, norm2, conv2}, transition{i}/{norm, conv}, norm{blocks + 1}},
classifier. The CIFAR model has no norm0, and its final norm is norm4.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.layers import Dtype, classifier, conv, conv_init_fan_in, global_avg_pool, make_norm
from scaling.models.registry import CIFAR10_MEAN, CIFAR10_STD, register_model

# torchvision: kaiming_normal_ with its defaults (fan_in, ReLU gain), untruncated.
_conv = functools.partial(conv, kernel_init=conv_init_fan_in)


class DenseLayer(nn.Module):
    """norm -> ReLU -> [1x1 conv (bn_size * k) -> norm -> ReLU] -> 3x3 conv (k); returns the k new maps."""
    growth_rate: int
    bn_size: int | None = 4
    dropout: float = 0.0
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        def drop(y):
            return nn.Dropout(self.dropout, deterministic=not train)(y) if self.dropout > 0 else y

        y = nn.relu(self.norm(name="norm1")(x))
        if self.bn_size:
            y = drop(_conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name="conv1")(y))
            y = nn.relu(self.norm(name="norm2")(y))
            return drop(_conv(self.growth_rate, 3, dtype=self.dtype, name="conv2")(y))
        return drop(_conv(self.growth_rate, 3, dtype=self.dtype, name="conv1")(y))


class DenseBlock(nn.Module):
    """`num_layers` dense layers (`denselayer1`, ...), each fed the concatenation of all before;
    `layer` builds one (a `DenseLayer` partial)."""
    num_layers: int
    layer: Callable[..., nn.Module] = DenseLayer

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, self.layer(name=f"denselayer{j + 1}")(x, train)], axis=-1)
        return x


class Transition(nn.Module):
    """norm -> ReLU -> 1x1 conv to `features` -> 2x2 average pool (stride 2)."""
    features: int
    dropout: float = 0.0
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _conv(self.features, 1, dtype=self.dtype, name="conv")(nn.relu(self.norm(name="norm")(x)))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseFeatures(nn.Module):
    """torchvision's `features`: stem, dense blocks with transitions between them, final norm."""
    block_config: Sequence[int]
    growth_rate: int
    num_init_features: int
    bn_size: int | None = 4
    compression: float = 0.5
    dropout: float = 0.0
    cifar_stem: bool = False
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.cifar_stem:
            x = _conv(self.num_init_features, 3, dtype=self.dtype, name="conv0")(x)
        else:
            x = _conv(self.num_init_features, 7, 2, dtype=self.dtype, name="conv0")(x)
            x = nn.relu(self.norm(name="norm0")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        layer = functools.partial(DenseLayer, self.growth_rate, self.bn_size, self.dropout, self.norm, self.dtype)
        for i, n in enumerate(self.block_config):
            x = DenseBlock(n, layer, name=f"denseblock{i + 1}")(x, train)
            if i != len(self.block_config) - 1:
                x = Transition(int(math.floor(self.compression * x.shape[-1])), self.dropout, self.norm,
                               self.dtype, name=f"transition{i + 1}")(x, train)
        return self.norm(name=f"norm{len(self.block_config) + 1}")(x)


def _check(compression: float, growth_rate: int, dropout: float) -> None:
    if not 0 < compression <= 1:
        raise ValueError(f"model.compression must be in (0, 1], got {compression}.")
    if growth_rate < 1:
        raise ValueError(f"model.growth_rate must be >= 1, got {growth_rate}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}.")


class _DenseNetBase(nn.Module):
    def features_and_head(self, x, train: bool, **features_kw):
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        x = DenseFeatures(growth_rate=self.growth_rate, compression=self.compression, dropout=self.dropout,
                          norm=norm, dtype=self.dtype, name="features", **features_kw)(
                              x.astype(self.dtype), train)
        x = global_avg_pool(nn.relu(x))
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, 0.0, train, self.dtype, "classifier")


class DenseNet(_DenseNetBase):
    """torchvision DenseNet-BC for ImageNet (7x7/2 stem + max pool, bottlenecks, compression)."""
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    dropout: float = 0.0
    num_classes: int = 1000
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check(self.compression, self.growth_rate, self.dropout)
        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"model.block_config: need one or more blocks of >= 1 layers, got "
                             f"{tuple(self.block_config)}.")
        if self.bn_size < 1:
            raise ValueError(f"model.bn_size must be >= 1, got {self.bn_size}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.features_and_head(x, train, block_config=tuple(self.block_config), bn_size=self.bn_size,
                                      num_init_features=self.num_init_features)


class CifarDenseNet(_DenseNetBase):
    """The DenseNet paper's CIFAR network of depth L with three dense blocks.

    Layers per block: (L - 4) / 3, or (L - 4) / 6 with `bottleneck` (each layer then has two
    convs; bottleneck width `bn_size` * k). `num_init_features` defaults to 2k with bottlenecks,
    else 16. DenseNet-BC = `bottleneck=True, compression=0.5`.
    """
    depth: int = 40
    growth_rate: int = 12
    bottleneck: bool = False
    compression: float = 1.0
    dropout: float = 0.0
    num_init_features: int | None = None
    bn_size: int = 4
    num_classes: int = 10
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check(self.compression, self.growth_rate, self.dropout)
        step = 6 if self.bottleneck else 3
        if self.depth < step + 4 or (self.depth - 4) % step:
            valid = ", ".join(str(step * n + 4) for n in (1, 2, 4, 6, 8, 12, 16))
            raise ValueError(f"model.depth: a CIFAR DenseNet {'with' if self.bottleneck else 'without'} "
                             f"bottlenecks needs depth = {step} n + 4, got {self.depth}; e.g. {valid}.")
        super().__post_init__()

    @property
    def layers_per_block(self) -> int:
        return (self.depth - 4) // (6 if self.bottleneck else 3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = self.num_init_features or (2 * self.growth_rate if self.bottleneck else 16)
        return self.features_and_head(x, train, block_config=(self.layers_per_block,) * 3,
                                      bn_size=self.bn_size if self.bottleneck else None,
                                      num_init_features=init, cifar_stem=True)


_IMAGENET = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}
for _name, _kw in _IMAGENET.items():
    register_model(_name, functools.partial(DenseNet, **_kw), head="classifier", weights="densenet")

# The paper's CIFAR table (Table 2): DenseNet (L, k) and DenseNet-BC (L, k).
_CIFAR = dict(head="classifier", weights="cifar_densenet", resolution=32, num_classes=10,
              mean=CIFAR10_MEAN, std=CIFAR10_STD)
for _depth, _k in ((40, 12), (100, 12), (100, 24)):
    register_model(f"densenet_{_depth}_{_k}", functools.partial(CifarDenseNet, depth=_depth, growth_rate=_k),
                   **_CIFAR)
# Larger BC variants of the table: create_model("densenet_bc_100_12", depth=250, growth_rate=24), ...
register_model("densenet_bc_100_12", functools.partial(CifarDenseNet, depth=100, growth_rate=12, bottleneck=True,
                                                       compression=0.5),
               **_CIFAR)

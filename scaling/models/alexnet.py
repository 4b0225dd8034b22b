"""AlexNet (torchvision layout) and ZFNet (Zeiler & Fergus 2013), plus the torch-`Sequential`
pieces they share with VGG (`scaling.models.vgg`).

Both are a `features` stack of conv -> [norm] -> ReLU layers with max pools (and, for ZFNet,
local response normalisation), torch's `AdaptiveAvgPool2d` to a fixed map, a flatten in torch
order (C, H, W) and a 3-layer classifier. Submodules are named by their index in the
reference `nn.Sequential`, so a torchvision state dict maps on mechanically
(`features.3.weight` -> `features_3/kernel`, `classifier.4.weight` -> `classifier_4/kernel`,
transposing the kernels). Parameter-free layers (ReLU, pools, LRN, dropout) still take an
index, exactly as in torch.

`AlexNet()` is torchvision's `alexnet` (one-GPU "One weird trick" variant: 64-192-384-256-256
channels, no LRN), 61.1 M parameters. `AlexNet(layers=ZFNET)` is ZFNet (paper Fig. 3):

    conv 7x7/2, 96 (pad 1)  -> 110x110, ReLU, max pool 3x3/2 -> 55x55, LRN
    conv 5x5/2, 256 (pad 0) -> 26x26,   ReLU, max pool 3x3/2 -> 13x13, LRN
    conv 3x3, 384 -> conv 3x3, 384 -> conv 3x3, 256 (pad 1, ReLU each), max pool 3x3/2 -> 6x6
    fc 4096 -> fc 4096 -> fc num_classes, dropout 0.5 on fc6 and fc7 inputs

The pools use torch's `ceil_mode=True` (Caffe's rounding): that is what reproduces the
paper's 110 -> 55 -> 26 -> 13 -> 6 map sizes at 224. LRN uses the parameters of Krizhevsky
et al. (n=5, alpha=1e-4 not divided by n, beta=0.75, k=2), i.e. `LRN_PAPER` below in torch
semantics. 62,357,608 parameters with 1000 classes.

Fields (the scaling knobs): `width` multiplies every conv's channels (classifier unchanged;
`hidden` sets the two hidden classifier layers), `norm` adds a normalization after every conv
(None/'none' = none, as the references; 'batch' | 'layer' | 'instance' | 'group'),
`avgpool_size` is the adaptive pool's output (None: flatten the raw map, as Keras does),
`dropout`, `dtype` (compute dtype; params stay float32).
`include_top=False` returns the global average of the last feature map, [N, 256 x width].
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.layers import (NORMS, Dtype, LocalResponseNorm, adaptive_avg_pool, dense_init,
                                   global_avg_pool, logits_dense, make_norm, max_pool,
                                   torch_flatten)
from scaling.models.layers import conv as conv2d
from scaling.models.registry import register_model

# Krizhevsky et al. 2012's LRN (alpha=1e-4 on the plain sum) in torch semantics (alpha / size).
LRN_PAPER = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> tuple:
    """A conv -> [norm] -> ReLU entry of a `layers` table (torch `Conv2d(..., padding)`)."""
    return ("conv", features, kernel, stride, padding)


def pool(kernel: int = 2, stride: int = 2, ceil_mode: bool = False) -> tuple:
    """A torch `MaxPool2d(kernel, stride, ceil_mode=...)` entry of a `layers` table."""
    return ("pool", kernel, stride, ceil_mode)


LRN = ("lrn",)

TORCHVISION_ALEXNET = (conv(64, 11, 4, 2), pool(3, 2), conv(192, 5, 1, 2), pool(3, 2),
                       conv(384), conv(256), conv(256), pool(3, 2))
ZFNET = (conv(96, 7, 2, 1), pool(3, 2, True), LRN, conv(256, 5, 2, 0), pool(3, 2, True), LRN,
         conv(384), conv(384), conv(256), pool(3, 2, True))


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def validate_fields(norm: str | None, width: float, avgpool_size: int | None, dropout: float) -> None:
    """Config checks shared by AlexNet/ZFNet/VGG; raise before anything is traced."""
    if norm not in (None, "none") + NORMS:
        raise ValueError(f"model.norm: unknown normalization {norm!r}; use one of "
                         f"None, 'none', {', '.join(repr(n) for n in NORMS)}.")
    if not width > 0:
        raise ValueError(f"model.width: must be > 0, got {width}.")
    if avgpool_size is not None and avgpool_size < 1:
        raise ValueError(f"model.avgpool_size: must be a positive int or None, got {avgpool_size}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout: must be in [0, 1), got {dropout}.")


def norm_layer(norm: str | None, train: bool, dtype: Dtype) -> Callable[..., nn.Module] | None:
    """None for plain nets; else the make_norm constructor (BatchNorm: torch eps 1e-5, momentum 0.1)."""
    if norm in (None, "none"):
        return None
    return make_norm(norm, train=train, momentum=0.9, epsilon=1e-5, dtype=dtype)


def torch_sequential(x, layers: Sequence[tuple], *, width: float, norm: Callable | None,
                     dtype: Dtype, kernel_init: Callable, prefix: str = "features"):
    """Runs a `layers` table, naming each module `{prefix}_{index in the torch Sequential}`.

    A conv entry is conv [+ norm] + ReLU, i.e. 2 or 3 torch modules; pools and LRN are one.
    Must be called from a compact method (the modules attach to the caller).
    """
    i = 0
    for layer in layers:
        kind = layer[0]
        if kind == "conv":
            _, features, kernel, stride, pad = layer
            x = conv2d(scaled(features, width), kernel, stride, padding=pad, use_bias=True,
                       kernel_init=kernel_init, small_maps=True, dtype=dtype, name=f"{prefix}_{i}")(x)
            i += 1
            if norm is not None:
                x = norm(name=f"{prefix}_{i}")(x)
                i += 1
            x = nn.relu(x)
        elif kind == "pool":
            _, kernel, stride, ceil_mode = layer
            x = max_pool(x, kernel, stride, ceil_mode=ceil_mode)
        elif kind == "lrn":
            x = LocalResponseNorm(**LRN_PAPER, name=f"{prefix}_{i}")(x)
        else:
            raise ValueError(f"model.layers: unknown layer kind {kind!r}; use conv, pool or lrn.")
        i += 1
    return x


def classifier_head(x, *, layout: str, include_top: bool, avgpool_size: int | None, hidden: int,
                    num_classes: int, dropout: float, train: bool, dtype: Dtype,
                    kernel_init: Callable):
    """Pooled features or logits from the last feature map.

    `include_top=False`: global average pool, [N, C]. Otherwise adaptive pool (unless None),
    torch-order flatten, then `layout` read as a torch Sequential: 'D' dropout, 'L' linear
    (named `classifier_{index}`; `hidden` units, the last one `num_classes`), 'R' ReLU.
    """
    if not include_top:
        return global_avg_pool(x)
    if avgpool_size is not None:
        x = adaptive_avg_pool(x, avgpool_size)
    x = torch_flatten(x)
    last = layout.rindex("L")
    for i, op in enumerate(layout):
        if op == "D":
            x = nn.Dropout(dropout, deterministic=not train)(x)
        elif op == "R":
            x = nn.relu(x)
        else:
            dense = functools.partial(logits_dense, num_classes) if i == last else functools.partial(
                nn.Dense, hidden)
            x = dense(dtype=dtype, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                      name=f"classifier_{i}")(x)
    return x


class AlexNet(nn.Module):
    """torchvision AlexNet (default `layers`) or ZFNet (`layers=ZFNET`); see the module doc.

    Initialisation is torch's default (kaiming-uniform a=sqrt(5) kernels), with zero biases.
    """
    layers: Sequence[tuple] = TORCHVISION_ALEXNET
    num_classes: int = 1000
    include_top: bool = True
    dropout: float = 0.5
    norm: str | None = None
    width: float = 1.0
    hidden: int = 4096
    avgpool_size: int | None = 6
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        validate_fields(self.norm, self.width, self.avgpool_size, self.dropout)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = torch_sequential(x.astype(self.dtype), self.layers, width=self.width,
                             norm=norm_layer(self.norm, train, self.dtype), dtype=self.dtype,
                             kernel_init=dense_init)
        # torchvision: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear.
        return classifier_head(x, layout="DLRDLRL", include_top=self.include_top,
                               avgpool_size=self.avgpool_size, hidden=self.hidden,
                               num_classes=self.num_classes, dropout=self.dropout, train=train,
                               dtype=self.dtype, kernel_init=dense_init)


# ZFNet has no published torch weights; it exports and imports under AlexNet's torchvision names.
register_model("alexnet", AlexNet, head="classifier_6", weights="alexnet")
register_model("zfnet", functools.partial(AlexNet, layers=ZFNET), head="classifier_6", weights="alexnet")

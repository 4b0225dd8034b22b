"""GoogLeNet (Inception v1, Szegedy et al. 2014, "Going Deeper with Convolutions"), torchvision's.

torchvision's layout and names, so `inception3a.branch2.0.conv.weight` maps onto
`inception3a/branch2_0/conv/kernel` (a `Sequential` index joins its parent's name with `_`):

    conv1, conv2, conv3, inception{3a,3b,4a,...,5b}/{branch1, branch2_0, branch2_1,
    branch3_0, branch3_1, branch4_1}, [aux1, aux2]/{conv, fc1, fc2}, fc

Every conv is torchvision's `BasicConv2d`: conv (no bias) -> BatchNorm (epsilon 1e-3, flax
momentum 0.9 = torch 0.1) -> ReLU, with submodules `conv` and `bn`. Max-pools use torch's
`ceil_mode=True` (224 -> 112 -> 56 -> 28 -> 14 -> 7); the smallest input is 15x15.

Differences from the paper, kept for parity with torchvision (and its ImageNet weights): the
"5x5" branch of every inception block is a 3x3 conv (torchvision issue #906), and every conv
has BatchNorm (the paper's network had none).

Auxiliary heads (`aux_logits=True`, off by default): two classifiers on inception4a and
inception4d (adaptive average pool to 4x4 -> 1x1 conv 128 -> fc1 1024 -> ReLU -> dropout 0.7
-> fc2). They add 6,379,984 parameters (13,004,888 in all for 1000 classes, 6,624,904
without). In train mode the model then returns `(logits, aux1, aux2)` (torchvision's
`GoogLeNetOutputs` orders them logits, aux2, aux1); in eval mode, and with
`include_top=False`, only the logits / features. `scaling.train.step` trains on the main loss
plus `aux_weight` (the paper's 0.3) times each auxiliary loss; evaluation sees the main head only.

The pieces shared with the later Inception networks (`scaled` channel counts, `final_pool`,
`transform_input`, `InceptionNet`) live here.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.layers import (ConvNormAct, Dtype, adaptive_avg_pool, classifier, dense_init,
                                   global_avg_pool, make_norm, max_pool, torch_flatten)
from scaling.models.registry import register_model


def scaled(channels: int, width_multiplier: float) -> int:
    """Channels of a conv under a width multiplier: rounded to the nearest integer, at least 1."""
    return max(1, int(round(channels * width_multiplier)))


def check_width(width_multiplier: float) -> None:
    if not width_multiplier > 0:
        raise ValueError(f"model.width_multiplier: must be > 0, got {width_multiplier}.")


def final_pool(x, min_resolution: int):
    """Global average pool of the last grid. Unpadded convs and pools shrink a too-small input
    to an empty grid (XLA allows zero-size arrays), which would average to NaN: raise instead."""
    if 0 in x.shape[1:3]:
        raise ValueError(f"model resolution: the input is too small for this network (its last "
                         f"grid is {x.shape[1]}x{x.shape[2]}); use at least "
                         f"{min_resolution}x{min_resolution}.")
    return global_avg_pool(x)


def transform_input(x):
    """torchvision's `transform_input`: re-normalises an ImageNet-mean/std-normalised input to
    the [-1, 1] scaling that the ported TensorFlow weights expect."""
    mean = jnp.array([0.485, 0.456, 0.406], x.dtype)
    std = jnp.array([0.229, 0.224, 0.225], x.dtype)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class Inception(nn.Module):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (the paper's 5x5) | 3x3 max-pool -> 1x1, concatenated."""
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(self.ch1x1, 1, name="branch1")(x)
        b2 = self.conv(self.ch3x3red, 1, name="branch2_0")(x)
        b2 = self.conv(self.ch3x3, 3, name="branch2_1")(b2)
        b3 = self.conv(self.ch5x5red, 1, name="branch3_0")(x)
        b3 = self.conv(self.ch5x5, 3, name="branch3_1")(b3)  # torchvision: 3x3, not 5x5
        b4 = max_pool(x, 3, 1, padding=1, ceil_mode=True)
        b4 = self.conv(self.pool_proj, 1, name="branch4_1")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: adaptive avg-pool 4x4 -> 1x1 conv -> fc1 -> ReLU -> dropout -> fc2."""
    num_classes: int
    conv: Callable[..., nn.Module]
    channels: int = 128
    hidden: int = 1024
    dropout: float = 0.7
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = adaptive_avg_pool(x, 4)
        x = torch_flatten(self.conv(self.channels, 1, name="conv")(x))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x))
        return classifier(x, self.num_classes, self.dropout, train, self.dtype, name="fc2")


# (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) per block; a max-pool follows 3b and 4e.
GOOGLENET_BLOCKS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class InceptionNet(nn.Module):
    """Fields and helpers shared by GoogLeNet and the Inception networks."""
    num_classes: int = 1000
    include_top: bool = True
    dropout: float = 0.0
    width_multiplier: float = 1.0
    norm: str = "batch"
    dtype: Dtype = jnp.float32

    MIN_RESOLUTION = 1  # smallest input whose last grid is not empty
    HEAD = "fc"         # the reference's name for the classifier

    def __post_init__(self):
        check_width(self.width_multiplier)
        if getattr(self, "aux_weight", 0.0) < 0:  # GoogLeNet and Inception v3 have one
            raise ValueError(f"model.aux_weight: must be >= 0, got {self.aux_weight}.")
        super().__post_init__()

    def layers(self, train: bool):
        """(conv, ch): `conv(features, kernel, strides=1, padding=None, *, name)` is torch's
        `BasicConv2d` (conv without bias -> norm, BN epsilon 1e-3 and flax momentum 0.9 -> ReLU;
        padding None = torch's k // 2, 'VALID' = 0); `ch(c)` scales a channel count."""
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-3, dtype=self.dtype)

        def conv(features, kernel, strides=1, padding=None, *, name):
            return ConvNormAct(features, kernel, strides, padding=padding, norm=norm,
                               dtype=self.dtype, name=name)
        return conv, functools.partial(scaled, width_multiplier=self.width_multiplier)

    def head(self, x, train: bool):
        """Global average pool, then (with `include_top`) dropout and the classifier."""
        x = final_pool(x, self.MIN_RESOLUTION)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, self.dropout, train, self.dtype, name=self.HEAD)


class GoogLeNet(InceptionNet):
    """torchvision GoogLeNet. `width_multiplier` scales every conv (and the auxiliary heads'
    hidden layers); the classifier reads whatever width the last block has.

    Returns logits [N, num_classes]; pooled features [N, C] with `include_top=False`;
    `(logits, aux1, aux2)` in train mode with `aux_logits=True`.
    """
    dropout: float = 0.2
    aux_logits: bool = False
    # Weight of each auxiliary head's loss in the training objective. Szegedy et al. 2014,
    # section 5: "the losses of the auxiliary classifiers were weighted by 0.3".
    aux_weight: float = 0.3
    aux_dropout: float = 0.7
    transform_input: bool = False

    MIN_RESOLUTION = 15

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, ch = self.layers(train)
        aux = functools.partial(InceptionAux, self.num_classes, conv, channels=ch(128),
                                hidden=ch(1024), dropout=self.aux_dropout, dtype=self.dtype)
        # Aux heads run in train mode; at init they are built whatever the mode, so one set of
        # variables serves both.
        run_aux = self.aux_logits and self.include_top and (train or self.is_initializing())
        aux_out = []

        x = x.astype(self.dtype)
        if self.transform_input:
            x = transform_input(x)
        x = conv(ch(64), 7, 2, name="conv1")(x)
        x = max_pool(x, 3, 2, ceil_mode=True)
        x = conv(ch(64), 1, name="conv2")(x)
        x = conv(ch(192), 3, name="conv3")(x)
        x = max_pool(x, 3, 2, ceil_mode=True)
        for block, widths in GOOGLENET_BLOCKS.items():
            x = Inception(*(ch(c) for c in widths), conv=conv, name=f"inception{block}")(x)
            if block in ("4a", "4d") and run_aux:
                aux_out.append(aux(name=f"aux{len(aux_out) + 1}")(x, train))
            if block == "3b":
                x = max_pool(x, 3, 2, ceil_mode=True)
            elif block == "4e":
                x = max_pool(x, 2, 2, ceil_mode=True)
        out = self.head(x, train)
        return (out, *aux_out) if aux_out and train else out


register_model("googlenet", GoogLeNet, head="fc", aux_heads=("aux1/fc2", "aux2/fc2"), weights="googlenet")

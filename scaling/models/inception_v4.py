"""Inception v4 and Inception-ResNet v2 (Szegedy et al. 2016, "Inception-v4, Inception-ResNet and
the Impact of Residual Connections on Learning"), as timm builds them (ported from the TF-slim
checkpoints): 299x299 input, 1536-d features, no dropout by default.

Module names are timm's; a `Sequential` index joins its parent's name with `_`, so
`features.4.branch1.2.conv.weight` -> `features_4/branch1_2/conv/kernel` and
`repeat_1.3.conv2d.bias` -> `repeat_1_3/conv2d/bias`:

    inception_v4:        features_0..features_21/<branches>, last_linear
    inception_resnet_v2: conv2d_1a, conv2d_2a, conv2d_2b, conv2d_3b, conv2d_4a, mixed_5b,
                         repeat_{0..9}, mixed_6a, repeat_1_{0..19}, mixed_7a, repeat_2_{0..8},
                         block8, conv2d_7b, classif

(so our top-level `repeat_1` is timm's `repeat.1`; timm's `repeat_1` is a `Sequential`
without parameters of its own, whose children become `repeat_1_<i>`).

Every conv block is conv (no bias) -> BatchNorm (epsilon 1e-3, flax momentum 0.9 = torch 0.1)
-> ReLU with submodules `conv` and `bn`; convs without explicit padding in timm are unpadded
('VALID'). Average pools exclude the padding (`count_include_pad=False`). The residual
blocks' 1x1 up-projection `conv2d` has a bias and no norm; its output is scaled (0.17, 0.10,
0.20 per stage) and added to the input, then ReLU (not after the last `block8`).

Scaling knobs beyond timm: `width_multiplier` (every conv's channels; residual projections
follow the trunk width) and `block_counts`, the number of repeated blocks per stage
(inception_v4: (4, 7, 3) Inception-A/B/C; inception_resnet_v2: (10, 20, 9) Block35/17/8, plus
the final `block8`). With 1000 classes: inception_v4 42,679,816 parameters (12.25 GMACs),
inception_resnet_v2 55,843,464 (13.16 GMACs). The smallest input both take is 75x75.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.googlenet import InceptionNet
from scaling.models.inception import VALID, avg_pool3
from scaling.models.layers import Dtype, dense_init
from scaling.models.registry import INCEPTION_MEAN, INCEPTION_STD, register_model

avg_pool = functools.partial(avg_pool3, count_include_pad=False)


def max_pool_s2(x):
    """torch `MaxPool2d(3, stride=2)`: unpadded, output size rounded down."""
    return nn.max_pool(x, (3, 3), (2, 2), padding=VALID)


class _Block(nn.Module):
    """A multi-branch block; `conv(features, kernel, strides=1, padding=None|VALID, name=...)`
    builds conv-BN-ReLU, `ch` scales a channel count."""
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]

    def chain(self, x, name: str, *layers):
        """torch `Sequential` of convs: `layers` are (features, kernel[, strides[, padding]])."""
        for i, (features, kernel, *rest) in enumerate(layers):
            x = self.conv(self.ch(features), kernel, *rest, name=f"{name}_{i}")(x)
        return x


# ----------------------------------------------------------------------------- Inception v4

class Mixed3a(_Block):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([max_pool_s2(x), self.conv(self.ch(96), 3, 2, VALID, name="conv")(x)], -1)


class Mixed4a(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.chain(x, "branch0", (64, 1), (96, 3, 1, VALID))
        b1 = self.chain(x, "branch1", (64, 1), (64, (1, 7)), (64, (7, 1)), (96, 3, 1, VALID))
        return jnp.concatenate([b0, b1], -1)


class Mixed5a(_Block):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([self.conv(self.ch(192), 3, 2, VALID, name="conv")(x), max_pool_s2(x)], -1)


class InceptionA(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(96), 1, name="branch0")(x)
        b1 = self.chain(x, "branch1", (64, 1), (96, 3))
        b2 = self.chain(x, "branch2", (64, 1), (96, 3), (96, 3))
        b3 = self.conv(self.ch(96), 1, name="branch3_1")(avg_pool(x))
        return jnp.concatenate([b0, b1, b2, b3], -1)


class ReductionA(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(384), 3, 2, VALID, name="branch0")(x)
        b1 = self.chain(x, "branch1", (192, 1), (224, 3), (256, 3, 2, VALID))
        return jnp.concatenate([b0, b1, max_pool_s2(x)], -1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(384), 1, name="branch0")(x)
        b1 = self.chain(x, "branch1", (192, 1), (224, (1, 7)), (256, (7, 1)))
        b2 = self.chain(x, "branch2", (192, 1), (192, (7, 1)), (224, (1, 7)), (224, (7, 1)),
                        (256, (1, 7)))
        b3 = self.conv(self.ch(128), 1, name="branch3_1")(avg_pool(x))
        return jnp.concatenate([b0, b1, b2, b3], -1)


class ReductionB(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.chain(x, "branch0", (192, 1), (192, 3, 2, VALID))
        b1 = self.chain(x, "branch1", (256, 1), (256, (1, 7)), (320, (7, 1)), (320, 3, 2, VALID))
        return jnp.concatenate([b0, b1, max_pool_s2(x)], -1)


class InceptionC(_Block):
    @nn.compact
    def __call__(self, x):
        conv, ch = self.conv, self.ch
        b0 = conv(ch(256), 1, name="branch0")(x)
        b1 = conv(ch(384), 1, name="branch1_0")(x)
        b1 = [conv(ch(256), (1, 3), name="branch1_1a")(b1), conv(ch(256), (3, 1), name="branch1_1b")(b1)]
        b2 = conv(ch(384), 1, name="branch2_0")(x)
        b2 = conv(ch(448), (3, 1), name="branch2_1")(b2)
        b2 = conv(ch(512), (1, 3), name="branch2_2")(b2)
        b2 = [conv(ch(256), (1, 3), name="branch2_3a")(b2), conv(ch(256), (3, 1), name="branch2_3b")(b2)]
        b3 = conv(ch(256), 1, name="branch3_1")(avg_pool(x))
        return jnp.concatenate([b0, *b1, *b2, b3], -1)


class _RepeatedBlocksNet(InceptionNet):
    """InceptionNet with a `block_counts` field: repeats of the three stages' blocks."""
    block_counts: Sequence[int] = (1, 1, 1)  # each subclass sets its reference counts

    MIN_RESOLUTION = 75

    def __post_init__(self):
        if len(self.block_counts) != 3 or any(int(n) < 0 for n in self.block_counts):
            default = type(self).__dataclass_fields__["block_counts"].default
            raise ValueError(f"model.block_counts: three non-negative repeat counts, one per stage "
                             f"(default {tuple(default)}); got {tuple(self.block_counts)}.")
        super().__post_init__()


class InceptionV4(_RepeatedBlocksNet):
    """timm `inception_v4`: stem (3 convs, Mixed3a/4a/5a), 4 x Inception-A, Reduction-A,
    7 x Inception-B, Reduction-B, 3 x Inception-C, all in `features`, then `last_linear`."""
    block_counts: Sequence[int] = (4, 7, 3)

    HEAD = "last_linear"

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, ch = self.layers(train)
        kw = dict(conv=conv, ch=ch)
        n_a, n_b, n_c = self.block_counts
        x = conv(ch(32), 3, 2, VALID, name="features_0")(x.astype(self.dtype))
        x = conv(ch(32), 3, 1, VALID, name="features_1")(x)
        x = conv(ch(64), 3, name="features_2")(x)
        stages = [Mixed3a, Mixed4a, Mixed5a, *[InceptionA] * n_a, ReductionA, *[InceptionB] * n_b,
                  ReductionB, *[InceptionC] * n_c]
        for i, block in enumerate(stages, start=3):
            x = block(**kw, name=f"features_{i}")(x)
        return self.head(x, train)


# ---------------------------------------------------------------------- Inception-ResNet v2

class _Residual(_Block):
    """Branches -> concat -> 1x1 conv (bias, no norm) back to the input width -> x scale +
    input -> ReLU (unless `no_relu`)."""
    scale: float = 1.0
    no_relu: bool = False
    dtype: Dtype = jnp.float32

    def residual(self, x, branches):
        y = jnp.concatenate(branches, -1)
        y = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, kernel_init=dense_init, name="conv2d")(y)
        y = y * self.scale + x
        return y if self.no_relu else nn.relu(y)


class Block35(_Residual):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(32), 1, name="branch0")(x)
        b1 = self.chain(x, "branch1", (32, 1), (32, 3))
        b2 = self.chain(x, "branch2", (32, 1), (48, 3), (64, 3))
        return self.residual(x, [b0, b1, b2])


class Block17(_Residual):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(192), 1, name="branch0")(x)
        b1 = self.chain(x, "branch1", (128, 1), (160, (1, 7)), (192, (7, 1)))
        return self.residual(x, [b0, b1])


class Block8(_Residual):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(192), 1, name="branch0")(x)
        b1 = self.chain(x, "branch1", (192, 1), (224, (1, 3)), (256, (3, 1)))
        return self.residual(x, [b0, b1])


class Mixed5b(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(96), 1, name="branch0")(x)
        b1 = self.chain(x, "branch1", (48, 1), (64, 5))
        b2 = self.chain(x, "branch2", (64, 1), (96, 3), (96, 3))
        b3 = self.conv(self.ch(64), 1, name="branch3_1")(avg_pool(x))
        return jnp.concatenate([b0, b1, b2, b3], -1)


class Mixed6a(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.conv(self.ch(384), 3, 2, VALID, name="branch0")(x)
        b1 = self.chain(x, "branch1", (256, 1), (256, 3), (384, 3, 2, VALID))
        return jnp.concatenate([b0, b1, max_pool_s2(x)], -1)


class Mixed7a(_Block):
    @nn.compact
    def __call__(self, x):
        b0 = self.chain(x, "branch0", (256, 1), (384, 3, 2, VALID))
        b1 = self.chain(x, "branch1", (256, 1), (288, 3, 2, VALID))
        b2 = self.chain(x, "branch2", (256, 1), (288, 3), (320, 3, 2, VALID))
        return jnp.concatenate([b0, b1, b2, max_pool_s2(x)], -1)


class InceptionResNetV2(_RepeatedBlocksNet):
    """timm `inception_resnet_v2`: stem, Mixed_5b, 10 x Block35 (x0.17), Mixed_6a,
    20 x Block17 (x0.10), Mixed_7a, 9 x Block8 (x0.20), Block8 (no ReLU), 1x1 conv to 1536,
    then `classif`."""
    block_counts: Sequence[int] = (10, 20, 9)
    residual_scales: Sequence[float] = (0.17, 0.10, 0.20)

    HEAD = "classif"

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, ch = self.layers(train)
        kw = dict(conv=conv, ch=ch)
        x = conv(ch(32), 3, 2, VALID, name="conv2d_1a")(x.astype(self.dtype))
        x = conv(ch(32), 3, 1, VALID, name="conv2d_2a")(x)
        x = conv(ch(64), 3, name="conv2d_2b")(x)
        x = max_pool_s2(x)
        x = conv(ch(80), 1, name="conv2d_3b")(x)
        x = conv(ch(192), 3, 1, VALID, name="conv2d_4a")(x)
        x = max_pool_s2(x)
        x = Mixed5b(**kw, name="mixed_5b")(x)
        stages = ((None, Block35, "repeat"), (Mixed6a, Block17, "repeat_1"), (Mixed7a, Block8, "repeat_2"))
        for (reduction, block, prefix), n, scale in zip(stages, self.block_counts, self.residual_scales):
            if reduction is not None:
                x = reduction(**kw, name="mixed_6a" if reduction is Mixed6a else "mixed_7a")(x)
            for i in range(n):
                x = block(**kw, scale=scale, dtype=self.dtype, name=f"{prefix}_{i}")(x)
        x = Block8(**kw, no_relu=True, dtype=self.dtype, name="block8")(x)
        x = conv(ch(1536), 1, name="conv2d_7b")(x)
        return self.head(x, train)


# timm's ports of the TensorFlow weights: inputs scaled to [-1, 1], timm's eval crops.
register_model("inception_v4", InceptionV4, head="last_linear", weights="inception_v4", resolution=299,
               mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_fraction=0.875)
register_model("inception_resnet_v2", InceptionResNetV2, head="classif", weights="inception_resnet_v2",
               resolution=299, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_fraction=0.8975)

"""MobileNets v1, v2 and v3 with the width multiplier `alpha` as a field.

The v1 paper's second knob, the resolution multiplier rho, is just the input size: every
model here runs at any resolution that survives its five stride-2 stages (32 and up, e.g.
128/160/192/224), and MACs scale with the square of it.

- `MobileNetV1`: timm's `mobilenetv1_100` layout (= Keras `MobileNet` trainable count):
  3x3/2 stem, 13 depthwise-separable blocks (depthwise 3x3 -> BN -> ReLU6 -> pointwise
  1x1 -> BN -> ReLU6, no skip), global pool, linear classifier. At 224, alpha 1.0 / 0.75 /
  0.5 / 0.25 has 569 / 325 / 149 / 41 M MACs and 4.2 / 2.6 / 1.3 / 0.5 M parameters.
  BatchNorm eps 1e-5, flax momentum 0.9 (timm defaults).
- `MobileNetV2`: torchvision's layout (inverted residuals with linear bottlenecks, ReLU6,
  classifier dropout 0.2). `naming='timm'` keeps the same network but names modules as timm's
  `mobilenetv2_*` (used by `mobilenet_v2_050`, a timm model). Channels are
  `round_filters(c, alpha)` (multiples of 8); the last conv stays 1280 for alpha <= 1 (torchvision, timm
  and Keras agree on all of this at alpha 0.5). BatchNorm eps 1e-5, flax momentum 0.9.
- `MobileNetV3`: torchvision's large/small (hard-swish, squeeze-excite gated by a hard
  sigmoid, SE width `round_filters(expanded // 4, 1.0)`, channels rounded to multiples of 8,
  classifier Linear -> hard-swish -> dropout -> Linear). BatchNorm eps 1e-3, torch momentum
  0.01 -> flax 0.99.

Module names follow the reference state dict with each numeric index joined to the name before
it: torchvision `features.2.conv.0.0.weight` -> `features_2/conv_0_0/kernel`,
`features.4.block.2.fc1` -> `features_4/block_2/fc1`, `classifier.1` -> `classifier_1`; timm
`blocks.1.0.conv_pw` -> `blocks_1_0/conv_pw`, `conv_stem`, `bn1`, `conv_head`, `bn2`,
`classifier`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.layers import (Dtype, InvertedResidual, activation, classifier, classifier_init,
                                   conv_bn, global_avg_pool, make_norm)
from scaling.models.registry import register_model
from scaling.scaling_rules import round_filters

NAMINGS = ("torchvision", "timm")
V3_ARCHS = ("large", "small")
# Classifier init: torchvision MobileNetV2/V3 normal(0, 0.01); timm U(+-1/sqrt(num_classes)).
HEAD_INIT = {"torchvision": nn.initializers.normal(0.01), "timm": classifier_init}


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"model.alpha: the width multiplier must be > 0, got {alpha}.")


def _check_naming(naming: str) -> None:
    if naming not in NAMINGS:
        raise ValueError(f"model.naming: unknown naming {naming!r}; use one of {', '.join(NAMINGS)}.")


# (channels, repeats, stride of the first block) per stage; timm `dsa_r{n}_k3_s{s}_c{c}`.
V1_STAGES = ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2))


class MobileNetV1(nn.Module):
    """MobileNet v1 (Howard et al. 2017), timm `mobilenetv1_*` layout and names.

    `alpha` scales every width (`round_filters(c, alpha)`, stem included, as timm);
    `stages` is the (channels, repeats, stride) table. ReLU6 throughout.
    """
    alpha: float = 1.0
    stages: Sequence[Sequence[int]] = V1_STAGES
    num_classes: int = 1000
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    dropout: float = 0.0

    def __post_init__(self):
        _check_alpha(self.alpha)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        x = conv_bn(x.astype(self.dtype), round_filters(32, self.alpha), 3, 2, act="relu6", norm=norm,
                    names=("conv_stem", "bn1"), dtype=self.dtype)
        for i, (c, n, s) in enumerate(self.stages):
            for j in range(n):
                x = InvertedResidual(round_filters(c, self.alpha), x.shape[-1], 3, s if j == 0 else 1,
                                     act="relu6", project_act="relu6", skip=False, naming="timm",
                                     norm=norm, dtype=self.dtype, name=f"blocks_{i}_{j}")(x)
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, self.dropout, train, self.dtype, "classifier", classifier_init)


# torchvision `inverted_residual_setting`: expansion t, channels c, repeats n, first stride s.
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), torchvision layout.

    Stem 3x3/2 with `round_filters(32, alpha)` channels, the (t, c, n, s) table of inverted
    residuals (hidden width round(in x t), channels `round_filters(c, alpha)`), a 1x1 conv to
    `round_filters(last_channel, max(1, alpha))` (1280 for alpha <= 1), pool, dropout, linear.
    `naming='timm'` names the same modules as timm's `mobilenetv2_*`.
    """
    alpha: float = 1.0
    inverted_residual_setting: Sequence[Sequence[int]] = V2_SETTING
    last_channel: int = 1280
    round_nearest: int = 8
    num_classes: int = 1000
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    dropout: float = 0.2
    naming: str = "torchvision"

    def __post_init__(self):
        _check_alpha(self.alpha)
        _check_naming(self.naming)
        if any(len(row) != 4 for row in self.inverted_residual_setting):
            raise ValueError("model.inverted_residual_setting: every row must be (t, c, n, s), got "
                             f"{self.inverted_residual_setting!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        timm = self.naming == "timm"
        norm = make_norm(self.norm, train=train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        rnd = functools.partial(round_filters, divisor=self.round_nearest)
        unit = functools.partial(conv_bn, act="relu6", norm=norm, dtype=self.dtype)
        x = unit(x.astype(self.dtype), rnd(32, self.alpha), 3, 2,
                 names=("conv_stem", "bn1") if timm else ("features_0_0", "features_0_1"))
        index = 1
        for stage, (t, c, n, s) in enumerate(self.inverted_residual_setting):
            for j in range(n):
                in_features = x.shape[-1]
                x = InvertedResidual(rnd(c, self.alpha), int(round(in_features * t)), 3, s if j == 0 else 1,
                                     act="relu6", naming="timm" if timm else "torchvision_v2", norm=norm,
                                     dtype=self.dtype,
                                     name=f"blocks_{stage}_{j}" if timm else f"features_{index}")(x)
                index += 1
        x = unit(x, rnd(self.last_channel, max(1.0, self.alpha)), 1,
                 names=("conv_head", "bn2") if timm else (f"features_{index}_0", f"features_{index}_1"))
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, self.dropout, train, self.dtype,
                          "classifier" if timm else "classifier_1", HEAD_INIT[self.naming])


# torchvision `_mobilenet_v3_conf` rows: kernel, expanded, out channels, SE, activation, stride
# (before the width multiplier). The input of the first row is the 16-channel stem.
V3_LARGE = ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
            (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
            (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
            (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
            (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1))
V3_SMALL = ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
            (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
            (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
            (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))
V3_CONFIGS = {"large": (V3_LARGE, 1280, 3), "small": (V3_SMALL, 1024, 3)}  # rows, last_channel, tail rows
_V3_ACTS = {"RE": "relu", "HS": "hard_swish"}


class MobileNetV3(nn.Module):
    """MobileNetV3 (Howard et al. 2019), torchvision layout and names.

    `arch` 'large' | 'small' picks the block table (or pass `inverted_residual_setting` rows
    (kernel, expanded, out, se, 'RE'|'HS', stride)). Every width is `round_filters(c, alpha)`;
    the last conv has 6x the last block's channels and the classifier's hidden layer
    `round_filters(last_channel, alpha)`. `reduced_tail` halves the last stage, as torchvision.
    `include_top=False` returns the pooled last-conv features (960 / 576 channels at alpha 1).
    """
    arch: str = "large"
    alpha: float = 1.0
    reduced_tail: bool = False
    inverted_residual_setting: Sequence[Sequence] | None = None
    last_channel: int | None = None
    num_classes: int = 1000
    include_top: bool = True
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    dropout: float = 0.2

    def __post_init__(self):
        _check_alpha(self.alpha)
        if self.arch not in V3_CONFIGS:
            raise ValueError(f"model.arch: unknown MobileNetV3 arch {self.arch!r}; use one of "
                             f"{', '.join(V3_ARCHS)}.")
        for row in self.inverted_residual_setting or ():
            if len(row) != 6 or row[4] not in _V3_ACTS:
                raise ValueError("model.inverted_residual_setting: every row must be (kernel, expanded, "
                                 f"out, se, 'RE'|'HS', stride), got {row!r}.")
        super().__post_init__()

    def block_table(self) -> tuple[tuple, int]:
        rows, last, tail = V3_CONFIGS[self.arch]
        if self.inverted_residual_setting is not None:
            rows, tail = self.inverted_residual_setting, 0
        last = self.last_channel or last
        if self.reduced_tail:
            # The last stage's outputs halve; its first block keeps the full expansion.
            head, tail_rows = rows[:len(rows) - tail], rows[len(rows) - tail:]
            rows = head + tuple((k, e if j == 0 else e // 2, c // 2, se, a, s)
                                for j, (k, e, c, se, a, s) in enumerate(tail_rows))
            last //= 2
        return tuple(rows), last

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = make_norm(self.norm, train=train, momentum=0.99, epsilon=1e-3, dtype=self.dtype)
        rnd = functools.partial(round_filters, width=self.alpha)
        rows, last_channel = self.block_table()
        unit = functools.partial(conv_bn, norm=norm, dtype=self.dtype)
        x = unit(x.astype(self.dtype), rnd(16), 3, 2, act="hard_swish", names=("features_0_0", "features_0_1"))
        for i, (k, e, c, se, a, s) in enumerate(rows):
            expanded = rnd(e)
            x = InvertedResidual(rnd(c), expanded, k, s, act=_V3_ACTS[a],
                                 se_features=round_filters(expanded // 4, 1.0) if se else 0,
                                 se_gate="hard_sigmoid", naming="torchvision", norm=norm, dtype=self.dtype,
                                 name=f"features_{i + 1}")(x)
        n = len(rows) + 1
        x = unit(x, 6 * x.shape[-1], 1, act="hard_swish", names=(f"features_{n}_0", f"features_{n}_1"))
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        x = nn.Dense(rnd(last_channel), dtype=self.dtype, kernel_init=HEAD_INIT["torchvision"],
                     name="classifier_0")(x)
        x = activation("hard_swish")(x)
        return classifier(x, self.num_classes, self.dropout, train, self.dtype, "classifier_3",
                          HEAD_INIT["torchvision"])


for _name, _alpha in (("mobilenet_v1", 1.0), ("mobilenet_v1_075", 0.75), ("mobilenet_v1_050", 0.5),
                      ("mobilenet_v1_025", 0.25)):
    register_model(_name, functools.partial(MobileNetV1, alpha=_alpha), head="classifier",
                   weights="mobilenet_v1")
register_model("mobilenet_v2", MobileNetV2, head="classifier_1", weights="mobilenet_v2")
# timm `mobilenetv2_050`: its channel rounding equals torchvision's at 0.5; timm names, no dropout.
register_model("mobilenet_v2_050", functools.partial(MobileNetV2, alpha=0.5, naming="timm", dropout=0.0),
               head="classifier", weights="mobilenet_v2")
for _arch in V3_ARCHS:
    register_model(f"mobilenet_v3_{_arch}", functools.partial(MobileNetV3, arch=_arch),
                   head="classifier_3", weights="mobilenet_v3")

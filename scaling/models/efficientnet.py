"""EfficientNet B0-B7 (Tan & Le 2019): MBConv blocks with squeeze-and-excitation, scaled by
width / depth coefficients (`scaling.scaling_rules`).

One module serves both references; the registered variants set the fields that differ:

- `efficientnet_b*`: torchvision. Symmetric padding, BatchNorm eps 1e-5 / torch momentum 0.1
  for b0-b4 and eps 1e-3 / momentum 0.01 for b5-b7; b2 is evaluated at 288 pixels.
- `tf_efficientnet_b*`: timm's port of the TensorFlow models. TensorFlow 'SAME' padding
  (asymmetric at stride 2), BatchNorm eps 1e-3, momentum 0.99 as the original TF training
  (timm itself keeps torch's default 0.1 for training; it does not change outputs).

Both have the same parameters; only outputs differ. With the weights of timm's
tf_efficientnet_b0 fixture (../shared/reference/fixtures), `tf_efficientnet_b0` reproduces its
logits to 4e-6 (float32). Module names follow the reference given
by `naming`, so that a state dict maps on by one rule: a numeric key component joins the
previous one with '_', every other component is one level (`blocks.1.0.se.conv_reduce.weight`
-> `blocks_1_0/se/conv_reduce/kernel`):

    naming='timm':        conv_stem, bn1, blocks_{i}_{j}/..., conv_head, bn2, classifier
        block (expand > 1): conv_pw, bn1, conv_dw, bn2, se/{conv_reduce,conv_expand}, conv_pwl, bn3
        block (expand = 1): conv_dw, bn1, se/{conv_reduce,conv_expand}, conv_pw, bn2
    naming='torchvision': features_0_0 (conv), features_0_1 (bn), features_{i+1}_{j}/...,
        features_{n+1}_0, features_{n+1}_1, classifier_1
        block: block_{k}_0 (conv), block_{k}_1 (bn) per conv, block_{k}/{fc1,fc2} for SE,
        k counting expand (if any), depthwise, SE, project

Channels: `round_filters(c, width)`; repeats: `round_repeats(r, depth)`; SE width
max(1, int(block input channels * se_ratio)); drop-connect (stochastic depth) rate
`drop_connect_rate * block_index / num_blocks`, active only with `train=True`.

The base architecture is a field too (`blocks`, `stem_width`, `head_width`, `divisor`), so an
experiment can shrink the B0 baseline for a CPU before compound scaling it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp

from scaling import scaling_rules
from scaling.models.layers import (NORMS, Dtype, InvertedResidual, activation, classifier, classifier_init,
                                   conv_bn, global_avg_pool, make_norm)
from scaling.models.registry import register_model

PADDINGS = {"symmetric": None, "same": "SAME"}  # -> `layers.conv` padding
NAMINGS = ("timm", "torchvision")


class Stage(NamedTuple):
    """One row of the base (B0) architecture table."""
    expand_ratio: float
    kernel: int
    stride: int
    out_channels: int
    repeats: int


# EfficientNet-B0 (paper table 1): 7 stages of MBConv blocks after a 32-channel 3x3/2 stem.
B0_BLOCKS: tuple[Stage, ...] = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)


class BlockSpec(NamedTuple):
    """One MBConv block after scaling."""
    stage: int
    index: int            # within the stage
    in_channels: int
    out_channels: int
    mid_channels: int     # after the 1x1 expansion (= in_channels without one)
    se_channels: int      # 0 = no squeeze-and-excitation
    kernel: int
    stride: int
    drop_rate: float      # drop-connect rate of the residual branch


class Plan(NamedTuple):
    stem: int
    blocks: tuple[BlockSpec, ...]
    head: int


class EfficientNet(nn.Module):
    """EfficientNet with width/depth coefficients as fields (B0 at 1.0/1.0).

    The defaults are the official (TensorFlow) B0. Fields: `width`, `depth` (coefficients),
    `dropout` (before the classifier), `drop_connect_rate` (block k of n: rate * k / n),
    `padding` ('same' = TensorFlow/timm tf_*, 'symmetric' = torchvision), `naming`
    ('timm' | 'torchvision' module names), `bn_eps`, `bn_momentum` (flax's: 1 - torch's),
    `norm`, `act`, `se_ratio`, `dtype`, and the base architecture `blocks` (rows of
    `Stage(expand_ratio, kernel, stride, out_channels, repeats)`), `stem_width`,
    `head_width` (None: 4 x the last stage's channels, rounded as that naming's reference
    does) and `divisor` (channel rounding).
    """
    width: float = 1.0
    depth: float = 1.0
    dropout: float = 0.2
    drop_connect_rate: float = 0.2
    num_classes: int = 1000
    include_top: bool = True
    padding: str = "same"
    naming: str = "timm"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.99
    norm: str = "batch"
    act: str = "swish"
    se_ratio: float = 0.25
    blocks: Sequence[Sequence[float]] = B0_BLOCKS
    stem_width: int = 32
    head_width: int | None = None
    divisor: int = 8
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        def bad(field, allowed):
            return ValueError(f"model.{field}: got {getattr(self, field)!r}; allowed: {allowed}.")

        if self.padding not in PADDINGS:
            raise bad("padding", ", ".join(PADDINGS))
        if self.naming not in NAMINGS:
            raise bad("naming", ", ".join(NAMINGS))
        if self.norm not in NORMS:
            raise bad("norm", ", ".join(NORMS))
        for field in ("width", "depth"):
            if not getattr(self, field) > 0:
                raise bad(field, "a coefficient > 0")
        for field in ("dropout", "drop_connect_rate"):
            if not 0 <= getattr(self, field) < 1:
                raise bad(field, "a rate in [0, 1)")
        if not 0 <= self.se_ratio <= 1:
            raise bad("se_ratio", "a ratio in [0, 1] (0 = no squeeze-and-excitation)")
        if not self.blocks or any(len(tuple(row)) != len(Stage._fields) for row in self.blocks):
            raise bad("blocks", "a non-empty sequence of (expand_ratio, kernel, stride, out_channels, repeats)")
        if any(Stage(*row).stride not in (1, 2) or Stage(*row).kernel % 2 == 0 for row in self.blocks):
            raise bad("blocks", "strides 1 or 2 and odd kernels")
        activation(self.act)  # raises on an unknown name
        super().__post_init__()

    def plan(self) -> Plan:
        """Channels of the stem and head and the spec of every block, after scaling."""
        stages = [Stage(*row) for row in self.blocks]
        filters = functools.partial(scaling_rules.round_filters, width=self.width, divisor=self.divisor)
        stem = filters(self.stem_width)
        rows = []
        in_ch = stem
        for i, st in enumerate(stages):
            out_ch = filters(st.out_channels)
            for j in range(scaling_rules.round_repeats(st.repeats, self.depth)):
                mid = scaling_rules.round_filters(in_ch, st.expand_ratio, self.divisor)
                se = max(1, int(in_ch * self.se_ratio)) if self.se_ratio > 0 else 0
                rows.append((i, j, in_ch, out_ch, mid, se, st.kernel, st.stride if j == 0 else 1))
                in_ch = out_ch
        n = len(rows)
        blocks = tuple(BlockSpec(*r, drop_rate=self.drop_connect_rate * k / n) for k, r in enumerate(rows))
        if self.head_width is not None:
            head = filters(self.head_width)
        elif self.naming == "torchvision":  # torchvision: 4 x the scaled last stage
            head = 4 * in_ch
        else:  # TF / timm: round_filters(1280) for B0
            head = filters(4 * stages[-1].out_channels)
        return Plan(stem, blocks, head)

    @nn.compact
    def __call__(self, x, train: bool = False):
        plan = self.plan()
        norm = make_norm(self.norm, train=train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                         dtype=self.dtype)
        tv = self.naming == "torchvision"
        unit = functools.partial(conv_bn, act=self.act, norm=norm, padding=PADDINGS[self.padding],
                                 dtype=self.dtype)
        x = unit(x.astype(self.dtype), plan.stem, 3, 2,
                 names=("features_0_0", "features_0_1") if tv else ("conv_stem", "bn1"))
        block = functools.partial(InvertedResidual, act=self.act, se_act=self.act, naming=self.naming,
                                  padding=PADDINGS[self.padding], norm=norm, dtype=self.dtype)
        for b in plan.blocks:
            name = f"features_{b.stage + 1}_{b.index}" if tv else f"blocks_{b.stage}_{b.index}"
            x = block(b.out_channels, b.mid_channels, b.kernel, b.stride, se_features=b.se_channels,
                      drop_rate=b.drop_rate, name=name)(x, train)
        last = f"features_{len(self.blocks) + 1}"
        x = unit(x, plan.head, 1, names=(f"{last}_0", f"{last}_1") if tv else ("conv_head", "bn2"))
        x = global_avg_pool(x)
        if not self.include_top:
            return x
        return classifier(x, self.num_classes, self.dropout, train, self.dtype,
                          "classifier_1" if tv else "classifier", classifier_init)


# Eval transforms of the reference weights: torchvision's (crop, resize) per variant (b2 at
# 288, not the official 260); timm's tf_ ports at the official sizes with timm's crop_pct.
_TORCHVISION_EVAL = {"b0": (224, 256), "b1": (240, 255), "b2": (288, 288), "b3": (300, 320),
                     "b4": (380, 384), "b5": (456, 456), "b6": (528, 528), "b7": (600, 600)}
_TIMM_CROP = {"b0": 0.875, "b1": 0.882, "b2": 0.890, "b3": 0.904, "b4": 0.922, "b5": 0.934,
              "b6": 0.942, "b7": 0.949}

for _b, _p in scaling_rules.EFFICIENTNET_PARAMS.items():
    _late = _b in ("b5", "b6", "b7")  # torchvision: BatchNorm2d(eps=1e-3, momentum=0.01)
    register_model(
        f"efficientnet_{_b}",
        functools.partial(EfficientNet, width=_p.width, depth=_p.depth, dropout=_p.dropout,
                          padding="symmetric", naming="torchvision", bn_eps=1e-3 if _late else 1e-5,
                          bn_momentum=0.99 if _late else 0.9),
        head="classifier_1", weights="efficientnet", resolution=_TORCHVISION_EVAL[_b][0],
        crop_fraction=_TORCHVISION_EVAL[_b][0] / _TORCHVISION_EVAL[_b][1])
    register_model(
        f"tf_efficientnet_{_b}",
        functools.partial(EfficientNet, width=_p.width, depth=_p.depth, dropout=_p.dropout,
                          padding="same", naming="timm", bn_eps=1e-3, bn_momentum=0.99),
        head="classifier", weights="efficientnet", resolution=_p.resolution, crop_fraction=_TIMM_CROP[_b])

"""Inception v2 (BN-Inception) and Inception v3.

**Inception v3** (Szegedy et al. 2016, "Rethinking the Inception Architecture") is torchvision's
`Inception3`: 299x299 input, the 5x5 factorised into two 3x3 convs (Mixed_5*), the 7x7 into
asymmetric 1x7 / 7x1 pairs (Mixed_6*) and the expanded 1x3 / 3x1 blocks of Mixed_7b/c. Module
names are torchvision's (`Mixed_6b.branch7x7_2.conv.weight` -> `Mixed_6b/branch7x7_2/conv/kernel`):

    Conv2d_1a_3x3, Conv2d_2a_3x3, Conv2d_2b_3x3, Conv2d_3b_1x1, Conv2d_4a_3x3,
    Mixed_5b..Mixed_7c/<branch>, [AuxLogits/{conv0, conv1, fc}], fc

23,834,568 parameters for 1000 classes. The auxiliary classifier on Mixed_6e (`aux_logits=True`,
off by default; 5x5/3 avg-pool -> 1x1 conv 128 -> 5x5 conv 768 -> fc) adds 3,326,696
(27,161,264 in all); in train mode the model then returns `(logits, aux)`, in eval mode the
logits; `scaling.train.step` trains on the main loss plus `aux_weight` (0.4) times the auxiliary
loss. The aux head needs the 17x17 Mixed_6e grid of a 299x299 input (or larger).
Average pools count the zero padding (torch's default). Dropout 0.5 before `fc`. The smallest
input is 75x75.

**Inception v2** is BN-Inception (Ioffe & Szegedy 2015, "Batch Normalization", appendix,
Figure 5 / its architecture table): GoogLeNet with BatchNorm after every conv, each 5x5 conv
replaced by two stacked 3x3 convs ("double 3x3"), a 3x3 reduce conv in the stem, average
pooling in most pool branches, and stride-2 blocks 3c and 4e (conv branches with stride 2
plus a max-pool pass-through) instead of GoogLeNet's max-pools between stages. Channel
counts are the table's per-branch columns, as in the released Caffe model and its PyTorch port
(`bninception`): 4c and 4d then output 608 channels and 4e 1056, where the table's
output-size column says 576 and 1024. No dropout (the paper removed it). Names follow that
port, nested by block: `inception_3a_double_3x3_1` -> `inception_3a/double_3x3_1/conv`,
`inception_3a_double_3x3_1_bn` -> `.../bn`, head `last_linear`. Our convs have no bias
(BatchNorm follows); the port's conv biases fold into the BN running mean on import, and its
BN epsilon is 1e-5. Max-pools use ceil mode as in Caffe, so the grid entering the stride-2
blocks must be even (any multiple of 32 works; 224 is the default). With 1000 classes:
11,285,224 parameters (11,295,240 with the port's 10,016 conv biases), 20,032 BatchNorm
statistics, 2.03 GMACs at 224.

Both: every conv is `BasicConv2d` = conv (no bias) -> BatchNorm (epsilon 1e-3, flax momentum
0.9) -> ReLU; `width_multiplier` scales every conv's channels.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.googlenet import InceptionNet, transform_input
from scaling.models.layers import Dtype, classifier, global_avg_pool, max_pool
from scaling.models.registry import register_model

VALID = "VALID"  # torch padding=0; ConvNormAct's default is torch's symmetric k // 2


def avg_pool3(x, count_include_pad: bool = True):
    """3x3 / stride 1 / padding 1 average pool (torch counts the zero padding by default)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=count_include_pad)


# ----------------------------------------------------------------------------- Inception v3

class InceptionA(nn.Module):
    """35x35: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool -> 1x1."""
    pool_features: int
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]

    @nn.compact
    def __call__(self, x):
        conv, ch = self.conv, self.ch
        b1 = conv(ch(64), 1, name="branch1x1")(x)
        b5 = conv(ch(48), 1, name="branch5x5_1")(x)
        b5 = conv(ch(64), 5, name="branch5x5_2")(b5)
        b3 = conv(ch(64), 1, name="branch3x3dbl_1")(x)
        b3 = conv(ch(96), 3, name="branch3x3dbl_2")(b3)
        b3 = conv(ch(96), 3, name="branch3x3dbl_3")(b3)
        bp = conv(ch(self.pool_features), 1, name="branch_pool")(avg_pool3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool 3x3/2."""
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]

    @nn.compact
    def __call__(self, x):
        conv, ch = self.conv, self.ch
        b3 = conv(ch(384), 3, 2, padding=VALID, name="branch3x3")(x)
        bd = conv(ch(64), 1, name="branch3x3dbl_1")(x)
        bd = conv(ch(96), 3, name="branch3x3dbl_2")(bd)
        bd = conv(ch(96), 3, 2, padding=VALID, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), (2, 2), padding=VALID)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """17x17 with 7x7 factorised into 1x7 / 7x1: 1x1 | 1x1, 1x7, 7x1 | 1x1, (7x1, 1x7) x 2 |
    avg-pool -> 1x1."""
    channels_7x7: int
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]

    @nn.compact
    def __call__(self, x):
        conv, ch, c7 = self.conv, self.ch, self.ch(self.channels_7x7)
        b1 = conv(ch(192), 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = conv(ch(192), (7, 1), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), name="branch7x7dbl_4")(bd)
        bd = conv(ch(192), (1, 7), name="branch7x7dbl_5")(bd)
        bp = conv(ch(192), 1, name="branch_pool")(avg_pool3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool 3x3/2."""
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]

    @nn.compact
    def __call__(self, x):
        conv, ch = self.conv, self.ch
        b3 = conv(ch(192), 1, name="branch3x3_1")(x)
        b3 = conv(ch(320), 3, 2, padding=VALID, name="branch3x3_2")(b3)
        b7 = conv(ch(192), 1, name="branch7x7x3_1")(x)
        b7 = conv(ch(192), (1, 7), name="branch7x7x3_2")(b7)
        b7 = conv(ch(192), (7, 1), name="branch7x7x3_3")(b7)
        b7 = conv(ch(192), 3, 2, padding=VALID, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), (2, 2), padding=VALID)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """8x8 expanded block: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | avg-pool -> 1x1."""
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]

    @nn.compact
    def __call__(self, x):
        conv, ch = self.conv, self.ch
        b1 = conv(ch(320), 1, name="branch1x1")(x)
        b3 = conv(ch(384), 1, name="branch3x3_1")(x)
        b3 = [conv(ch(384), (1, 3), name="branch3x3_2a")(b3),
              conv(ch(384), (3, 1), name="branch3x3_2b")(b3)]
        bd = conv(ch(448), 1, name="branch3x3dbl_1")(x)
        bd = conv(ch(384), 3, name="branch3x3dbl_2")(bd)
        bd = [conv(ch(384), (1, 3), name="branch3x3dbl_3a")(bd),
              conv(ch(384), (3, 1), name="branch3x3dbl_3b")(bd)]
        bp = conv(ch(192), 1, name="branch_pool")(avg_pool3(x))
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionAux(nn.Module):
    """5x5/3 avg-pool -> 1x1 conv 128 -> 5x5 conv 768 -> global avg-pool -> fc."""
    num_classes: int
    conv: Callable[..., nn.Module]
    ch: Callable[[int], int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if min(x.shape[1:3]) < 17:
            raise ValueError(f"model.aux_logits: the auxiliary head needs a grid of at least 17x17 "
                             f"at Mixed_6e (input >= 299x299), got {x.shape[1]}x{x.shape[2]}; "
                             f"use a larger input or model.aux_logits=False.")
        x = nn.avg_pool(x, (5, 5), (3, 3), padding=VALID)
        x = self.conv(self.ch(128), 1, name="conv0")(x)
        x = self.conv(self.ch(768), 5, padding=VALID, name="conv1")(x)
        return classifier(global_avg_pool(x), self.num_classes, 0.0, False, self.dtype)


class InceptionV3(InceptionNet):
    """torchvision Inception v3 (`Inception3`).

    Returns logits; pooled 2048-d (x width) features with `include_top=False`;
    `(logits, aux)` in train mode with `aux_logits=True`.
    """
    dropout: float = 0.5
    aux_logits: bool = False
    # Weight of the auxiliary loss in the training objective. The paper gives none; 0.4 is what
    # its authors' released trainer uses (tensorflow/models research/slim/train_image_classifier.py:
    # `softmax_cross_entropy(end_points['AuxLogits'], ..., weights=0.4)`) and what PyTorch's
    # fine-tuning tutorial copies (`loss1 + 0.4 * loss2`). torchvision's reference trainer
    # (references/classification/train.py) has no auxiliary loss: its weights are ported from TF.
    aux_weight: float = 0.4
    transform_input: bool = False

    MIN_RESOLUTION = 75

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, ch = self.layers(train)
        blocks = dict(conv=conv, ch=ch)

        x = x.astype(self.dtype)
        if self.transform_input:
            x = transform_input(x)
        x = conv(ch(32), 3, 2, VALID, name="Conv2d_1a_3x3")(x)
        x = conv(ch(32), 3, 1, VALID, name="Conv2d_2a_3x3")(x)
        x = conv(ch(64), 3, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=VALID)
        x = conv(ch(80), 1, name="Conv2d_3b_1x1")(x)
        x = conv(ch(192), 3, 1, VALID, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=VALID)
        x = InceptionA(32, **blocks, name="Mixed_5b")(x)
        x = InceptionA(64, **blocks, name="Mixed_5c")(x)
        x = InceptionA(64, **blocks, name="Mixed_5d")(x)
        x = InceptionB(**blocks, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, **blocks, name=name)(x)
        aux = None
        # Built at init whatever the mode, so one set of variables serves train and eval.
        if self.aux_logits and self.include_top and (train or self.is_initializing()):
            aux = InceptionAux(self.num_classes, **blocks, dtype=self.dtype, name="AuxLogits")(x)
        x = InceptionD(**blocks, name="Mixed_7a")(x)
        x = InceptionE(**blocks, name="Mixed_7b")(x)
        x = InceptionE(**blocks, name="Mixed_7c")(x)
        out = self.head(x, train)
        return (out, aux) if aux is not None and train else out


# ----------------------------------------------------------------------- BN-Inception (v2)

class BNInceptionBlock(nn.Module):
    """1x1 | 3x3_reduce -> 3x3 | double_3x3_reduce -> double_3x3_1 -> double_3x3_2 | pool [-> pool_proj].

    `strides=2` (blocks 3c, 4e): no 1x1 branch, the last conv of each 3x3 branch has stride 2
    and the pool branch is a 3x3/2 max-pool passed through without projection.
    """
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    dbl_red: int
    dbl: int
    pool: str  # 'avg' | 'max'
    pool_proj: int
    conv: Callable[..., nn.Module]
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        conv, s = self.conv, self.strides
        out = [conv(self.ch1x1, 1, name="1x1")(x)] if self.ch1x1 else []
        b3 = conv(self.ch3x3red, 1, name="3x3_reduce")(x)
        out.append(conv(self.ch3x3, 3, s, name="3x3")(b3))
        bd = conv(self.dbl_red, 1, name="double_3x3_reduce")(x)
        bd = conv(self.dbl, 3, name="double_3x3_1")(bd)
        out.append(conv(self.dbl, 3, s, name="double_3x3_2")(bd))
        if s == 1:
            bp = max_pool(x, 3, 1, padding=1, ceil_mode=True) if self.pool == "max" else avg_pool3(x)
            out.append(conv(self.pool_proj, 1, name="pool_proj")(bp))
        else:
            bp = max_pool(x, 3, s, ceil_mode=True)
            if bp.shape[1:3] != out[0].shape[1:3]:
                raise ValueError(f"model resolution: BN-Inception's stride-2 blocks need an even grid "
                                 f"(got {x.shape[1]}x{x.shape[2]} at {self.name}); use an input "
                                 f"resolution that is a multiple of 32, e.g. 224.")
            out.append(bp)
        return jnp.concatenate(out, axis=-1)


# Ioffe & Szegedy 2015, appendix (Figure 5): (#1x1, #3x3 reduce, #3x3, double #3x3 reduce,
# double #3x3, pool, pool proj, stride).
BN_INCEPTION_BLOCKS = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


class InceptionV2(InceptionNet):
    """BN-Inception (Inception v2). Returns logits, or pooled 1024-d (x width) features with
    `include_top=False`."""
    MIN_RESOLUTION = 32
    HEAD = "last_linear"

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, ch = self.layers(train)
        x = conv(ch(64), 7, 2, name="conv1_7x7_s2")(x.astype(self.dtype))
        x = max_pool(x, 3, 2, ceil_mode=True)
        x = conv(ch(64), 1, name="conv2_3x3_reduce")(x)
        x = conv(ch(192), 3, name="conv2_3x3")(x)
        x = max_pool(x, 3, 2, ceil_mode=True)
        for block, (c1, r3, c3, rd, cd, pool, proj, s) in BN_INCEPTION_BLOCKS.items():
            x = BNInceptionBlock(*(ch(c) if c else 0 for c in (c1, r3, c3, rd, cd)), pool,
                                 ch(proj) if proj else 0, conv, s, name=f"inception_{block}")(x)
        return self.head(x, train)


register_model("inception_v2", InceptionV2, head="last_linear")   # no weight importer
# torchvision's eval transform: 299 cropped from 342.
register_model("inception_v3", InceptionV3, head="fc", aux_heads=("AuxLogits/fc",), weights="inception_v3",
               resolution=299, crop_fraction=299 / 342)

"""VGG (Simonyan & Zisserman 2015) in torchvision's layout: VGG-11/13/16/19 with or without
BatchNorm, and the paper's VGG-11-LRN (configuration A-LRN).

    features: 3x3 convs (padding 1, with bias) -> [norm] -> ReLU, 2x2/2 max pools
    avgpool:  AdaptiveAvgPool2d((7, 7))  (the identity at 224; any resolution >= 32 works)
    classifier: Linear(512*7*7, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout,
                Linear(4096, num_classes)

Submodules are named by their torchvision `nn.Sequential` index (`features.0.weight` ->
`features_0/kernel`, `features.1.running_mean` -> `features_1/mean` for the _bn variants,
`classifier.6.weight` -> `classifier_6/kernel`, kernels transposed). The classifier input is
flattened in torch's (C, H, W) order, so torchvision's fc weights need no permutation.

`lrn=True` adds the paper's local response normalisation after the first conv's ReLU (A-LRN:
conv3-64, LRN, maxpool), with Krizhevsky et al.'s parameters; it has no parameters and takes
one Sequential index, so `vgg11_lrn` has the 132,863,336 parameters of `vgg11`.

Fields (the scaling knobs): `depth` (11 | 13 | 16 | 19), `width` (multiplies every conv's
channels; `hidden` sets the classifier's two hidden layers), `norm` (None/'none' as vgg*,
'batch' as vgg*_bn, or 'layer' | 'instance' | 'group'), `lrn`, `dropout`, `avgpool_size`
(None: flatten the raw map, as Keras's VGG16 does; same count at 224), `dtype`.
`include_top=False` returns the global average of the last conv map, [N, 512 x width].
Initialisation as torchvision: kaiming-normal (fan_out) convs, N(0, 0.01) linear layers,
zero biases; BatchNorm epsilon 1e-5, flax momentum 0.9 (torch 0.1).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from scaling.models.alexnet import (LRN, classifier_head, conv, norm_layer, pool,
                                    torch_sequential, validate_fields)
from scaling.models.layers import Dtype, conv_init
from scaling.models.registry import register_model

# torchvision's cfgs "A", "B", "D", "E": conv widths, "M" = 2x2 max pool.
CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


def vgg_layers(depth: int, lrn: bool = False) -> tuple:
    """The `layers` table (see scaling.models.alexnet) of VGG-`depth`, LRN after conv 1 if asked."""
    layers = [pool(2, 2) if c == "M" else conv(c, 3, 1, 1) for c in CONFIGS[depth]]
    if lrn:
        layers.insert(1, LRN)
    return tuple(layers)


class VGG(nn.Module):
    depth: int = 16
    num_classes: int = 1000
    include_top: bool = True
    norm: str | None = None
    lrn: bool = False
    dropout: float = 0.5
    width: float = 1.0
    hidden: int = 4096
    avgpool_size: int | None = 7
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.depth not in CONFIGS:
            raise ValueError(f"model.depth: VGG depth must be one of "
                             f"{', '.join(map(str, CONFIGS))}, got {self.depth!r}.")
        validate_fields(self.norm, self.width, self.avgpool_size, self.dropout)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = torch_sequential(x.astype(self.dtype), vgg_layers(self.depth, self.lrn),
                             width=self.width, norm=norm_layer(self.norm, train, self.dtype),
                             dtype=self.dtype, kernel_init=conv_init)
        # torchvision: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
        return classifier_head(x, layout="LRDLRDL", include_top=self.include_top,
                               avgpool_size=self.avgpool_size, hidden=self.hidden,
                               num_classes=self.num_classes, dropout=self.dropout, train=train,
                               dtype=self.dtype, kernel_init=nn.initializers.normal(0.01))


_INFO = dict(head="classifier_6", weights="vgg")
for _depth in CONFIGS:
    register_model(f"vgg{_depth}", functools.partial(VGG, depth=_depth), **_INFO)
    register_model(f"vgg{_depth}_bn", functools.partial(VGG, depth=_depth, norm="batch"), **_INFO)
register_model("vgg11_lrn", functools.partial(VGG, depth=11, lrn=True), **_INFO)

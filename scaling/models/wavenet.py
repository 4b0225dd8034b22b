"""WaveNet (van den Oord et al. 2016): stacked dilated causal 1-D convolutions on raw audio.

Input [N, T, C] float (C = 1 for a raw waveform, or a one-hot / embedded mu-law signal);
[N, T] is taken as C = 1. Layout:

    causal input conv (kernel `input_kernel_size`, `channels`)
    -> num_stacks x layers_per_stack residual layers with dilations 1, 2, 4, ..., 2^(L-1):
         z = tanh(filter(x)) * sigmoid(gate(x))       dilated causal convs, kernel `kernel_size`
         skip += skip_conv(z)                          1x1, `skip_channels`
         x = x + residual_conv(z)                      1x1, `channels` (not in the last layer,
                                                       whose residual output nothing reads)
    -> head: ReLU(skip) -> 1x1 conv `head1` (skip_channels) -> ReLU
         task='predict':  1x1 conv `head2` -> per-step logits [N, T, num_classes]
                          (logits at t predict sample t + 1, e.g. 256-way mu-law)
         task='classify': mean over time -> `head2` -> logits [N, num_classes]
    (`head2` is a Dense with a [skip_channels, num_classes] kernel in both tasks; on [N, T, C]
    it is the 1x1 conv.)

Every conv is causal (left padding only), so the output at step t depends only on inputs
at steps <= t, over exactly `receptive_field` steps:
(kernel_size - 1) * sum(dilations) + (input_kernel_size - 1) + 1.
`include_top=False` returns the ReLU(head1) features: pooled [N, skip_channels] for
'classify', per step [N, T, skip_channels] for 'predict'.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from scaling.models.layers import Dtype, dense_init
from scaling.models.registry import register_model

TASKS = ("classify", "predict")


def causal_conv(features: int, kernel_size: int, dilation: int = 1, *, dtype: Dtype,
                name: str) -> nn.Conv:
    """1-D conv padded only on the left, so output t sees inputs t - (k - 1) * dilation ... t."""
    return nn.Conv(features, (kernel_size,), kernel_dilation=(dilation,),
                   padding=(((kernel_size - 1) * dilation, 0),), dtype=dtype, name=name)


def mu_law_encode(audio, quantization_channels: int = 256):
    """Waveform in [-1, 1] -> integer classes 0 .. quantization_channels - 1 (mu-law companding)."""
    mu = quantization_channels - 1
    x = jnp.clip(audio, -1.0, 1.0)
    y = jnp.sign(x) * jnp.log1p(mu * jnp.abs(x)) / np.log1p(mu)
    return jnp.floor((y + 1) / 2 * mu + 0.5).astype(jnp.int32)


def mu_law_decode(classes, quantization_channels: int = 256):
    """Inverse of `mu_law_encode`: integer classes -> waveform in [-1, 1]."""
    mu = quantization_channels - 1
    y = 2 * jnp.asarray(classes, jnp.float32) / mu - 1
    return jnp.sign(y) * jnp.expm1(jnp.abs(y) * np.log1p(mu)) / mu


class ResidualLayer(nn.Module):
    """Gated dilated causal conv with 1x1 skip and (optional) residual outputs."""
    channels: int
    dilation_channels: int
    skip_channels: int
    kernel_size: int
    dilation: int
    residual: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(causal_conv, self.dilation_channels, self.kernel_size, self.dilation,
                                 dtype=self.dtype)
        z = jnp.tanh(conv(name="filter")(x)) * nn.sigmoid(conv(name="gate")(x))
        skip = nn.Conv(self.skip_channels, (1,), dtype=self.dtype, name="skip")(z)
        if self.residual:
            x = x + nn.Conv(self.channels, (1,), dtype=self.dtype, name="residual")(z)
        return x, skip


class WaveNet(nn.Module):
    """WaveNet with its scaling knobs (widths, kernel, depth per stack, stacks) as fields."""
    channels: int = 64
    skip_channels: int = 128
    dilation_channels: int = 64
    kernel_size: int = 2
    input_kernel_size: int = 2
    layers_per_stack: int = 10
    num_stacks: int = 2
    num_classes: int = 10
    task: str = "classify"
    include_top: bool = True
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"model.task: unknown task {self.task!r}; use one of {', '.join(TASKS)}.")
        for field in ("channels", "skip_channels", "dilation_channels", "kernel_size",
                      "input_kernel_size", "layers_per_stack", "num_stacks"):
            if getattr(self, field) < 1:
                raise ValueError(f"model.{field} must be >= 1, got {getattr(self, field)}.")
        super().__post_init__()

    @property
    def dilations(self) -> tuple[int, ...]:
        return tuple(2 ** i for i in range(self.layers_per_stack)) * self.num_stacks

    @property
    def receptive_field(self) -> int:
        """Input steps that one output step sees (itself included):
        (kernel_size - 1) * sum(dilations) + (input_kernel_size - 1) + 1."""
        return (self.kernel_size - 1) * sum(self.dilations) + self.input_kernel_size

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"WaveNet input must be [N, T, C] or [N, T], got shape {x.shape}.")
        x = causal_conv(self.channels, self.input_kernel_size, dtype=self.dtype,
                        name="input_conv")(x.astype(self.dtype))
        skips = 0.0
        dilations = self.dilations
        for i, d in enumerate(dilations):
            x, skip = ResidualLayer(self.channels, self.dilation_channels, self.skip_channels,
                                    self.kernel_size, d, residual=i < len(dilations) - 1,
                                    dtype=self.dtype, name=f"layers_{i}")(x)
            skips = skips + skip
        h = nn.relu(nn.Conv(self.skip_channels, (1,), dtype=self.dtype, name="head1")(nn.relu(skips)))
        if self.task == "classify":
            h = jnp.mean(h, axis=1)
        if not self.include_top:
            return h
        # A Dense on [N, T, C] is the 1x1 conv; the same [C, num_classes] kernel for both tasks.
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init, name="head2")(h)


# Raw audio at 16 kHz, one second per example; receptive fields 2048 (wavenet) and 257 samples.
register_model("wavenet", WaveNet, resolution=16000, num_classes=10, input_shape=(16000, 1))
register_model("wavenet_small", functools.partial(WaveNet, channels=32, skip_channels=64,
                                                  dilation_channels=32, layers_per_stack=8,
                                                  num_stacks=1),
               resolution=16000, num_classes=10, input_shape=(16000, 1))

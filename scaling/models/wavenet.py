"""WaveNet (van den Oord et al. 2016): stacked dilated causal 1-D convolutions on raw audio.

Input [N, T, C] float (C = 1 for a raw waveform; the audio pipeline gives the mu-law quantised
signal as its companded level in [-1, 1], see scaling.data.audio); [N, T] is taken as C = 1.
Layout:

    causal input conv (kernel `input_kernel_size`, `channels`)
    -> num_stacks x layers_per_stack residual layers with dilations 1, 2, 4, ..., 2^(L-1):
         z = tanh(filter(x)) * sigmoid(gate(x))       dilated causal convs, kernel `kernel_size`
         skip += skip_conv(z)                          1x1, `skip_channels`
         x = x + residual_conv(z)                      1x1, `channels` (not in the last layer,
                                                       whose residual output nothing reads)
    -> head: ReLU(skip) -> 1x1 conv `head1` (skip_channels) -> ReLU
         task='predict':  1x1 conv `head2` -> per-step logits [N, T, 256]: at step t, the
                          mu-law class (MU_LAW_CHANNELS = 256) of sample t + 1
         task='classify': mean over time -> `head2` -> logits [N, num_classes]
    (`head2` is a Dense with a [skip_channels, outputs] kernel in both tasks; on [N, T, C] it
    is the 1x1 conv.) `label_key` names the batch field each task is scored against.

Every conv is causal (left padding only), so the output at step t depends only on inputs
at steps <= t, over exactly `receptive_field` steps:
(kernel_size - 1) * sum(dilations) + (input_kernel_size - 1) + 1.
`include_top=False` returns the ReLU(head1) features: pooled [N, skip_channels] for
'classify', per step [N, T, skip_channels] for 'predict'.

`sample` generates audio from a trained 'predict' model one sample at a time, with each layer
keeping only the past inputs its dilated conv reads (Paine et al. 2016, "Fast Wavenet"), so a
sample costs one step of every layer rather than a pass over the receptive field.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaling.data.audio import MU_LAW_CHANNELS, companded
from scaling.models.layers import Dtype, dense_init, logits_dense
from scaling.models.registry import register_model

TASKS = ("classify", "predict")


def causal_conv(features: int, kernel_size: int, dilation: int = 1, *, dtype: Dtype,
                name: str) -> nn.Conv:
    """1-D conv padded only on the left, so output t sees inputs t - (k - 1) * dilation ... t."""
    return nn.Conv(features, (kernel_size,), kernel_dilation=(dilation,),
                   padding=(((kernel_size - 1) * dilation, 0),), dtype=dtype, name=name)


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
    num_classes: int = 10            # classify head; 'predict' has MU_LAW_CHANNELS outputs
    task: str = "classify"           # 'classify' | 'predict' (next sample)
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
    def label_key(self) -> str:
        """The batch field the logits are scored against (scaling.train.step): 'label' for
        'classify'; for 'predict', 'next_sample', the mu-law class of the sample after each step."""
        return "label" if self.task == "classify" else "next_sample"

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
        # A Dense on [N, T, C] is the 1x1 conv.
        outputs = self.num_classes if self.task == "classify" else MU_LAW_CHANNELS
        return logits_dense(outputs, dtype=self.dtype, kernel_init=dense_init, name="head2")(h)


# ----------------------------------------------------------------------------- sampling
def _conv_at(taps: jax.Array, p: dict) -> jax.Array:
    """A conv's output at the newest step from the inputs it reads there: taps [N, k, C] (oldest
    first) with kernel [k, C, D] -> [N, D]."""
    return jnp.einsum("nkc,kcd->nd", taps, p["kernel"]) + p["bias"]


def _push(buffer: jax.Array, x: jax.Array) -> jax.Array:
    """Drops the oldest step of buffer [N, L, C] and appends x [N, C]."""
    return jnp.concatenate([buffer[:, 1:], x[:, None]], axis=1)


def _initial_state(model: WaveNet, n: int) -> tuple:
    """Zeros, as the convs' causal padding: the input's last `input_kernel_size` steps, and for
    each layer the last (kernel_size - 1) * dilation + 1 inputs its dilated conv reads."""
    layers = [jnp.zeros((n, (model.kernel_size - 1) * d + 1, model.channels))
              for d in model.dilations]
    return jnp.zeros((n, model.input_kernel_size, 1)), layers


def _next_logits(model: WaveNet, params: dict, state: tuple, x: jax.Array) -> tuple:
    """Feeds input x [N] (one step) through the network; returns the new state and the logits
    [N, 256] for the following sample: the model's output at this step."""
    inputs, buffers = state
    inputs = _push(inputs, x[:, None])
    h = _conv_at(inputs, params["input_conv"])
    skips, new_buffers = 0.0, []
    for i, (d, buffer) in enumerate(zip(model.dilations, buffers)):
        p = params[f"layers_{i}"]
        buffer = _push(buffer, h)
        new_buffers.append(buffer)
        taps = buffer[:, ::d]
        z = jnp.tanh(_conv_at(taps, p["filter"])) * jax.nn.sigmoid(_conv_at(taps, p["gate"]))
        skips = skips + _conv_at(z[:, None], p["skip"])
        if "residual" in p:
            h = h + _conv_at(z[:, None], p["residual"])
    h = jax.nn.relu(_conv_at(jax.nn.relu(skips)[:, None], params["head1"]))
    return (inputs, new_buffers), h @ params["head2"]["kernel"] + params["head2"]["bias"]


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "temperature"))
def sample(model: WaveNet, params: dict, prompt: jax.Array, num_samples: int, rng: jax.Array,
           temperature: float = 1.0) -> jax.Array:
    """Generates `num_samples` mu-law classes [N, num_samples] after `prompt` (int classes
    [N, P], P >= 1, e.g. one silent sample: mu_law_encode(zeros((N, 1)))) with a trained
    'predict' WaveNet's `params`, each drawn from softmax(logits / temperature) given every
    sample before it (temperature 0: the most likely class). Equals running the model over the
    whole sequence at every step, in one step of each layer per sample."""
    if model.task != "predict" or not model.include_top:
        raise ValueError("sample needs a WaveNet with task='predict' and include_top=True.")
    level = functools.partial(companded, channels=MU_LAW_CHANNELS)

    def feed(state, x):   # x: classes [N] -> (state, logits [N, 256] for the next sample)
        return _next_logits(model, params, state, level(x).astype(jnp.float32))

    state, logits = jax.lax.scan(feed, _initial_state(model, prompt.shape[0]), prompt.T)

    def draw(carry, key):
        state, logits = carry
        if temperature > 0:
            c = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
        else:
            c = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return feed(state, c), c

    _, classes = jax.lax.scan(draw, (state, logits[-1]), jax.random.split(rng, num_samples))
    return classes.T


# Raw audio at 16 kHz, one second (16,000 samples, one channel) per example, 10 classes (spoken
# digits); receptive fields 2048 (wavenet) and 257 samples. Audio gets no mean/std or crop.
_AUDIO = dict(head="head2", modality="audio", resolution=16000, channels=1, num_classes=10,
              sample_rate=16000, mean=None, std=None, crop_fraction=None)
register_model("wavenet", WaveNet, **_AUDIO)
register_model("wavenet_small", functools.partial(WaveNet, channels=32, skip_channels=64,
                                                  dilation_channels=32, layers_per_stack=8,
                                                  num_stacks=1),
               **_AUDIO)

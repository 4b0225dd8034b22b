"""Pieces shared by the model families: normalization factory, activations, conv helpers,
squeeze-and-excitation, the inverted residual block, stochastic depth, the classifier and
torch-style pools.

Normalization is chosen by name (`norm='batch'|'layer'|'instance'|'group'`). BatchNorm is
the default and the exact one of the reference models. Under `jax.jit` with a batch sharded
over a device mesh, BatchNorm statistics are computed over the *global* batch (synchronised
BN) without any extra code, unlike per-device statistics under `pmap`.

Mixed precision (`dtype`, the compute dtype; `train.compute_dtype=bfloat16`): every family
keeps its parameters and BatchNorm statistics in float32 and casts them to `dtype` where it
uses them, so convolutions and matmuls take `dtype` operands. Normalization statistics
(BatchNorm, GroupNorm, LayerNorm), attention softmax and LRN are computed in float32 and
return `dtype`. The classifier (`logits_dense`) multiplies in `dtype` but accumulates and
returns float32 logits, with a float32 bias: bfloat16 logits (8 bits of mantissa) tie often
enough to inflate top-k accuracy and coarsen the loss. `tests/test_mixed_precision.py` checks
every family.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORMS = ("batch", "layer", "instance", "group")

# torchvision initialisers: kaiming-normal fan_out for convs; Linear default for heads.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# kaiming-normal fan_in: torchvision's DenseNet convs; timm's (TF's) depthwise kernels, whose
# fan_out k*k*C / groups is flax's fan_in of a [k, k, 1, C] kernel.
conv_init_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# timm's MobileNet / EfficientNet classifier: U(+-1/sqrt(num_classes)).
classifier_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class GroupNorm(nn.Module):
    """Group normalization over (H, W, C/groups); `num_groups=1` is LayerNorm over (H, W, C),
    `group_size=1` is InstanceNorm. With `num_groups` not dividing C, the largest common
    divisor is used. Parameters are `scale` and `bias`, as in BatchNorm."""
    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        groups = c // self.group_size if self.group_size else math.gcd(self.num_groups, c)
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = xf.mean(axis=axes, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return (y * scale + bias).astype(dtype)


def make_norm(kind: str = "batch", *, train: bool = False, momentum: float = 0.9,
              epsilon: float = 1e-5, dtype: Dtype | None = None) -> Callable[..., nn.Module]:
    """Returns a constructor `norm(name=None, scale_init=...)` for the chosen normalization.

    `momentum` is flax's (= 1 - torch momentum: torch 0.1 -> 0.9; Keras/TF 0.99 -> 0.99).
    """
    if kind == "batch":
        return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                                 epsilon=epsilon, dtype=dtype)
    if kind == "layer":
        return functools.partial(GroupNorm, num_groups=1, epsilon=epsilon, dtype=dtype)
    if kind == "instance":
        return functools.partial(GroupNorm, num_groups=None, group_size=1, epsilon=epsilon,
                                 dtype=dtype)
    if kind == "group":
        return functools.partial(GroupNorm, num_groups=32, epsilon=epsilon, dtype=dtype)
    raise ValueError(f"model.norm: unknown normalization {kind!r}; use one of {', '.join(NORMS)}.")


def hard_sigmoid(x):
    return jax.nn.relu6(x + 3.0) / 6.0


def hard_swish(x):
    return x * hard_sigmoid(x)


ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "relu6": jax.nn.relu6,
    "swish": nn.swish,
    "silu": nn.swish,
    "hard_swish": hard_swish,
    "hard_sigmoid": hard_sigmoid,
    "sigmoid": nn.sigmoid,
    "gelu": functools.partial(nn.gelu, approximate=False),  # exact (erf) GELU, as torch/timm
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation(name: str | Callable) -> Callable:
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"model.act: unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def sym_padding(kernel: int | Sequence[int], dilation: int = 1) -> Sequence[tuple[int, int]]:
    """torch-style symmetric padding that keeps 'same' size for odd kernels at stride 1."""
    ks = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    return tuple(((k - 1) * dilation // 2, (k - 1) * dilation // 2) for k in ks)


# --- Depthwise convolution ------------------------------------------------------------------
# XLA:CPU computes `lax.conv_general_dilated(feature_group_count=C)` as if it were dense, 10-20x
# slower than PyTorch. On CPU the same op is written as kh*kw shifted (strided) slices of the
# padded input times per-channel weights, summed in float32 (a custom VJP: the input gradient is
# that sum's transpose, the kernel gradient kh*kw per-channel reductions, per image first).
# Timings: `benchmarks/ops.py`.

DEPTHWISE_IMPLS = ("auto", "conv", "slices")
# Name of the nested jit holding the forward slice form; `scaling.profile` counts it as a conv.
DEPTHWISE_JIT_NAME = "depthwise_conv_slices"
_DN = ("NHWC", "HWIO", "NHWC")
_DEPTHWISE_BLOCK_BYTES = 4 << 20  # padded inputs larger than this take the blocked weight gradient
_DEPTHWISE_BLOCK_G_BYTES = 768 << 10  # the most of g one block of the weight gradient reads


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def explicit_pads(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: int | Sequence[int] = 1,
                  padding: Any = "SAME", dilation: int | Sequence[int] = 1) -> tuple[tuple[int, int], ...]:
    """Explicit (lo, hi) pads of H and W for flax-style `padding`: 'SAME' (TensorFlow's,
    asymmetric at stride 2), 'VALID', an int, or per-dimension ints or (lo, hi) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"conv padding {padding!r}; use 'SAME', 'VALID' or (lo, hi) pairs.")
        window = tuple((k - 1) * d + 1 for k, d in zip(kernel_hw, _pair(dilation)))
        return tuple(jax.lax.padtype_to_pads(tuple(in_hw), window, _pair(strides), padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    return tuple((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)


def _pad(x, pads, interior=(0, 0)):
    cfg = ((0, 0, 0),) + tuple((lo, hi, i) for (lo, hi), i in zip(pads, interior)) + ((0, 0, 0),)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _taps(xp, kernel_hw, out_hw, strides, dilation):
    """Yields (i, j, window): the (strided) part of padded `xp` that kernel tap (i, j) meets."""
    (ho, wo), (sh, sw), (dh, dw) = out_hw, strides, dilation
    n, c = xp.shape[0], xp.shape[-1]
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            yield i, j, jax.lax.slice(xp, (0, i * dh, j * dw, 0),
                                      (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                                      (1, sh, sw, 1))


def _out_hw(padded_hw, kernel_hw, strides, dilation):
    return tuple((p - (k - 1) * d - 1) // s + 1 for p, k, s, d in zip(padded_hw, kernel_hw, strides, dilation))


def _correlate(xp, kernel, strides, dilation):
    """sum_ij tap_ij(xp) * kernel[i, j, 0], accumulated in float32, returned in xp's dtype."""
    kh_kw = kernel.shape[:2]
    k = kernel.astype(jnp.float32)
    acc = None
    for i, j, t in _taps(xp, kh_kw, _out_hw(xp.shape[1:3], kh_kw, strides, dilation), strides, dilation):
        t = t.astype(jnp.float32) * k[i, j, 0]
        acc = t if acc is None else acc + t
    return acc.astype(xp.dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def depthwise_conv_slices(x, kernel, pads, strides, dilation):
    """Forward of the slice form (own jit, so that `scaling.profile` counts its MACs)."""
    return _correlate(_pad(x, pads), kernel, strides, dilation)


def _phase_input_grad(g, kernel, x_shape, pads, strides):
    """dL/dx of a strided slice form without the stride-dilated zeros: each of the sh*sw
    phases of the padded input (rows = p mod sh, columns = q mod sw) receives only the taps
    (i, j) with i = p, j = q modulo the stride, as plain shifted slices of g; the phases are
    then interleaved. kh*kw passes over g's size instead of over the input's."""
    (sh, sw), (kh, kw) = strides, kernel.shape[:2]
    n, h, w, c = x_shape
    ha, wa = -(-(h + sum(pads[0])) // sh), -(-(w + sum(pads[1])) // sw)
    mi, mj = (kh - 1) // sh, (kw - 1) // sw
    k = kernel.astype(jnp.float32)
    gp = jnp.pad(g.astype(jnp.float32),
                 ((0, 0), (mi, max(0, ha - g.shape[1])), (mj, max(0, wa - g.shape[2])), (0, 0)))
    phase_rows = []
    for p in range(sh):
        phases = []
        for q in range(sw):
            acc = jnp.zeros((n, ha, wa, c), jnp.float32)
            for i in range(p, kh, sh):
                for j in range(q, kw, sw):
                    a, b = mi - i // sh, mj - j // sw
                    acc = acc + jax.lax.slice(gp, (0, a, b, 0), (n, a + ha, b + wa, c)) * k[i, j, 0]
            phases.append(acc)
        phase_rows.append(jnp.stack(phases, axis=3))           # n, ha, wa, sw, c
    full = jnp.stack(phase_rows, axis=2).reshape(n, ha * sh, wa * sw, c)
    (top, _), (left, _) = pads
    return full[:, top:top + h, left:left + w].astype(g.dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _depthwise_input_grad(g, kernel, x_shape, pads, strides, dilation):
    """dL/dx: the transpose of the slice form (each tap's strided slice becomes a pad of
    g * kernel[i, j]; XLA fuses their sum). Measured faster here than correlating the
    stride-dilated g with the flipped kernel. Strided kernels larger than 3x3 take the phase
    form instead (5x5 stride 2 at 112x112x96, batch 32: 550 -> 125 ms; at 3x3 the two tie)."""
    if strides != (1, 1) and dilation == (1, 1) and kernel.shape[0] * kernel.shape[1] > 9:
        return _phase_input_grad(g, kernel, x_shape, pads, strides)
    x = jax.ShapeDtypeStruct(x_shape, g.dtype)
    return jax.linear_transpose(lambda x: _correlate(_pad(x, pads), kernel, strides, dilation), x)(g)[0]


def _kernel_grad_block(n, ho, row_bytes):
    """(images, output rows) per block of the weight gradient: the largest block whose slice of
    g fits in _DEPTHWISE_BLOCK_G_BYTES, the squarest on ties (4 images x 4 rows at 112x112x96
    measured at least as fast as 1 x 16 or 16 x 1)."""
    divisors = lambda m: [d for d in range(1, m + 1) if m % d == 0]  # noqa: E731
    fits = [(b * r * row_bytes, -max(b, r), b, r) for r in divisors(ho) for b in divisors(n)
            if b * r * row_bytes <= _DEPTHWISE_BLOCK_G_BYTES]
    return max(fits)[2:] if fits else (1, 1)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _depthwise_kernel_grad(x, g, kernel_hw, pads, strides, dilation):
    """dL/dkernel[i, j, 0, c] = sum over (n, h, w) of tap_ij(pad(x)) * g, in float32.

    Large maps are reduced one block of images x output rows at a time (a scan), so that each
    block's kh*kw tap reductions read input and gradient from cache rather than memory:
    3x3 at 112x112x96, batch 32: 900 ms whole, 400 ms in blocks of 2 rows of every image,
    120-130 ms in blocks of about 0.5 MB of g (`_kernel_grad_block`)."""
    xp = _pad(x, pads)
    n, ho, wo, c = g.shape
    (sh, _), (dh, _) = strides, dilation

    def block_sums(xb, gb):
        gf = gb.astype(jnp.float32)
        return jnp.stack([jnp.sum(t.astype(jnp.float32) * gf, axis=(0, 1, 2))
                          for _, _, t in _taps(xb, kernel_hw, gb.shape[1:3], strides, dilation)])

    images, rows = _kernel_grad_block(n, ho, wo * c * 4)
    if xp.size * xp.dtype.itemsize <= _DEPTHWISE_BLOCK_BYTES or (images, rows) == (n, ho):
        sums = block_sums(xp, g)
    else:
        span = (rows - 1) * sh + (kernel_hw[0] - 1) * dh + 1
        per_row = n // images

        def body(acc, k):
            b, m = k // per_row, k % per_row
            xb = jax.lax.dynamic_slice(xp, (m * images, b * rows * sh, 0, 0), (images, span) + xp.shape[2:])
            gb = jax.lax.dynamic_slice(g, (m * images, b * rows, 0, 0), (images, rows, wo, c))
            return acc + block_sums(xb, gb), None

        init = jnp.zeros((kernel_hw[0] * kernel_hw[1], c), jnp.float32)
        sums, _ = jax.lax.scan(body, init, jnp.arange((ho // rows) * per_row))
    return sums.reshape(kernel_hw + (1, c))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_slices(x, kernel, pads, strides, dilation):
    return depthwise_conv_slices(x, kernel, pads, strides, dilation)


def _depthwise_slices_fwd(x, kernel, pads, strides, dilation):
    return depthwise_conv_slices(x, kernel, pads, strides, dilation), (x, kernel)


def _depthwise_slices_bwd(pads, strides, dilation, res, g):
    x, kernel = res
    dx = _depthwise_input_grad(g, kernel, x.shape, pads, strides, dilation)
    dk = _depthwise_kernel_grad(x, g, kernel.shape[:2], pads, strides, dilation)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise_slices.defvjp(_depthwise_slices_fwd, _depthwise_slices_bwd)


def depthwise_conv(x, kernel, strides: int | Sequence[int] = 1, padding: Any = "SAME",
                   dilation: int | Sequence[int] = 1, impl: str = "auto"):
    """Depthwise 2-D convolution of NHWC `x` with an HWIO `kernel` of shape (kh, kw, 1, C),
    i.e. `lax.conv_general_dilated(..., feature_group_count=C)`.

    `padding` as flax's `nn.Conv`; `impl` 'conv' (XLA's grouped convolution), 'slices' (kh*kw
    shifted slices summed in float32, with their own gradients; much faster on CPU) or 'auto'
    (slices on the CPU backend, decided at trace time, else conv). A kernel with more output
    channels than `x` (channel multiplier > 1) always takes XLA's convolution.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_conv: impl {impl!r}; use one of {', '.join(DEPTHWISE_IMPLS)}.")
    kh_kw, c = kernel.shape[:2], x.shape[-1]
    if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] % c:
        raise ValueError(f"depthwise_conv: kernel of shape {kernel.shape} for {c} input channels; "
                         "expected (kh, kw, 1, C * multiplier).")
    strides, dilation = _pair(strides), _pair(dilation)
    pads = explicit_pads(x.shape[1:3], kh_kw, strides, padding, dilation)
    if impl == "auto":
        impl = "slices" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv" or kernel.shape[3] != c:
        return jax.lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                            dimension_numbers=_DN, feature_group_count=c)
    return _depthwise_slices(x, kernel, pads, strides, dilation)


class DepthwiseConv(nn.Module):
    """A depthwise conv whose variables are exactly those of
    `nn.Conv(features, kernel_size, feature_group_count=C, use_bias=...)` on C input channels
    (`kernel` of shape (kh, kw, 1, features), optional `bias`), computed by `depthwise_conv`.

    `padding` as `nn.Conv` ('SAME', 'VALID', ints or (lo, hi) pairs; `sym_padding(k)` is
    torch's). Inputs and parameters are promoted to `dtype` as `nn.Conv` does.
    """
    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        if self.features % x.shape[-1]:
            raise ValueError(f"DepthwiseConv: features={self.features} is not a multiple of the "
                             f"{x.shape[-1]} input channels.")
        kernel = self.param("kernel", self.kernel_init, _pair(self.kernel_size) + (1, self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = depthwise_conv(x, kernel, self.strides, self.padding, self.kernel_dilation, self.impl)
        return y if bias is None else y + bias


def conv(features: int, kernel: int | Sequence[int], strides: int = 1, *, padding: Any = None,
         groups: int = 1, in_features: int | None = None, use_bias: bool = False,
         kernel_init: Callable = conv_init, small_maps: bool = False, dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Module:
    """A 2-D conv module, by default torch's `Conv2d(padding=(k-1)//2, bias=False)`.

    `padding=None` is torch's symmetric (k-1)//2; 'SAME' is TensorFlow's (asymmetric at
    stride 2); 'VALID', ints or (lo, hi) pairs as `nn.Conv`. A depthwise conv (groups =
    features = `in_features` when given) is a `DepthwiseConv`, with the same variables.
    `small_maps` runs convs with output maps of a few pixels as a matmul (`conv_general_dilated`).
    """
    ks = _pair(kernel)
    kw = dict(strides=strides, padding=sym_padding(ks) if padding is None else padding, use_bias=use_bias,
              dtype=dtype, kernel_init=kernel_init, name=name)
    if groups > 1 and groups == features and in_features in (None, features):
        return DepthwiseConv(features, ks, **kw)
    return nn.Conv(features, ks, feature_group_count=groups,
                   conv_general_dilated=conv_general_dilated if small_maps else None, **kw)


def conv_bn(x, features: int, kernel: int | Sequence[int], strides: int = 1, *, act: str | Callable | None,
            norm: Callable[..., nn.Module], names: tuple[str, str], groups: int = 1, padding: Any = None,
            kernel_init: Callable = conv_init, dtype: Dtype = jnp.float32):
    """`conv` (no bias) -> norm -> optional activation, the conv and norm named `names` in the
    calling module."""
    x = conv(features, kernel, strides, padding=padding, groups=groups, in_features=x.shape[-1],
             kernel_init=kernel_init, dtype=dtype, name=names[0])(x)
    x = norm(name=names[1])(x)
    return x if act is None else activation(act)(x)


class ConvNormAct(nn.Module):
    """`conv_bn` as a module with submodules `conv` and `bn` (torchvision's `BasicConv2d`)."""
    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int = 1
    padding: Any = None
    act: str | Callable | None = "relu"
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv_bn(x, self.features, self.kernel_size, self.strides, act=self.act, norm=self.norm,
                       names=("conv", "bn"), padding=self.padding, dtype=self.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool -> 1x1 conv (`reduced`) -> act -> 1x1 conv back to
    the input width -> gate -> scale the input. `names` of the two convs: torchvision's
    (fc1, fc2) or timm's (conv_reduce, conv_expand)."""
    reduced: int
    act: str | Callable = "relu"
    gate: str | Callable = "sigmoid"
    names: tuple[str, str] = ("fc1", "fc2")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.Conv(self.reduced, (1, 1), dtype=self.dtype, kernel_init=conv_init, name=self.names[0])(s)
        s = activation(self.act)(s)
        s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, kernel_init=conv_init, name=self.names[1])(s)
        return x * activation(self.gate)(s)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3's inverted residual, EfficientNet's MBConv: [1x1 expand -> norm -> act]
    (when `expanded` differs from the input width) -> kxk depthwise (strided) -> norm -> act ->
    [squeeze-excite] -> 1x1 project -> norm [-> `project_act`], plus drop-path and the identity
    when `skip`, stride 1 and the widths match. With `expanded` equal to the input width this
    is the depthwise-separable block (MobileNetV1: `project_act='relu6'`, `skip=False`).

    `padding` as `conv`: None torch's, 'SAME' TensorFlow's. `naming` picks the reference's
    module names and depthwise init: 'timm' (`conv_pw`, `bn1`, `conv_dw`, `bn2`,
    `se/{conv_reduce,conv_expand}`, `conv_pwl`, `bn3`; without expansion `conv_dw`, `bn1`, `se`,
    `conv_pw`, `bn2`), 'torchvision' (unit k = expand, depthwise, SE, project: conv
    `block_{k}_0`, norm `block_{k}_1`, SE `block_{k}/{fc1,fc2}`; MobileNetV3, EfficientNet) or
    'torchvision_v2' (`conv_{k}_0`, `conv_{k}_1`; the projection a bare conv `conv_{k}`, norm
    `conv_{k+1}`).
    """
    features: int
    expanded: int
    kernel_size: int = 3
    strides: int = 1
    act: str | Callable = "relu6"
    project_act: str | Callable | None = None
    se_features: int = 0
    se_act: str | Callable = "relu"
    se_gate: str | Callable = "sigmoid"
    skip: bool = True
    drop_rate: float = 0.0
    padding: Any = None
    naming: str = "torchvision_v2"
    norm: Callable[..., nn.Module] = nn.BatchNorm
    dtype: Dtype = jnp.float32

    def layer_names(self, expand: bool) -> dict[str, tuple[str, ...]]:
        """{'expand'?, 'dw', 'se', 'project'} -> (conv, norm) names, or (module, reduce, expand) for 'se'."""
        if self.naming == "timm":
            if expand:
                names = dict(expand=("conv_pw", "bn1"), dw=("conv_dw", "bn2"), project=("conv_pwl", "bn3"))
            else:
                names = dict(dw=("conv_dw", "bn1"), project=("conv_pw", "bn2"))
            return {**names, "se": ("se", "conv_reduce", "conv_expand")}
        seq = "conv" if self.naming == "torchvision_v2" else "block"
        units = (["expand"] if expand else []) + ["dw"] + (["se"] if self.se_features else [])
        names: dict = {u: (f"{seq}_{i}_0", f"{seq}_{i}_1") for i, u in enumerate(units)}
        names["se"] = (f"{seq}_{len(units) - 1}", "fc1", "fc2")
        i = len(units)
        names["project"] = ((f"{seq}_{i}", f"{seq}_{i + 1}") if self.naming == "torchvision_v2"
                            else (f"{seq}_{i}_0", f"{seq}_{i}_1"))
        return names

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_features = x.shape[-1]
        expand = self.expanded != in_features
        names = self.layer_names(expand)
        unit = functools.partial(conv_bn, norm=self.norm, padding=self.padding, dtype=self.dtype)
        y = x
        if expand:
            y = unit(y, self.expanded, 1, act=self.act, names=names["expand"])
        y = unit(y, self.expanded, self.kernel_size, self.strides, groups=self.expanded, act=self.act,
                 kernel_init=conv_init_fan_in if self.naming == "timm" else conv_init, names=names["dw"])
        if self.se_features:
            se, *conv_names = names["se"]
            y = SqueezeExcite(self.se_features, self.se_act, self.se_gate, tuple(conv_names), self.dtype,
                              name=se)(y)
        y = unit(y, self.features, 1, act=self.project_act, names=names["project"])
        if self.skip and self.strides == 1 and in_features == self.features:
            y = x + DropPath(self.drop_rate)(y, deterministic=not train)
        return y


class DropPath(nn.Module):
    """Stochastic depth / drop-connect: drops the whole residual branch per example.

    Uses the 'dropout' RNG stream; inactive when `deterministic` or `rate == 0`.
    """
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def global_avg_pool(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def dot_general_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` accumulating and returning float32 whatever its operands' dtype (bf16
    operands: the tensor-core / MXU product with a float32 result; float32 operands: unchanged)."""
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32, **kwargs)


def _promote_keep_bias(inputs, kernel, bias=None, *, dtype=None):
    """`nn.Dense`'s promotion for `logits_dense`: inputs and kernel to `dtype`, the bias left
    float32 (it is added to the float32 product)."""
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=dtype)
    return inputs, kernel, bias


def logits_dense(num_classes: int, *, dtype: Dtype, name: str, **kwargs) -> nn.Dense:
    """The linear layer that produces logits: an `nn.Dense` (same parameters) whose product runs
    in `dtype` and returns float32 logits, so a bfloat16 model hands the loss and the top-k
    metrics float32 values. Bit-identical to `nn.Dense` when `dtype` is float32."""
    return nn.Dense(num_classes, dtype=dtype, dot_general=dot_general_f32,
                    promote_dtype=_promote_keep_bias, name=name, **kwargs)


def classifier(x, num_classes: int, dropout: float, train: bool, dtype: Dtype, name: str = "fc",
               kernel_init: Callable = dense_init):
    """Optional dropout, then the linear classifier (torch `Linear`, named like the reference;
    float32 logits, see `logits_dense`)."""
    if dropout > 0:
        x = nn.Dropout(dropout, deterministic=not train)(x)
    return logits_dense(num_classes, dtype=dtype, kernel_init=kernel_init, name=name)(x)


def max_pool(x, kernel: int, strides: int, padding: int = 0, ceil_mode: bool = False):
    """torch `MaxPool2d(kernel, strides, padding, ceil_mode)` on NHWC, with torch's output size:
    with `ceil_mode` rounded up, the extra last window may run past the input (into -inf
    padding) but must start inside it."""
    pads = []
    for size in x.shape[1:3]:
        span = size + 2 * padding - kernel
        out = (span + (strides - 1 if ceil_mode else 0)) // strides + 1
        if ceil_mode and (out - 1) * strides >= size + padding:
            out -= 1
        if out < 1:
            raise ValueError(f"model input resolution: a {size}x{size} feature map is too small for a "
                             f"{kernel}x{kernel} max pool; use a larger input resolution.")
        pads.append((padding, padding + max(0, (out - 1) * strides + kernel - (size + 2 * padding))))
    return nn.max_pool(x, (kernel, kernel), (strides, strides), padding=tuple(pads))


def adaptive_avg_pool(x, size: int):
    """torch `AdaptiveAvgPool2d(size)` on NHWC: bin i of n covers
    [floor(i n / size), ceil((i + 1) n / size)), so a smaller map is replicated (1x1 -> 7x7).
    Slices and means only (no matmul), so it adds no MACs; the identity when sizes match."""
    for axis in (1, 2):
        n = x.shape[axis]
        if n == size:
            continue
        if n % size == 0:
            x = x.reshape(x.shape[:axis] + (size, n // size) + x.shape[axis + 1:]).mean(axis=axis + 1)
            continue
        bins = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
        x = jnp.stack([jax.lax.slice_in_dim(x, lo, hi, axis=axis).mean(axis=axis) for lo, hi in bins],
                      axis=axis)
    return x


def torch_flatten(x):
    """NHWC -> [N, C*H*W] in torch's NCHW order, so torch Linear weights load unpermuted."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class LocalResponseNorm(nn.Module):
    """`torch.nn.LocalResponseNorm` across channels (the last axis), no parameters:

        b_c = a_c / (k + alpha / size * sum_{c'} a_{c'}^2) ** beta,
        c' in [c - size // 2, c + (size - 1) // 2], zero-padded at both ends.

    As in torch, `alpha` is divided by `size`. Krizhevsky et al. 2012 write the sum without
    that division (n=5, alpha=1e-4, beta=0.75, k=2): in these semantics that is
    `LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)`. Computed in float32.
    """
    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        lead = (1,) * (x.ndim - 1)
        pad = ((0, 0),) * (x.ndim - 1) + ((self.size // 2, (self.size - 1) // 2),)
        sums = jax.lax.reduce_window(jnp.square(xf), 0.0, jax.lax.add, lead + (self.size,),
                                     lead + (1,), pad)
        return (xf / (self.k + (self.alpha / self.size) * sums) ** self.beta).astype(x.dtype)


# --- Small-map convolution for XLA:CPU ------------------------------------------------------
# XLA:CPU's convolutions on output maps of a few pixels (ResNet-18's last two stages at 32x32
# input: 2x2 and 1x1 maps) run 10-40x slower than the same work as a matmul, forward and backward
# (a 3x3 conv 128x2x2x256 -> 256: 141 ms forward vs 6 ms). `conv_general_dilated` computes such
# convs as im2col patches times the reshaped kernel: one `dot_general` with the conv's MACs,
# equal to float32 rounding. ResNet-18 at 32x32, batch 128: train step 1.84 -> 0.41 s.
# (A custom max-pool gradient beat `select_and_scatter` 4x in isolation but not inside a whole
# train step, where it was 0-10% slower, so max-pool stays `nn.max_pool`.)

SMALL_MAP_PIXELS = 4  # convs whose output map has at most this many pixels run as a matmul


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated` (pass it as `nn.Conv(conv_general_dilated=...)`) that runs
    dense NHWC/HWIO convs with output maps of at most `SMALL_MAP_PIXELS` pixels as one matmul of
    the im2col patches with the kernel reshaped to (kh * kw * Cin, Cout), on the CPU backend.
    Anything else, and every conv on GPU/TPU, goes to `lax.conv_general_dilated` unchanged."""
    def fallback():
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision,
                                            **kwargs)
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
    if (jax.default_backend() != "cpu" or lhs.ndim != 4 or kwargs or feature_group_count != 1
            or rhs.shape[:2] == (1, 1)
            or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
            or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc):
        return fallback()
    window, strides = rhs.shape[:2], _pair(window_strides)
    pads = explicit_pads(lhs.shape[1:3], window, strides, padding)
    if min(min(p) for p in pads) < 0:
        return fallback()
    xp = _pad(lhs, pads)
    out_hw = _out_hw(xp.shape[1:3], window, strides, (1, 1))
    if out_hw[0] * out_hw[1] > SMALL_MAP_PIXELS or min(out_hw) < 1:
        return fallback()
    cols = jnp.concatenate([t for _, _, t in _taps(xp, window, out_hw, strides, (1, 1))], axis=-1)
    kernel = rhs.reshape(-1, rhs.shape[-1])
    return jax.lax.dot_general(cols, kernel, (((3,), (0,)), ((), ())), precision=precision)

"""`layers.depthwise_conv` / `DepthwiseConv`: every impl equals XLA's grouped convolution
(forward, input and kernel gradients) in float32, has nn.Conv's variables and counts the
conv's MACs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling import profile
from scaling.models.layers import (DEPTHWISE_IMPLS, DEPTHWISE_JIT_NAME, DepthwiseConv, depthwise_conv,
                                   depthwise_conv_slices, sym_padding)

# (input size, kernel, stride, padding, dilation)
CASES = [
    (9, 3, 1, sym_padding(3), 1),
    (9, 3, 2, sym_padding(3), 1),
    (10, 3, 2, "SAME", 1),        # TF 'SAME' at stride 2: asymmetric, even size
    (9, 3, 2, "SAME", 1),         # ... odd size
    (10, 5, 2, sym_padding(5), 1),
    (11, 5, 2, "SAME", 1),
    (8, 5, 1, "SAME", 1),
    (11, 3, 1, sym_padding(3, 2), 2),
    (10, 3, 2, "SAME", 2),
    (8, 4, 2, "SAME", 1),         # even kernel
    (9, 3, 2, "VALID", 1),
]


def _reference(x, kernel, strides, padding, dilation):
    return nn.Conv(x.shape[-1], kernel.shape[:2], strides=strides, padding=padding,
                   kernel_dilation=dilation, feature_group_count=x.shape[-1],
                   use_bias=False).apply({"params": {"kernel": kernel}}, x)


def _close(a, b, tol=1e-5):
    scale = max(1.0, float(jnp.max(jnp.abs(b))))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("impl", ("conv", "slices"))
@pytest.mark.parametrize("size,k,stride,padding,dilation", CASES)
def test_forward_and_grads_match_lax_conv(impl, size, k, stride, padding, dilation):
    rng = np.random.default_rng(size * 31 + k * 7 + stride)
    x = jnp.asarray(rng.standard_normal((2, size, size, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, 5)), jnp.float32)
    ours = jax.jit(lambda x, w: depthwise_conv(x, w, stride, padding, dilation, impl=impl))
    y, vjp = jax.vjp(ours, x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, stride, padding, dilation), x, kernel)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    _close(y, y_ref)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.shape == want.shape and got.dtype == want.dtype
        _close(got, want)


def test_auto_picks_slices_on_cpu_and_conv_elsewhere():
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 1, 2))
    names = lambda impl: str(jax.make_jaxpr(lambda x, w: depthwise_conv(x, w, impl=impl))(x, w))  # noqa: E731
    assert (DEPTHWISE_JIT_NAME in names("auto")) == (jax.default_backend() == "cpu")
    assert DEPTHWISE_JIT_NAME not in names("conv") and set(DEPTHWISE_IMPLS) == {"auto", "conv", "slices"}


def test_module_variables_equal_nn_conv():
    x = jnp.ones((1, 8, 8, 6))
    for use_bias in (False, True):
        ref = nn.Conv(6, (3, 3), padding="SAME", feature_group_count=6, use_bias=use_bias)
        ours = DepthwiseConv(6, (3, 3), padding="SAME", use_bias=use_bias)
        a, b = ref.init(jax.random.key(0), x), ours.init(jax.random.key(0), x)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), a, b)
        _close(ours.apply(b, x + jnp.arange(6.0)), ref.apply(a, x + jnp.arange(6.0)))


def test_channel_multiplier_falls_back_to_conv():
    x = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
    ref = nn.Conv(6, (3, 3), feature_group_count=3, use_bias=False)
    v = ref.init(jax.random.key(0), x)
    _close(DepthwiseConv(6, 3, impl="slices").apply(v, x), ref.apply(v, x))


def test_bf16_smoke():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    for impl in ("conv", "slices"):
        m = DepthwiseConv(4, 3, strides=2, dtype=jnp.bfloat16, impl=impl)
        v = m.init(jax.random.key(0), x)
        y = m.apply(v, x)
        assert y.dtype == jnp.bfloat16 and y.shape == (2, 4, 4, 4)
        ref = nn.Conv(4, (3, 3), strides=2, feature_group_count=4, use_bias=False).apply(v, x)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.1, rtol=0.05)
        g = jax.grad(lambda v: m.apply(v, x).astype(jnp.float32).sum())(v)
        assert g["params"]["kernel"].dtype == jnp.float32
        assert bool(jnp.isfinite(g["params"]["kernel"]).all())


def test_macs_equal_between_impls():
    x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    counts = {}
    for impl in ("conv", "slices"):
        m = DepthwiseConv(8, 5, strides=2, padding="SAME", impl=impl)
        v = jax.eval_shape(lambda x: m.init(jax.random.key(0), x), x)
        counts[impl] = profile.count_macs(m.apply, v, x)
    assert counts["slices"] == counts["conv"] == 8 * 8 * 8 * 25
    assert depthwise_conv_slices.__name__ == DEPTHWISE_JIT_NAME


def test_bad_arguments():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2))
    with pytest.raises(ValueError, match="impl"):
        depthwise_conv(x, w, impl="fast")
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv(x, w, padding="CIRCULAR")


@pytest.mark.parametrize("size,stride,padding,block_bytes", [
    (12, 1, sym_padding(3), 400), (11, 2, "SAME", 100), (13, 1, "SAME", 2000), (12, 1, "SAME", 1200)])
def test_row_blocked_kernel_grad_matches_lax_conv(monkeypatch, size, stride, padding, block_bytes):
    """Large maps reduce the kernel gradient one block of images x output rows at a time (a
    scan); force that path on a small map (even and odd output heights; blocks of one row of
    one image, several rows, several images) and compare with XLA's conv."""
    from scaling.models import layers
    monkeypatch.setattr(layers, "_DEPTHWISE_BLOCK_BYTES", 0)
    monkeypatch.setattr(layers, "_DEPTHWISE_BLOCK_G_BYTES", block_bytes)
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.standard_normal((3, size, size, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: depthwise_conv(x, w, stride, padding, impl="slices"), x, kernel)
    assert "scan" in str(jax.make_jaxpr(vjp)(y))
    _, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, stride, padding, 1), x, kernel)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g)):
        _close(got, want)


"""Small-map convolutions as matmuls (scaling.models.layers.conv_general_dilated) against XLA's
convolution: forward and gradients agree to float32 rounding; parameters and MACs do not change.
Also the CPU bf16 detection behind the bf16 warning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.models import create_model, layers
from scaling.profile import count_macs

TOL = dict(rtol=1e-5, atol=1e-5)


def grads(fn, *args):
    """Gradients of <fn(*args), fixed random cotangent> with respect to every argument."""
    out = fn(*args)
    ct = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
    return jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=tuple(range(len(args))))(*args)


CONVS = [  # input (N, H, W, Cin), kernel (kh, kw, Cin, Cout), strides, padding
    ((4, 2, 2, 8), (3, 3, 8, 6), (1, 1), ((1, 1), (1, 1))),
    ((4, 1, 1, 8), (3, 3, 8, 6), (1, 1), ((1, 1), (1, 1))),
    ((4, 4, 4, 8), (3, 3, 8, 6), (2, 2), ((1, 1), (1, 1))),
    ((4, 2, 2, 8), (3, 3, 8, 6), (2, 2), ((1, 1), (1, 1))),
    ((4, 3, 3, 8), (7, 7, 8, 6), (2, 2), ((3, 3), (3, 3))),
    ((4, 1, 3, 8), (2, 3, 8, 6), (1, 1), "SAME"),
    ((4, 3, 3, 8), (3, 3, 8, 6), (1, 1), "VALID"),
]


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CONVS)
def test_small_map_conv_matches_lax(x_shape, w_shape, strides, padding):
    x = jax.random.normal(jax.random.key(1), x_shape)
    w = jax.random.normal(jax.random.key(2), w_shape) * 0.2
    kw = dict(window_strides=strides, padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, **kw)
    new = lambda x, w: layers.conv_general_dilated(x, w, **kw)
    jaxpr = str(jax.make_jaxpr(new)(x, w))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    np.testing.assert_allclose(new(x, w), ref(x, w), **TOL)
    for a, b in zip(grads(new, x, w), grads(ref, x, w)):
        np.testing.assert_allclose(a, b, **TOL)
    assert count_macs(new, x, w) == count_macs(ref, x, w)


def test_large_maps_grouped_and_nchw_stay_convs():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    cases = [(x, w, dict(dimension_numbers=dn)),                                # 8x8 output
             (x[:, :2, :2], w[:, :, :2], dict(dimension_numbers=dn, feature_group_count=2)),
             (x[:, :2, :2].transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), {})]  # NCHW / OIHW
    for a, b, kw in cases:
        jaxpr = str(jax.make_jaxpr(lambda a, b: layers.conv_general_dilated(a, b, (1, 1), "SAME", **kw))(a, b))
        assert "conv_general_dilated" in jaxpr


def test_resnet18_small_input_matches_conv_path(monkeypatch):
    """resnet18 at 32x32 (maps down to 1x1): same params, MACs, logits, batch stats and gradients
    whether its small-map convs run as matmuls or as XLA convs. (In float64 the two agree to
    1e-13; in float32 BatchNorm over few values at 1x1 maps amplifies rounding, hence the
    tolerance relative to each gradient's scale.)"""
    model = create_model("resnet18", num_classes=10)
    x = jax.random.normal(jax.random.key(3), (16, 32, 32, 3))
    variables = model.init(jax.random.key(4), x)

    def run(small_map_pixels):
        monkeypatch.setattr(layers, "SMALL_MAP_PIXELS", small_map_pixels)

        def loss(params):
            logits, upd = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"])
            return jnp.sum(logits * jnp.arange(10.0)), (logits, upd)

        (_, (logits, upd)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        macs = count_macs(lambda v: model.apply(v, x[:1]), variables)
        return logits, upd, g, macs

    new, ref = run(layers.SMALL_MAP_PIXELS), run(0)
    assert new[3] == ref[3]
    for a, b in zip(jax.tree.leaves(new[:3]), jax.tree.leaves(ref[:3])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-6)


def test_cpu_native_bf16_detection(tmp_path):
    from scaling import _env
    amd, intel = tmp_path / "amd", tmp_path / "intel"
    amd.write_text("flags\t\t: fpu avx avx2 fma\n")
    intel.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert not _env.cpu_has_native_bf16(str(amd))
    assert _env.cpu_has_native_bf16(str(intel))
    assert not _env.cpu_has_native_bf16(str(tmp_path / "missing"))

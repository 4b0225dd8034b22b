"""AlexNet, ZFNet and VGG: exact reference counts (shapes only), torch semantics of the layers
they share (adaptive pool, ceil-mode pool, LRN, C-H-W flatten) and tiny training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaling.models import create_model, list_models, model_info
from scaling.models.layers import LocalResponseNorm, adaptive_avg_pool, max_pool
from scaling.models.vgg import VGG
from scaling.profile import model_stats
from tests.helpers import FAST_COMPILE, check_reference_counts, tiny_train_step

FAMILY_NAMES = list_models("vgg*") + ["alexnet", "zfnet"]


def shapes(model, resolution, batch=1):
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def test_matches_reference_table(reference_params):
    """Every vgg*/alexnet entry of params.json is registered and exact (params, batch_stats, GMACs 1%)."""
    wanted = sorted(n for n in reference_params if n.startswith(("vgg", "alexnet")))
    assert len(wanted) == 9 and set(wanted) <= set(FAMILY_NAMES)
    for name in wanted:
        assert model_info(name)["resolution"] == reference_params[name]["resolution"]
        check_reference_counts(name, reference_params)


def zfnet_paper_counts(num_classes=1000):
    """(params, MACs) from the layer sizes of Zeiler & Fergus 2013, Fig. 3."""
    convs = [(3, 96, 7, 110), (96, 256, 5, 26), (256, 384, 3, 13), (384, 384, 3, 13), (384, 256, 3, 13)]
    fcs = [(6 * 6 * 256, 4096), (4096, 4096), (4096, num_classes)]
    params = sum(i * o * k * k + o for i, o, k, _ in convs) + sum(i * o + o for i, o in fcs)
    macs = sum(i * o * k * k * m * m for i, o, k, m in convs) + sum(i * o for i, o in fcs)
    return params, macs


@pytest.mark.parametrize("name, overrides, params, batch_stats", [
    # Keras VGG16(weights=None, classes=5) (our notes): flattens the 7x7x512 map, no adaptive pool.
    ("vgg16", dict(num_classes=5), 134_281_029, 0),
    ("vgg16", dict(num_classes=5, avgpool_size=None), 134_281_029, 0),
    ("vgg11_lrn", {}, 132_863_336, 0),          # LRN has no parameters: = vgg11
    ("zfnet", {}, zfnet_paper_counts()[0], 0),  # 62,357,608
    ("vgg11", dict(norm="group"), 132_868_840, 0),  # affine norms: = vgg11_bn's params, no stats
    # Half-width convs (9 in out + bias + BN scale/bias each), 256*7*7 -> 4096 -> 4096 -> 10.
    ("vgg16_bn", dict(num_classes=10, width=0.5), 71_890_986, 4_224),
])
def test_published_and_derived_counts(name, overrides, params, batch_stats):
    stats = model_stats(create_model(name, **overrides), 224)
    assert (stats["params"], stats["batch_stats"]) == (params, batch_stats)


def test_zfnet_follows_the_paper_figure():
    assert zfnet_paper_counts() == (62_357_608, 1_168_032_896)
    assert model_stats(create_model("zfnet"), 224)["gmacs"] == pytest.approx(1.168032896, abs=1e-9)
    model = create_model("zfnet")
    v = shapes(model, 224)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    _, inter = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                                       mutable=["intermediates"]), v, x)
    maps = {k: m["__call__"][0].shape[1:] for k, m in inter["intermediates"].items() if k != "__call__"}
    # conv1 110x110x96, pool + LRN 55x55, conv2 26x26x256, pool + LRN 13x13, conv5 13x13x256.
    assert maps["features_0"] == (110, 110, 96) and maps["features_3"] == (55, 55, 96)
    assert maps["features_4"] == (26, 26, 256) and maps["features_7"] == (13, 13, 256)
    assert maps["features_12"] == (13, 13, 256)
    assert v["params"]["classifier_1"]["kernel"].shape == (6 * 6 * 256, 4096)  # pool5: 6x6


def test_torchvision_sequential_names():
    def convs(v):
        return sorted(int(k.split("_")[1]) for k in v["params"] if k.startswith("features"))

    alex = shapes(create_model("alexnet"), 224)
    assert convs(alex) == [0, 3, 6, 8, 10]
    assert {k for k in alex["params"] if k.startswith("classifier")} == {"classifier_1", "classifier_4",
                                                                        "classifier_6"}
    assert alex["params"]["features_0"]["kernel"].shape == (11, 11, 3, 64)
    vgg = shapes(create_model("vgg16"), 32)
    assert convs(vgg) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert vgg["params"]["classifier_0"]["kernel"].shape == (512 * 7 * 7, 4096)
    assert vgg["params"]["classifier_6"]["kernel"].shape == (4096, 1000)
    bn = shapes(create_model("vgg11_bn"), 32)
    assert set(bn["params"]["features_1"]) == {"scale", "bias"} and "features_1" in bn["batch_stats"]
    assert convs(bn)[:4] == [0, 1, 4, 5]  # conv, bn, relu, pool, conv, bn, ...
    assert convs(shapes(create_model("vgg11_lrn"), 32))[:3] == [0, 4, 7]  # conv, relu, LRN, pool, conv


@pytest.mark.parametrize("name, resolution, features", [
    ("vgg16", 224, 512), ("vgg19_bn", 64, 512), ("alexnet", 224, 256), ("zfnet", 96, 256)])
def test_include_top_false_returns_pooled_features(name, resolution, features):
    for width in (1.0, 0.5):
        model = create_model(name, include_top=False, width=width)
        v = shapes(model, resolution, batch=2)
        assert not any(k.startswith("classifier") for k in v["params"])
        x = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
        assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, int(features * width))


def torch_adaptive_avg_pool(x, out):
    """Reference: torch's AdaptiveAvgPool2d bins on NHWC numpy."""
    def bins(n):
        return [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]
    h, w = x.shape[1:3]
    return np.stack([np.stack([x[:, a:b, c:d].mean(axis=(1, 2)) for c, d in bins(w)], axis=1)
                     for a, b in bins(h)], axis=1)


@pytest.mark.parametrize("hw, out", [((13, 13), 6), ((5, 9), 3), ((14, 14), 7), ((1, 1), 7), ((3, 2), 7)])
def test_adaptive_avg_pool_matches_torch_bins(hw, out):
    x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), out), torch_adaptive_avg_pool(x, out),
                               rtol=1e-6, atol=1e-6)


def test_ceil_mode_max_pool():
    x = jnp.arange(2 * 110 * 110, dtype=jnp.float32).reshape(2, 110, 110, 1)
    y = max_pool(x, 3, 2, ceil_mode=True)
    assert y.shape == (2, 55, 55, 1)  # floor mode: 54
    assert max_pool(x, 3, 2).shape == (2, 54, 54, 1)
    # The last (partial) window covers rows/cols 108..109.
    assert float(y[0, -1, -1, 0]) == float(x[0, 109, 109, 0])
    assert max_pool(jnp.zeros((1, 2, 2, 1)), 3, 2, ceil_mode=True).shape == (1, 1, 1, 1)  # as torch
    with pytest.raises(ValueError, match="resolution"):
        max_pool(jnp.zeros((1, 2, 2, 1)), 3, 2)


def test_local_response_norm_matches_torch_formula():
    size, alpha, beta, k = 5, 5e-4, 0.75, 2.0
    x = 4.0 * np.random.default_rng(1).standard_normal((2, 3, 3, 7)).astype(np.float32)
    sq = np.pad(x ** 2, ((0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)))
    window = np.stack([sq[..., c:c + size].sum(-1) for c in range(x.shape[-1])], axis=-1)
    want = x / (k + alpha / size * window) ** beta
    lrn = LocalResponseNorm(size, alpha, beta, k)
    np.testing.assert_allclose(lrn.apply({}, jnp.asarray(x)), want, rtol=1e-5)
    even = LocalResponseNorm(4, alpha, beta, k)  # window c-2 .. c+1 for an even size
    sq4 = np.pad(x ** 2, ((0, 0), (0, 0), (0, 0), (2, 1)))
    want4 = x / (k + alpha / 4 * np.stack([sq4[..., c:c + 4].sum(-1) for c in range(7)], -1)) ** beta
    np.testing.assert_allclose(even.apply({}, jnp.asarray(x)), want4, rtol=1e-5)
    grad = jax.grad(lambda x: lrn.apply({}, x).sum())(jnp.asarray(x))
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).sum()) > 0


def test_classifier_flattens_in_torch_order():
    """classifier_0 must see the pooled map flattened as (C, H, W), like torch's x.flatten(1)."""
    model = VGG(depth=11, width=1 / 16, hidden=8, num_classes=3, avgpool_size=2)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(x):
        v = model.init(jax.random.key(1, impl="rbg"), x)
        return v, model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])[1]

    v, inter = run(x)
    last_conv = np.asarray(inter["intermediates"]["features_18"]["__call__"][0])  # [2, 4, 4, 32]
    pooled = np.maximum(last_conv, 0).reshape(2, 2, 2, 2, 2, 32).max(axis=(2, 4))  # ReLU + 2x2 pool
    fc = v["params"]["classifier_0"]
    nchw = pooled.transpose(0, 3, 1, 2).reshape(2, -1) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
    nhwc = pooled.reshape(2, -1) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
    got = np.asarray(inter["intermediates"]["classifier_0"]["__call__"][0])
    np.testing.assert_allclose(got, nchw, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, nhwc, rtol=1e-4, atol=1e-5)


def test_dtype_and_eval_determinism():
    model = VGG(depth=11, width=1 / 16, hidden=16, num_classes=4, norm="batch", dtype=jnp.bfloat16)
    v = shapes(model, 32, batch=2)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    # bf16 compute, float32 logits (tests/test_mixed_precision.py checks every family)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).dtype == jnp.float32


@pytest.mark.parametrize("name, overrides, message", [
    ("vgg16", dict(depth=12), r"model\.depth.*11, 13, 16, 19"),
    ("vgg16", dict(norm="weight"), r"model\.norm.*'batch'"),
    ("alexnet", dict(norm="bn"), r"model\.norm"),
    ("zfnet", dict(width=0), r"model\.width"),
    ("vgg11", dict(dropout=1.0), r"model\.dropout"),
    ("vgg11", dict(avgpool_size=0), r"model\.avgpool_size"),
])
def test_config_errors_name_the_field(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **overrides)


def test_resolution_and_norm_none():
    with pytest.raises(ValueError, match="resolution"):  # 32x32 is too small for AlexNet's pools
        shapes(create_model("alexnet"), 32)
    assert model_stats(create_model("vgg11", norm="none"), 32)["params"] == \
        model_stats(create_model("vgg11"), 32)["params"]


TINY = {
    # name: (model, input resolution); tiny widths and classifier; the adaptive pool makes 32x32 work.
    "vgg11_bn": (lambda: create_model("vgg11_bn", width=1 / 16, hidden=32, num_classes=10), 32),
    "vgg11_lrn_layernorm": (lambda: create_model("vgg11_lrn", norm="layer", width=1 / 16, hidden=32,
                                                 num_classes=10, dropout=0.0), 32),
    "alexnet": (lambda: create_model("alexnet", width=1 / 8, hidden=32, num_classes=10), 64),
    "zfnet": (lambda: create_model("zfnet", width=1 / 8, hidden=32, num_classes=10), 64),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_forward_and_train_step(kind):
    make, res = TINY[kind]
    model = make()
    with jax.default_prng_impl("rbg"):  # the helper's un-jitted init: rbg halves its compile time
        loss, old, new = tiny_train_step(model, (res, res, 3))
    assert loss > 0
    assert bool(old.batch_stats) == (model.norm == "batch")
    if model.norm == "batch":  # train mode updated the running statistics
        assert all(not np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(old.batch_stats), jax.tree.leaves(new.batch_stats)))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward(variables, x):
        def run(train, seed):
            return model.apply(variables, x, train=train, rngs={"dropout": jax.random.key(seed)},
                               mutable=["batch_stats"])[0]
        return run(False, 0), run(False, 1), run(True, 0), run(True, 1)

    x = jax.random.normal(jax.random.key(1), (4, res, res, 3))
    eval0, eval1, train0, train1 = forward({"params": new.params, "batch_stats": new.batch_stats}, x)
    assert eval0.shape == (4, 10) and bool(jnp.isfinite(eval0).all())
    np.testing.assert_array_equal(eval0, eval1)  # eval ignores the dropout stream
    # train mode draws dropout masks from the 'dropout' stream (when there is dropout).
    assert np.allclose(train0, train1) == (model.dropout == 0)

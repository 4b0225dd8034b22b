"""GoogLeNet, BN-Inception (v2), Inception v3, v4 and Inception-ResNet v2: exact reference counts
(shapes only), reference names, auxiliary heads, torch pooling semantics and tiny training."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling import parallel
from scaling.models import create_model, model_info
from scaling.models.googlenet import transform_input
from scaling.models.layers import adaptive_avg_pool, max_pool
from scaling.profile import model_stats
from scaling.train.state import TrainState
from scaling.train.step import make_train_step
from tests.helpers import FAST_COMPILE, check_reference_counts

NAMES = ("googlenet", "inception_v2", "inception_v3", "inception_v4", "inception_resnet_v2")
# Small inputs (75x75 is the smallest the 299-input nets take); tiny widths and depths.
TINY = {
    "googlenet": (32, {}),
    "inception_v2": (32, {}),
    "inception_v3": (75, {}),
    "inception_v4": (75, {"block_counts": (1, 1, 1)}),
    "inception_resnet_v2": (75, {"block_counts": (1, 1, 1)}),
}
FEATURES = {"googlenet": 1024, "inception_v2": 1024, "inception_v3": 2048, "inception_v4": 1536,
            "inception_resnet_v2": 1536}
# XLA:CPU's fusion emitters cost ~2x the compile time of these many-branch train steps
# (GoogLeNet: 14 -> 6 s) and tiny programs gain nothing from them.
FAST = {**FAST_COMPILE, "xla_cpu_use_fusion_emitters": False}


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _shapes(name, resolution, batch, overrides):
    model = create_model(name, **dict(overrides))
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def shapes(name, resolution, batch=1, **overrides):
    """Variable shapes of a registered model (cached: tracing these deep nets takes seconds)."""
    return _shapes(name, resolution, batch, tuple(sorted(overrides.items())))


def host_variables(abstract, seed=0):
    """Concrete variables of the given shapes drawn with numpy: He-normal kernels, unit scales,
    zero biases, BatchNorm mean 0 / var 1. `model.init` outside jit compiles one XLA program
    per op and shape (~70 s for GoogLeNet here) and jitted costs ~5 s per net; the
    initialisers themselves are flax's and the shapes are checked above."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            std = math.sqrt(2.0 / math.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) * std).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(s.shape, np.float32)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def sharded_train_step(model, resolution, variables, *, batch=8, devices=8, seed=0):
    """One SGD step of the project's train step (`make_train_step`) with the batch sharded
    over `devices` CPU devices; returns (loss, old state, new state) on the host."""
    tx = optax.sgd(0.01, momentum=0.9)
    params = variables["params"]
    opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))
    state = TrainState(step=np.zeros((), np.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=opt_state,
                       rng=np.array([0, seed], np.uint32))
    mesh = parallel.make_mesh(devices)
    rng = np.random.default_rng(seed)
    data = {"image": rng.standard_normal((batch, resolution, resolution, 3)).astype(np.float32),
            "label": rng.integers(0, model.num_classes, batch).astype(np.int32)}
    step = make_train_step(model, tx, mesh, donate=False, compiler_options=FAST)
    new, metrics = step(parallel.replicate(state, mesh),
                        parallel.to_global(data, parallel.batch_sharding(mesh)))
    return float(metrics["loss"]), state, parallel.fetch(new)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3", "inception_v4", "inception_resnet_v2"])
def test_matches_reference_table(name, reference_params):
    """Exact params and BatchNorm statistics, GMACs within 1 %, at the reference resolution."""
    assert model_info(name)["resolution"] == reference_params[name]["resolution"]
    check_reference_counts(name, reference_params)


@pytest.mark.parametrize("name, overrides, params, batch_stats", [
    ("googlenet", {"aux_logits": True}, 13_004_888, 15_072),      # torchvision, with aux heads
    ("inception_v3", {"aux_logits": True}, 27_161_264, 36_224),   # torchvision, with AuxLogits
])
def test_published_counts_with_aux_heads(name, overrides, params, batch_stats):
    v = shapes(name, model_info(name)["resolution"], **overrides)
    assert (count(v["params"]), count(v["batch_stats"])) == (params, batch_stats)


def test_inception_v2_counts():
    """BN-Inception from the paper's table (no params.json entry): our own figures; the Caffe
    port has a bias on every conv on top (one per BatchNorm channel)."""
    stats = model_stats(create_model("inception_v2"), 224)
    assert (stats["params"], stats["batch_stats"]) == (11_285_224, 20_032)
    assert stats["params"] + stats["batch_stats"] // 2 == 11_295_240
    assert stats["gmacs"] == pytest.approx(2.0326, rel=1e-3)


def test_reference_module_names():
    g = shapes("googlenet", 224, aux_logits=True)["params"]
    assert set(g["inception3a"]) == {"branch1", "branch2_0", "branch2_1", "branch3_0", "branch3_1",
                                     "branch4_1"}
    assert g["inception3a"]["branch3_1"]["conv"]["kernel"].shape == (3, 3, 16, 32)  # torchvision's 3x3
    assert g["aux2"]["conv"]["conv"]["kernel"].shape == (1, 1, 528, 128)
    assert g["aux1"]["fc1"]["kernel"].shape == (2048, 1024)

    v3 = shapes("inception_v3", 299, aux_logits=True)["params"]
    assert v3["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
    assert v3["Mixed_6b"]["branch7x7_3"]["conv"]["kernel"].shape == (7, 1, 128, 192)
    assert v3["Mixed_7c"]["branch3x3dbl_3b"]["conv"]["kernel"].shape == (3, 1, 384, 384)
    assert v3["AuxLogits"]["conv1"]["conv"]["kernel"].shape == (5, 5, 128, 768)
    assert v3["fc"]["kernel"].shape == (2048, 1000)

    v2 = shapes("inception_v2", 224)["params"]
    assert set(v2["inception_3c"]) == {"3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1",
                                       "double_3x3_2"}  # stride 2: no 1x1, max-pool pass-through
    assert v2["inception_4d"]["1x1"]["conv"]["kernel"].shape == (1, 1, 608, 96)  # paper's table
    assert v2["inception_5a"]["pool_proj"]["conv"]["kernel"].shape == (1, 1, 1056, 128)
    assert v2["last_linear"]["kernel"].shape == (1024, 1000)

    # timm's layout at reduced depth (the full depth's counts are checked against the reference).
    v4 = shapes("inception_v4", 75, block_counts=(1, 2, 1))["params"]
    assert set(v4) == {f"features_{i}" for i in range(12)} | {"last_linear"}
    assert v4["features_4"]["branch1_3"]["conv"]["kernel"].shape == (3, 3, 64, 96)
    assert v4["features_11"]["branch2_3b"]["conv"]["kernel"].shape == (3, 1, 512, 256)

    ir = shapes("inception_resnet_v2", 75, block_counts=(2, 2, 1))["params"]
    assert {k for k in ir if k.startswith("repeat")} == {"repeat_0", "repeat_1", "repeat_1_0",
                                                         "repeat_1_1", "repeat_2_0"}
    assert ir["repeat_1"]["conv2d"]["kernel"].shape == (1, 1, 128, 320)   # timm repeat.1.conv2d
    assert ir["repeat_1_1"]["conv2d"]["bias"].shape == (1088,)            # timm repeat_1.1.conv2d
    assert ir["repeat_2_0"]["branch1_2"]["conv"]["kernel"].shape == (3, 1, 224, 256)
    assert ir["block8"]["conv2d"]["kernel"].shape == (1, 1, 448, 2080)
    assert ir["classif"]["kernel"].shape == (1536, 1000)


@pytest.mark.parametrize("name", NAMES)
def test_include_top_false_returns_pooled_features(name):
    res, kw = TINY[name]
    model = create_model(name, include_top=False, **kw)
    x = jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32)
    v = shapes(name, res, include_top=False, **kw)
    assert not {"fc", "last_linear", "classif", "aux1", "AuxLogits"} & set(v["params"])
    assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, FEATURES[name])


def test_width_multiplier_and_block_counts():
    v3 = shapes("inception_v3", 75, width_multiplier=0.125, num_classes=10)["params"]  # as the tiny step
    assert v3["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 4)
    assert v3["Mixed_7c"]["branch3x3dbl_1"]["conv"]["kernel"].shape == (1, 1, 256, 56)
    assert v3["fc"]["kernel"].shape == (256, 10)
    ir = shapes("inception_resnet_v2", 75, width_multiplier=0.125, num_classes=10,
                block_counts=(1, 1, 1))["params"]
    assert ir["repeat_0"]["conv2d"]["kernel"].shape == (1, 1, 16, 40)  # back to the trunk width
    assert ir["classif"]["kernel"].shape == (192, 10)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"model\.width_multiplier"):
        create_model("googlenet", width_multiplier=0)
    with pytest.raises(ValueError, match=r"model\.block_counts.*\(10, 20, 9\)"):
        create_model("inception_resnet_v2", block_counts=(1, 2))
    with pytest.raises(ValueError, match=r"model\.block_counts.*\(4, 7, 3\)"):
        create_model("inception_v4", block_counts=(1, -1, 1))
    with pytest.raises(ValueError, match=r"model resolution.*at least 75x75"):  # grid would be empty
        shapes("inception_v4", 74, width_multiplier=0.125, block_counts=(0, 0, 0))
    with pytest.raises(ValueError, match=r"multiple of 32"):  # 232 / 8 = 29: odd grid at 3c
        shapes("inception_v2", 232, width_multiplier=0.125)
    model = create_model("inception_v3", aux_logits=True, width_multiplier=0.125)
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"model\.aux_logits.*299"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def test_alternative_norms_have_no_batch_stats():
    v = shapes("googlenet", 32, norm="group", width_multiplier=0.25)
    assert "batch_stats" not in v and v["params"]["conv1"]["bn"]["scale"].shape == (16,)


def test_torch_ceil_mode_max_pool():
    y = jnp.arange(36, dtype=jnp.float32).reshape(1, 6, 6, 1)
    out = max_pool(y, 3, 2, ceil_mode=True)[0, :, :, 0]  # 6 -> 3 (floor mode: 2)
    np.testing.assert_array_equal(out, [[14, 16, 17], [26, 28, 29], [32, 34, 35]])
    assert max_pool(y, 3, 2).shape == (1, 2, 2, 1)
    assert max_pool(jnp.zeros((1, 112, 112, 1)), 3, 2, ceil_mode=True).shape[1] == 56  # GoogLeNet stem
    # The last window must start inside the input (torch drops one that starts in the padding).
    assert max_pool(jnp.zeros((1, 5, 5, 1)), 2, 2, padding=1, ceil_mode=True).shape[1] == 3


def test_adaptive_avg_pool_matches_torch_bins():
    x = np.random.default_rng(0).standard_normal((2, 14, 14, 3)).astype(np.float32)
    out = jax.jit(adaptive_avg_pool, static_argnums=1)(x, 4)
    bins = [(0, 4), (3, 7), (7, 11), (10, 14)]  # floor(i*14/4) .. ceil((i+1)*14/4)
    expect = np.stack([np.stack([x[:, a:b, c:d].mean((1, 2)) for c, d in bins], 1) for a, b in bins], 1)
    np.testing.assert_allclose(out, expect, rtol=1e-5)
    up = jax.eval_shape(functools.partial(adaptive_avg_pool, size=4), x[:, :2, :2])
    assert up.shape == (2, 4, 4, 3)  # upsamples too, as torch


def test_transform_input():
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = np.array([0.0, 0.5, 1.0])
    # torchvision's transform maps ImageNet-normalised input onto the [-1, 1] scaling.
    np.testing.assert_allclose(transform_input(jnp.asarray((pixels - mean) / std, jnp.float32)),
                               (pixels - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("name, resolution, outputs", [
    ("googlenet", 32, 3),      # (logits, aux1, aux2)
    ("inception_v3", 299, 2),  # (logits, aux): the aux head needs the 17x17 grid of 299
])
def test_auxiliary_outputs(name, resolution, outputs):
    """Train mode returns the aux logits too, eval mode only the logits, from one set of
    variables (the heads are built at init whatever the mode)."""
    model = create_model(name, aux_logits=True, width_multiplier=0.125, num_classes=7)
    x = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    train_out, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                           rngs={"dropout": jax.random.key(0)}), v, x)
    assert [o.shape for o in train_out] == [(2, 7)] * outputs
    assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_train_step_on_8_devices(name):
    res, kw = TINY[name]
    model = create_model(name, width_multiplier=0.125, num_classes=10, **kw)
    variables = host_variables(shapes(name, res, width_multiplier=0.125, num_classes=10, **kw))
    loss, old, new = sharded_train_step(model, res, variables)
    assert np.isfinite(loss) and loss > 0
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), old.params, new.params)
    assert all(jax.tree.leaves(moved))
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(new.params))
    # Train mode updates every BatchNorm's running statistics.
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old.batch_stats, new.batch_stats)
    assert jax.tree.leaves(changed) and all(jax.tree.leaves(changed))

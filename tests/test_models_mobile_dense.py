"""MobileNet v1/v2/v3 and DenseNet: exact reference counts (shapes only), published figures,
reference layouts and names, BatchNorm settings, and one sharded train step at tiny size."""
import collections
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from scaling.models import create_model, list_models, model_info
from scaling.models.densenet import CifarDenseNet, DenseNet
from scaling.models.mobilenet import MobileNetV1, MobileNetV2, MobileNetV3
from scaling.scaling_rules import round_filters
from scaling.profile import model_stats
from tests.helpers import FAST_COMPILE, check_reference_counts, tiny_train_step

FAMILY_NAMES = list_models("mobilenet*") + list_models("densenet*")
REFERENCE_NAMES = ["mobilenet_v1", "mobilenet_v2", "mobilenet_v2_050", "mobilenet_v3_large",
                   "mobilenet_v3_small", "densenet121", "densenet161", "densenet169", "densenet201",
                   "densenet_40_12", "densenet_bc_100_12"]


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def shapes(name, resolution=None, batch=1, **overrides):
    """(variables, output) shapes of registered `name` from one abstract trace, and the
    (epsilon, momentum) of every BatchNorm it ran."""
    model = create_model(name, **overrides)
    resolution = resolution or model_info(name)["resolution"]
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    bn = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            bn.add((context.module.epsilon, context.module.momentum))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    return variables, out, bn


@functools.lru_cache(maxsize=None)
def stats(name, resolution=224, **overrides):
    return model_stats(create_model(name, **overrides), resolution)


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_counts(name, reference_params):
    """params and batch_stats exact, GMACs within 1 % of torchvision / timm / the DenseNet paper."""
    check_reference_counts(name, reference_params)


def test_every_reference_entry_of_these_families_is_registered(reference_params):
    wanted = {n for n in reference_params if n.startswith(("mobilenet", "densenet"))}
    assert wanted == set(REFERENCE_NAMES) and wanted <= set(FAMILY_NAMES)


# MobileNet v1 paper, Tables 6 and 7: MACs in millions (its resolution rows are the 224 figure
# times rho^2, so they differ from an exact count by < 1 M), parameters to 0.1 M.
@pytest.mark.parametrize("name, resolution, mmacs, mparams", [
    ("mobilenet_v1", 224, 569, 4.2), ("mobilenet_v1_075", 224, 325, 2.6),
    ("mobilenet_v1_050", 224, 149, 1.3), ("mobilenet_v1_025", 224, 41, 0.5),
    ("mobilenet_v1", 192, 418, 4.2), ("mobilenet_v1", 160, 290, 4.2), ("mobilenet_v1", 128, 186, 4.2)])
def test_mobilenet_v1_width_and_resolution_multipliers(name, resolution, mmacs, mparams):
    s = stats(name, resolution)
    assert abs(s["gmacs"] * 1000 - mmacs) < 1.0, s
    assert round(s["params"] / 1e6, 1) == mparams, s
    if name == "mobilenet_v1":  # rho changes cost, not parameters (timm mobilenetv1_100)
        assert s["params"] == 4_231_976


@pytest.mark.parametrize("name", ["mobilenet_v2_050", "mobilenet_v2"])
def test_keras_mobilenet_v2_alpha_050_count(name):
    """Keras MobileNetV2(alpha=0.5, classes=5): 712,629 = 694,085 trainable + 18,544 BN statistics.
    torchvision's layout at alpha 0.5 and timm's mobilenetv2_050 give exactly this."""
    variables, out, _ = shapes(name, alpha=0.5, num_classes=5)
    params, bn = count(variables["params"]), count(variables["batch_stats"])
    assert (params, bn, params + bn) == (694_085, 18_544, 712_629)
    assert out.shape == (1, 5)
    p = variables["params"]
    stem, head = (("conv_stem", "conv_head") if name == "mobilenet_v2_050" else ("features_0_0", "features_18_0"))
    assert p[stem]["kernel"].shape == (3, 3, 3, 16)          # round_filters(32, 0.5)
    assert p[head]["kernel"].shape == (1, 1, 160, 1280)      # last conv stays 1280 for alpha <= 1


def test_keras_mobilenet_v3_counts():
    """Keras MobileNetV3Large/Small totals (trainable + BN statistics) from our notes."""
    for name, total in (("mobilenet_v3_large", 5_507_432), ("mobilenet_v3_small", 2_554_968)):
        variables = shapes(name, 32)[0]
        assert count(variables["params"]) + count(variables["batch_stats"]) == total, name


def test_channel_rounding():
    assert [round_filters(v, 1.0) for v in (16, 12, 5.6, 11.2, 8.95, 8.8, 1280 * 1.4)] == [16, 16, 8, 16, 16, 8, 1792]
    # The last v2 conv widens only above alpha 1.
    for alpha, last in ((0.35, 1280), (1.0, 1280), (1.4, 1792)):
        v = shapes("mobilenet_v2", 32, alpha=alpha)[0]
        assert v["params"]["features_18_0"]["kernel"].shape[-1] == last


def test_timm_and_torchvision_v2_layouts_agree_at_050():
    timm = shapes("mobilenet_v2_050", 64)[0]
    tv = shapes("mobilenet_v2", 64, alpha=0.5)[0]
    key = lambda v: collections.Counter(x.shape for x in jax.tree.leaves(v))  # noqa: E731
    assert key(timm) == key(tv)
    # timm names: blocks.{stage}.{i}, depthwise-separable first block, conv_head / bn2.
    p = timm["params"]
    assert set(p["blocks_0_0"]) == {"conv_dw", "bn1", "conv_pw", "bn2"}
    assert set(p["blocks_1_0"]) == {"conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"}
    assert p["blocks_6_0"]["conv_pwl"]["kernel"].shape == (1, 1, 480, 160)
    assert {"conv_stem", "bn1", "conv_head", "bn2", "classifier"} <= set(p)
    # torchvision names: features.{i}.conv.{j}[.{k}], classifier.1.
    q = tv["params"]
    assert set(q["features_1"]) == {"conv_0_0", "conv_0_1", "conv_1", "conv_2"}
    assert set(q["features_2"]) == {"conv_0_0", "conv_0_1", "conv_1_0", "conv_1_1", "conv_2", "conv_3"}
    assert q["features_2"]["conv_1_0"]["kernel"].shape == (3, 3, 1, 48)  # depthwise on 16 x 6
    assert q["classifier_1"]["kernel"].shape == (1280, 1000)


def test_mobilenet_v1_timm_names():
    p = shapes("mobilenet_v1", 64)[0]["params"]
    assert p["conv_stem"]["kernel"].shape == (3, 3, 3, 32)
    assert set(p["blocks_3_5"]) == {"conv_dw", "bn1", "conv_pw", "bn2"}
    assert p["blocks_4_1"]["conv_pw"]["kernel"].shape == (1, 1, 1024, 1024)
    assert p["classifier"]["kernel"].shape == (1024, 1000)


def test_mobilenet_v3_torchvision_layout():
    p = shapes("mobilenet_v3_large", 64)[0]["params"]
    blk = p["features_4"]  # k5, 24 -> 72 -> 40 with SE
    assert set(blk) == {"block_0_0", "block_0_1", "block_1_0", "block_1_1", "block_2", "block_3_0", "block_3_1"}
    assert blk["block_1_0"]["kernel"].shape == (5, 5, 1, 72)
    assert blk["block_2"]["fc1"]["kernel"].shape == (1, 1, 72, 24)  # round_filters(72 // 4, 1.0)
    assert blk["block_2"]["fc2"]["kernel"].shape == (1, 1, 24, 72)
    assert set(p["features_1"]) == {"block_0_0", "block_0_1", "block_1_0", "block_1_1"}  # no expand conv
    assert p["features_16_0"]["kernel"].shape == (1, 1, 160, 960)
    assert p["classifier_0"]["kernel"].shape == (960, 1280)
    assert p["classifier_3"]["kernel"].shape == (1280, 1000)
    s = shapes("mobilenet_v3_small", 32)[0]["params"]
    assert s["features_1"]["block_1"]["fc1"]["kernel"].shape == (1, 1, 16, 8)
    assert s["classifier_0"]["kernel"].shape == (576, 1024)
    # reduced_tail halves the last stage (its first block keeps the full expansion) and the head.
    r = shapes("mobilenet_v3_large", 32, reduced_tail=True)[0]["params"]
    assert r["features_13"]["block_3_0"]["kernel"].shape == (1, 1, 672, 80)
    assert r["features_14"]["block_0_0"]["kernel"].shape == (1, 1, 80, 480)
    assert r["classifier_0"]["kernel"].shape == (480, 640)


@pytest.mark.parametrize("name, resolution, eps, momentum", [
    ("mobilenet_v1", 64, 1e-5, 0.9), ("mobilenet_v2_050", 64, 1e-5, 0.9), ("mobilenet_v3_large", 64, 1e-3, 0.99),
    ("densenet121", 64, 1e-5, 0.9), ("densenet_40_12", None, 1e-5, 0.9)])
def test_batchnorm_settings(name, resolution, eps, momentum):
    """Every BatchNorm has the reference epsilon and flax momentum (= 1 - torch momentum)."""
    assert shapes(name, resolution)[2] == {(eps, momentum)}


@pytest.mark.parametrize("name, resolution", [
    ("mobilenet_v2", 192), ("mobilenet_v2", 160), ("mobilenet_v3_small", 128), ("mobilenet_v3_large", 100),
    ("mobilenet_v1_025", 32), ("mobilenet_v2", 32), ("mobilenet_v3_large", 32)])
def test_any_resolution_that_survives_the_strides(name, resolution):
    assert shapes(name, resolution, batch=8, alpha=0.25)[1].shape == (8, 1000)


@pytest.mark.parametrize("name, overrides, features", [
    ("mobilenet_v1", {}, 1024), ("mobilenet_v1_025", {}, 256), ("mobilenet_v2", {}, 1280),
    ("mobilenet_v2_050", {}, 1280), ("mobilenet_v3_large", {}, 960), ("mobilenet_v3_small", {}, 576),
    ("densenet121", {"growth_rate": 4, "num_init_features": 8},
     (((8 + 6 * 4) // 2 + 12 * 4) // 2 + 24 * 4) // 2 + 16 * 4),
    ("densenet_bc_100_12", {"depth": 16}, ((24 + 2 * 12) // 2 + 2 * 12) // 2 + 2 * 12),
    ("densenet_40_12", {"depth": 10}, 16 + 3 * 2 * 12)])
def test_include_top_false_returns_pooled_features(name, overrides, features):
    variables, out, _ = shapes(name, 64, batch=2, include_top=False, **overrides)
    assert out.shape == (2, features)
    assert not {"classifier", "classifier_0", "classifier_1"} & set(variables["params"])


def test_densenet_layout_and_published_cifar_sizes():
    p = shapes("densenet121", 64)[0]["params"]
    f = p["features"]
    assert f["conv0"]["kernel"].shape == (7, 7, 3, 64)
    assert set(f["denseblock1"]["denselayer1"]) == {"norm1", "conv1", "norm2", "conv2"}
    assert f["denseblock1"]["denselayer6"]["conv1"]["kernel"].shape == (1, 1, 64 + 5 * 32, 128)
    assert f["transition1"]["conv"]["kernel"].shape == (1, 1, 256, 128)
    assert f["norm5"]["scale"].shape == (1024,) and p["classifier"]["kernel"].shape == (1024, 1000)
    c = shapes("densenet_40_12")[0]["params"]["features"]
    assert "norm0" not in c and c["conv0"]["kernel"].shape == (3, 3, 3, 16)
    assert set(c["denseblock3"]["denselayer12"]) == {"norm1", "conv1"}
    assert c["transition2"]["conv"]["kernel"].shape == (1, 1, 304, 304)  # no compression
    assert c["norm4"]["scale"].shape == (448,)
    bc = shapes("densenet_bc_100_12")[0]["params"]["features"]
    assert bc["conv0"]["kernel"].shape == (3, 3, 3, 24)                   # 2k
    assert bc["transition1"]["conv"]["kernel"].shape == (1, 1, 216, 108)  # compression 0.5
    assert "denselayer16" in bc["denseblock3"] and "denselayer17" not in bc["denseblock3"]


# DenseNet paper, Table 2 (parameters in millions, 10 classes); 40_12 and bc_100_12 are exact above.
@pytest.mark.parametrize("name, mparams", [("densenet_40_12", 1.0), ("densenet_100_12", 7.0),
                                           ("densenet_100_24", 27.2), ("densenet_bc_100_12", 0.8)])
def test_densenet_paper_table(name, mparams):
    assert round(count(shapes(name)[0]["params"]) / 1e6, 1) == mparams


@pytest.fixture
def jit_init(monkeypatch):
    """tiny_train_step initialises op by op; these deep, many-shaped nets initialise ~5x faster
    as one program compiled at -O0, with the same values."""
    from scaling.train import state

    eager = state.init_variables

    def init_variables(model, rng, image_shape):
        init = functools.partial(eager, model, image_shape=image_shape)
        return jax.jit(init, compiler_options=FAST_COMPILE)(rng)

    monkeypatch.setattr(state, "init_variables", init_variables)


TINY = {  # depth/width shrunk through the fields so compile + step stays small
    # One block: BN -> ReLU6 -> depthwise -> BN makes each earlier BN scale invariant (gradient ~1e-6),
    # so a longer v1 leaves more than 10 % of its arrays unmoved by one step in float32.
    "mobilenet_v1": lambda: (MobileNetV1(alpha=0.25, stages=((64, 1, 2),), num_classes=10, dropout=0.2), 32),
    "mobilenet_v2": lambda: (MobileNetV2(alpha=0.25, inverted_residual_setting=((1, 16, 1, 1), (6, 24, 2, 2)),
                                         num_classes=10), 32),
    "mobilenet_v2_timm_group": lambda: (MobileNetV2(alpha=0.25, naming="timm", norm="group",
                                                    inverted_residual_setting=((1, 16, 1, 1), (6, 24, 1, 2)),
                                                    num_classes=10), 32),
    "mobilenet_v3": lambda: (MobileNetV3(alpha=0.25, inverted_residual_setting=(
        (3, 16, 16, True, "RE", 2), (5, 72, 24, False, "HS", 2), (5, 96, 24, True, "HS", 1)), num_classes=10), 32),
    "densenet": lambda: (DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10), 32),
    "cifar_densenet_bc_instance": lambda: (CifarDenseNet(depth=10, growth_rate=4, bottleneck=True, compression=0.5,
                                                         dropout=0.2, norm="instance"), 16),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_sharded_train_step(kind, jit_init):
    model, resolution = TINY[kind]()
    loss, old, new = tiny_train_step(model, (resolution, resolution, 3), batch=8)
    assert loss > 0
    assert bool(old.batch_stats) == (model.norm == "batch")
    if model.norm == "batch":  # train mode updates the running statistics
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old.batch_stats, new.batch_stats)
        assert all(jax.tree.leaves(changed))


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match=r"model\.alpha"):
        create_model("mobilenet_v2", alpha=0.0)
    with pytest.raises(ValueError, match=r"model\.naming.*torchvision, timm"):
        create_model("mobilenet_v2", naming="keras")
    with pytest.raises(ValueError, match=r"model\.arch.*large, small"):
        MobileNetV3(arch="medium")
    with pytest.raises(ValueError, match=r"model\.inverted_residual_setting"):
        MobileNetV3(inverted_residual_setting=((3, 16, 16, True, "XX", 1),))
    with pytest.raises(ValueError, match=r"model\.inverted_residual_setting"):
        MobileNetV2(inverted_residual_setting=((1, 16, 1),))
    with pytest.raises(ValueError, match=r"model\.depth.*3 n \+ 4"):
        create_model("densenet_40_12", depth=41)
    with pytest.raises(ValueError, match=r"model\.depth.*6 n \+ 4"):
        create_model("densenet_bc_100_12", depth=42)
    with pytest.raises(ValueError, match=r"model\.compression"):
        create_model("densenet121", compression=0.0)
    with pytest.raises(ValueError, match=r"model\.block_config"):
        DenseNet(block_config=())

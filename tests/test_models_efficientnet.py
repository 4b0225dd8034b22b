"""EfficientNet: exact reference counts (shapes only), reference module names, tiny training,
drop-connect, compound scaling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from scaling.models import create_model, list_models, model_info
from scaling import scaling_rules
from scaling.models.efficientnet import B0_BLOCKS, EfficientNet
from scaling.weights import efficientnet_timm_to_torchvision as timm_to_torchvision
from scaling.weights import from_state_dict, read_state_dict
from tests.helpers import FAST_COMPILE, check_reference_counts, tiny_train_step

NAMES = list_models("efficientnet_b*") + list_models("tf_efficientnet_b*")


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def shapes(name, resolution=64, **overrides):
    model = create_model(name, **overrides)
    x = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def tiny(**kw):
    """B0 at width 0.25, depth 0.5: 10 blocks of 8-80 channels, a 320-channel head, 202k params."""
    return EfficientNet(**{"width": 0.25, "depth": 0.5, "num_classes": 10, **kw})


# tests/test_reference_counts.py checks all 16 names; here the pair whose references differ
# (torchvision evaluates b2 at 288, timm at the official 260).
@pytest.mark.parametrize("name", ["efficientnet_b2", "tf_efficientnet_b2"])
def test_matches_reference_table(name, reference_params):
    """Exact params and batch_stats, GMACs within 1 %, at the registered resolution."""
    assert model_info(name)["resolution"] == reference_params[name]["resolution"]
    check_reference_counts(name, reference_params)


def test_every_reference_entry_is_registered(reference_params):
    assert len(NAMES) == 16
    assert {n for n in reference_params if "efficientnet_b" in n} == set(NAMES)
    assert model_info("efficientnet_b2")["resolution"] == 288      # torchvision's eval size
    assert model_info("tf_efficientnet_b2")["resolution"] == 260   # official


@pytest.mark.parametrize("b, stem, head, blocks", [
    ("b0", 32, 1280, 16), ("b1", 32, 1280, 23), ("b2", 32, 1408, 23), ("b3", 40, 1536, 26),
    ("b4", 48, 1792, 32), ("b5", 48, 2048, 39), ("b6", 56, 2304, 45), ("b7", 64, 2560, 55)])
def test_published_widths_and_depths(b, stem, head, blocks):
    for name in (f"efficientnet_{b}", f"tf_efficientnet_{b}"):
        plan = create_model(name).plan()
        assert (plan.stem, plan.head, len(plan.blocks)) == (stem, head, blocks), name


def test_block_plan_se_and_drop_connect_rates():
    plan = create_model("tf_efficientnet_b0").plan()
    b = plan.blocks
    assert [x.out_channels for x in b if x.index == 0] == [16, 24, 40, 80, 112, 192, 320]
    assert [x.stride for x in b if x.index == 0] == [1, 2, 2, 2, 1, 2, 1]
    assert (b[0].mid_channels, b[0].se_channels) == (32, 8)        # expand 1, SE of 32 inputs
    assert (b[1].mid_channels, b[1].se_channels) == (96, 4)        # 16 -> 96, SE 16 * 0.25
    assert (b[-1].in_channels, b[-1].mid_channels, b[-1].se_channels) == (192, 1152, 48)
    # Linear in the block index, from 0 to 0.2 * 15 / 16 (the official code).
    assert [x.drop_rate for x in b] == pytest.approx([0.2 * k / 16 for k in range(16)])
    assert create_model("tf_efficientnet_b0", drop_connect_rate=0.0).plan().blocks[-1].drop_rate == 0.0


def test_timm_names_and_shapes_match_the_fixture(shared_dir):
    """Every key of timm's tf_efficientnet_b0 state dict maps onto our variables by one rule
    (numeric components join the previous one with '_'), with the transposed shape."""
    tensors = read_state_dict(shared_dir / "reference" / "fixtures" / "tf_efficientnet_b0.safetensors")
    ours = flatten_dict(shapes("tf_efficientnet_b0", 224))
    mapped = flatten_dict(from_state_dict("tf_efficientnet_b0", tensors, source="timm"))
    assert set(mapped) == set(ours)
    assert all(ours[k].shape == x.shape for k, x in mapped.items())
    assert len(mapped) == 311  # 363 keys - 3 fixture entries - 49 num_batches_tracked


def test_torchvision_layout_is_the_same_network_under_reference_names():
    tv, tf = shapes("efficientnet_b0"), shapes("tf_efficientnet_b0")
    for col in ("params", "batch_stats"):
        renamed = flatten_dict(timm_to_torchvision(tf[col]))
        assert {k: x.shape for k, x in renamed.items()} == {k: x.shape for k, x in flatten_dict(tv[col]).items()}
    p = tv["params"]
    assert p["features_0_0"]["kernel"].shape == (3, 3, 3, 32)
    assert set(p["features_1_0"]) == {"block_0_0", "block_0_1", "block_1", "block_2_0", "block_2_1"}
    assert set(p["features_2_0"]) == {"block_0_0", "block_0_1", "block_1_0", "block_1_1", "block_2",
                                      "block_3_0", "block_3_1"}
    assert p["features_2_0"]["block_1_0"]["kernel"].shape == (3, 3, 1, 96)        # depthwise
    assert p["features_2_0"]["block_2"]["fc1"]["kernel"].shape == (1, 1, 96, 4)
    assert p["features_8_0"]["kernel"].shape == (1, 1, 320, 1280)
    assert p["classifier_1"]["kernel"].shape == (1280, 1000)
    assert "features_7_1" not in p and "features_6_3" in p


def test_batchnorm_and_padding_follow_each_reference():
    def settings(name):
        m = create_model(name)
        return m.padding, m.bn_eps, m.bn_momentum, m.dropout

    assert settings("efficientnet_b0") == ("symmetric", 1e-5, 0.9, 0.2)   # torch BN defaults
    assert settings("efficientnet_b4") == ("symmetric", 1e-5, 0.9, 0.4)
    assert settings("efficientnet_b5") == ("symmetric", 1e-3, 0.99, 0.4)  # eps 1e-3, momentum 0.01
    assert settings("tf_efficientnet_b7") == ("same", 1e-3, 0.99, 0.5)


def test_include_top_false_returns_pooled_features():
    for name, features in (("tf_efficientnet_b3", 1536), ("efficientnet_b0", 1280)):
        model = create_model(name, include_top=False)
        x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
        v = shapes(name, include_top=False)
        assert not {"classifier", "classifier_1"} & set(v["params"])
        assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, features)


def test_norm_choice_keeps_the_parameter_count():
    bn = shapes("tf_efficientnet_b0")
    for norm in ("layer", "group"):
        other = shapes("tf_efficientnet_b0", norm=norm)
        assert count(other["params"]) == count(bn["params"]) == 5_288_548
        assert "batch_stats" not in other


@pytest.fixture
def jit_init(monkeypatch):
    """Initialise under one -O0 jit: op-by-op init compiles ~290 small programs for this
    model (~40 s of CPU here) against ~5 s for one program."""
    from scaling.train import state

    eager = state.init_variables
    monkeypatch.setattr(state, "init_variables", lambda model, rng, image_shape: jax.jit(
        functools.partial(eager, model, image_shape=image_shape), compiler_options=FAST_COMPILE)(rng))


@pytest.mark.parametrize("padding, naming", [("same", "timm"), ("symmetric", "torchvision")])
def test_tiny_train_step(padding, naming, jit_init):
    loss, old, new = tiny_train_step(tiny(padding=padding, naming=naming), (32, 32, 3))
    assert count(old.params) == count(new.params) == 202_032
    assert loss > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old.batch_stats, new.batch_stats)
    assert all(jax.tree.leaves(changed))  # train mode updated every BatchNorm's statistics


def conv_paddings(model, resolution=32):
    """(kernel, stride, padding) of every convolution in the model's forward pass."""
    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    eqns = jax.make_jaxpr(lambda v, x: model.apply(v, x))(v, x).eqns
    while len(eqns) == 1 and "jaxpr" in eqns[0].params:  # unwrap a top-level jit
        eqns = eqns[0].params["jaxpr"].eqns
    return [(e.invars[1].aval.shape[0], e.params["window_strides"][0], tuple(e.params["padding"]))
            for e in eqns if e.primitive.name == "conv_general_dilated"]


def test_padding_same_is_tensorflows_and_symmetric_is_torchs():
    same, sym = conv_paddings(tiny(padding="same")), conv_paddings(tiny(padding="symmetric"))
    assert len(same) == len(sym) > 20
    for (k, s, p_same), (_, _, p_sym) in zip(same, sym):
        assert p_sym == (((k - 1) // 2,) * 2,) * 2
        # TF SAME at an even input size: stride 2 pads one less before than after.
        assert p_same == (p_sym if s == 1 else (((k - 3) // 2, (k - 1) // 2),) * 2)
    assert same[0] == (3, 2, ((0, 1), (0, 1))) and sym[0] == (3, 2, ((1, 1), (1, 1)))  # the stem


def test_drop_connect_only_in_train_mode():
    # A small custom base table: 3 residual blocks of 8 channels after a stride-1 stem block.
    blocks = ((1, 3, 1, 8, 1), (2, 3, 1, 8, 3))
    kw = dict(blocks=blocks, stem_width=8, head_width=16, norm="group", dropout=0.0, include_top=False)
    dropping, plain = EfficientNet(drop_connect_rate=0.9, **kw), EfficientNet(drop_connect_rate=0.0, **kw)
    assert [b.drop_rate for b in dropping.plan().blocks] == pytest.approx([0.0, 0.225, 0.45, 0.675])
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
    v = jax.jit(plain.init, compiler_options=FAST_COMPILE)(jax.random.key(0), x)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(v, x, k1, k2):
        out = {}
        for tag, m in (("drop", dropping), ("plain", plain)):
            out[tag] = (m.apply(v, x, train=True, rngs={"dropout": k1}),
                        m.apply(v, x, train=True, rngs={"dropout": k2}),
                        m.apply(v, x, train=True, rngs={"dropout": k1}),
                        m.apply(v, x))  # eval: no dropout rng needed
        return out

    out = run(v, x, jax.random.key(2), jax.random.key(3))
    a, b, a_again, evaluated = out["drop"]
    assert a.shape == (16, 16)
    assert float(jnp.abs(a - b).max()) > 1e-3            # another key, other blocks dropped
    assert float(jnp.abs(a - a_again).max()) == 0.0      # the 'dropout' stream decides
    p1, p2, _, p_eval = out["plain"]
    assert float(jnp.abs(p1 - p2).max()) == 0.0          # no drop-connect -> deterministic
    assert float(jnp.abs(p1 - p_eval).max()) == 0.0      # and train == eval without BatchNorm
    assert float(jnp.abs(evaluated - p_eval).max()) == 0.0  # eval mode ignores the rate


def test_compound_scaling_of_the_baseline():
    """As a compound sweep scales it (experiments/sweep.py): the shared rules' coefficients become
    the model's `width` and `depth` fields and the data's image size."""
    d, w, r = scaling_rules.compound_coefficients(1, 1.2, 1.1, 1.15)
    m = EfficientNet(width=w, depth=d, num_classes=10, blocks=B0_BLOCKS[:3])
    assert (m.depth, m.width, scaling_rules.scaled_resolution(224, r)) == (1.2, 1.1, 258)
    assert len(m.plan().blocks) == 2 + 3 + 3   # ceil(1.2 * (1, 2, 2))
    m = EfficientNet(width=1.4, depth=1.8, padding="symmetric")
    assert (m.plan().head, m.padding) == (1792, "symmetric")


@pytest.mark.parametrize("field, value", [
    ("padding", "valid"), ("naming", "keras"), ("norm", "batchnorm"), ("width", 0.0),
    ("dropout", 1.0), ("drop_connect_rate", -0.1), ("se_ratio", 2.0), ("blocks", ((6, 3, 2, 24),)),
    ("blocks", ((6, 4, 2, 24, 1),)), ("blocks", ((6, 3, 3, 24, 1),)), ("blocks", ()),
])
def test_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^model\.{field}: .*allowed"):
        create_model("tf_efficientnet_b0", **{field: value})
    with pytest.raises(ValueError, match=r"model\.act"):
        EfficientNet(act="swishy")

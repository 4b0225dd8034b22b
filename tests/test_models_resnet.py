"""ResNet, CIFAR ResNet and Wide ResNet: exact reference counts (shapes only) and tiny training."""
import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from scaling.models import create_model, list_models, model_info
from scaling.models.resnet import CifarResNet, ResNet
from scaling.models.wide_resnet import WideResNet
from scaling.profile import model_stats

FAMILY_NAMES = list_models("resnet*") + list_models("wide_resnet*") + list_models("wrn_*")


# Smoke tests only need a program, not a fast one: XLA at -O0 compiles ~2.5x faster here;
# 'rbg' keys avoid compiling threefry.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def key(seed):
    return jax.random.key(seed, impl="rbg")


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def shapes(model, resolution, batch=1):
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def test_matches_reference_table(reference_params):
    """Every registered name with a reference entry: exact params / batch_stats, GMACs to 1%."""
    checked, wrong = [], []
    for name in FAMILY_NAMES:
        ref = reference_params.get(name)
        if ref is None:
            continue
        info = model_info(name)
        got = model_stats(create_model(name), info["resolution"])
        got.update(resolution=info["resolution"], num_classes=info["num_classes"])
        for k in ("params", "batch_stats", "resolution", "num_classes"):
            if k in ref and got[k] != ref[k]:
                wrong.append((name, k, got[k], ref[k]))
        if "gmacs" in ref and abs(got["gmacs"] / ref["gmacs"] - 1) > 0.01:
            wrong.append((name, "gmacs", got["gmacs"], ref["gmacs"]))
        checked.append(name)
    assert not wrong
    assert len(checked) >= 16, checked


def test_every_reference_entry_of_these_families_is_registered(reference_params):
    wanted = {n for n in reference_params if n.startswith(("resnet", "wide_resnet", "wrn_"))}
    assert wanted <= set(FAMILY_NAMES)


@pytest.mark.parametrize("name, params, batch_stats", [
    ("resnet50", 25_557_032, 53_120),      # torchvision
    ("wrn_28_10", 36_479_194, 17_952),     # WRN paper, 36.5M
    ("wide_resnet", 36_479_194, 17_952),   # the generic entry defaults to WRN-28-10
    ("resnet20", 269_722, 1_376),          # He et al. 2016 option A: 0.27M
    ("resnet56", 853_018, 4_064),          # 0.85M
    ("resnet110", 1_727_962, 8_096),       # 1.7M
])
def test_published_counts(name, params, batch_stats):
    v = shapes(create_model(name), model_info(name)["resolution"])
    assert (count(v["params"]), count(v["batch_stats"])) == (params, batch_stats)


def test_cifar_shortcut_options():
    a = shapes(create_model("resnet110"), 32)
    assert not any("downsample" in k for blk in a["params"].values() for k in blk)
    # Option B adds 1x1 conv + BN projections at the two stage changes (576 + 2176 params).
    b = shapes(create_model("resnet110", shortcut="B"), 32)
    assert count(b["params"]) == 1_730_714
    assert b["params"]["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 16, 32)


def test_torchvision_names_and_bottleneck_layout():
    p = shapes(create_model("resnet50"), 64)["params"]
    assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert set(p["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                  "downsample_conv", "downsample_bn"}
    assert p["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert p["fc"]["kernel"].shape == (2048, 1000)
    wide = shapes(create_model("wide_resnet50_2"), 64)["params"]
    assert wide["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    wrn = shapes(create_model("wrn_16_4"), 32)["params"]
    assert wrn["block2_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 64, 128)
    assert wrn["block1_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 16, 64)
    assert "conv_shortcut" not in wrn["block1_1"]
    assert wrn["bn1"]["scale"].shape == (256,)


@pytest.mark.parametrize("name, resolution, features", [
    ("resnet50", 224, 2048), ("resnet18", 64, 512), ("resnet20", 32, 64), ("wrn_28_10", 32, 640)])
def test_include_top_false_returns_pooled_features(name, resolution, features):
    model = create_model(name, include_top=False)
    x = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    assert "fc" not in v["params"]
    out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    assert out.shape == (2, features)


def test_generalised_depth_rule_and_errors():
    # depth = 3 N l + 4: l=2 -> (depth - 4) / 6, l=3 -> (depth - 4) / 9.
    assert WideResNet(depth=28).blocks_per_group == 4
    assert WideResNet(depth=40, convs_per_block=3).blocks_per_group == 4
    v = shapes(WideResNet(depth=22, widen_factor=1, convs_per_block=3), 16)["params"]
    assert {"conv1", "conv2", "conv3"} <= set(v["block1_1"]) and "block1_2" not in v
    with pytest.raises(ValueError, match=r"model\.depth.*10, 16, 22"):
        create_model("wide_resnet", depth=27)
    with pytest.raises(ValueError, match=r"model\.depth.*13, 22, 31"):
        create_model("wrn_28_10", convs_per_block=3)
    with pytest.raises(ValueError, match=r"model\.depth"):
        create_model("resnet20", depth=21)
    with pytest.raises(ValueError, match=r"model\.block_type"):
        create_model("wide_resnet", block_type="3x3")
    with pytest.raises(ValueError, match=r"model\.convs_per_block=3"):
        create_model("wide_resnet", block_type="B(1,3,1)")
    with pytest.raises(ValueError, match=r"model\.block"):
        ResNet(stage_sizes=(1,), block="dense")
    with pytest.raises(ValueError, match=r"model\.shortcut"):
        CifarResNet(shortcut="C")


def test_mixed_block_type_kernels():
    p = shapes(WideResNet(depth=13, widen_factor=1, convs_per_block=3, block_type="B(1,3,1)"), 16)["params"]
    assert [p["block1_0"][f"conv{j}"]["kernel"].shape[:2] for j in (1, 2, 3)] == [(1, 1), (3, 3), (1, 1)]


def test_zero_init_residual():
    model = ResNet(stage_sizes=(1,), block="bottleneck", num_filters=4, cifar_stem=True,
                   zero_init_residual=True, num_classes=3)
    p = jax.jit(model.init, compiler_options=FAST_COMPILE)(key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert float(jnp.abs(p["layer1_0"]["bn3"]["scale"]).sum()) == 0.0
    assert float(p["layer1_0"]["bn2"]["scale"].min()) == 1.0


def wrn(**kw):
    return WideResNet(**{"depth": 7, "widen_factor": 1, "convs_per_block": 1, **kw})


TINY = {
    "wrn_batch": lambda: wrn(norm="batch"),
    "wrn_layer": lambda: wrn(norm="layer"),
    "wrn_instance": lambda: wrn(norm="instance"),
    "wrn_group": lambda: wrn(norm="group"),
    "wrn_dropout": lambda: wrn(depth=10, convs_per_block=2, dropout=0.3),
    "resnet_basic": lambda: ResNet(stage_sizes=(1, 1), num_filters=8, num_classes=10, dropout=0.2),
    "resnet_bottleneck": lambda: ResNet(stage_sizes=(1, 1), block="bottleneck", num_filters=4, groups=2,
                                        width_per_group=16, num_classes=10, cifar_stem=True),
    "cifar_resnet": lambda: CifarResNet(depth=8, num_filters=4),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_forward_and_sgd_step(kind):
    model = TINY[kind]()
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    y = jnp.arange(8) % 10
    variables = jax.jit(model.init, compiler_options=FAST_COMPILE)(key(0), x)
    params, stats = variables["params"], variables.get("batch_stats", {})
    assert bool(stats) == (model.norm == "batch")

    def loss_fn(params, rng):
        logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  rngs={"dropout": rng}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, rng):
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rng)
        other_loss = loss_fn(params, jax.random.fold_in(rng, 1))[0]  # another dropout mask
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        logits = model.apply({"params": params, "batch_stats": stats}, x)  # eval: no rng needed
        return loss, new, grads, params, logits, other_loss

    loss, new, grads, params2, logits, other_loss = step(params, key(2))
    assert jnp.isfinite(loss) and loss > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(params2["fc"]["kernel"] - params["fc"]["kernel"]).max()) > 0
    if stats:  # train mode updates the running statistics
        assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(stats)
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, new["batch_stats"])
        assert all(jax.tree.leaves(changed))
    assert logits.shape == (8, 10) and bool(jnp.isfinite(logits).all())
    # Dropout follows the 'dropout' stream: a new key changes the loss, without dropout it cannot.
    assert (float(other_loss) != float(loss)) == (model.dropout > 0)

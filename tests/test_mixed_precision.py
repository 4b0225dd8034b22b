"""The bf16 policy (`train.compute_dtype=bfloat16`) for every model family: parameters and
BatchNorm statistics stay float32 after init and after a train step, every convolution and
matmul of the forward pass takes bfloat16 operands (as traced for the CPU backend and for
GPU/TPU, whose depthwise and small-map convolutions differ), and the logits are float32."""
import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.extend import core as jcore

from scaling.models import create_model, list_models, model_fields
from scaling.models.layers import DEPTHWISE_JIT_NAME
from scaling.train.run import COMPUTE_DTYPES, build_model
from tests.helpers import FAST_COMPILE, tiny_train_step

BF16 = jnp.bfloat16

# One tiny model of every module class that takes a `dtype`: (registered name, overrides, input).
TINY = {
    "resnet_basic": ("resnet18", dict(stage_sizes=(1, 1), num_filters=8), (32, 32, 3)),
    "resnet_bottleneck": ("resnet50", dict(stage_sizes=(1, 1), num_filters=4, groups=2), (32, 32, 3)),
    "cifar_resnet": ("resnet20", dict(depth=8, num_filters=4), (16, 16, 3)),
    "wide_resnet": ("wide_resnet", dict(depth=10, widen_factor=1, convs_per_block=1, dropout=0.1), (16, 16, 3)),
    "efficientnet": ("efficientnet_b0", dict(width=0.25, depth=0.25), (32, 32, 3)),
    "mobilenet_v1": ("mobilenet_v1", dict(alpha=0.25, stages=((64, 1, 2),)), (32, 32, 3)),
    "mobilenet_v2": ("mobilenet_v2", dict(alpha=0.25, inverted_residual_setting=((1, 16, 1, 1), (6, 24, 1, 2))),
                     (32, 32, 3)),
    "mobilenet_v3": ("mobilenet_v3_small", dict(alpha=0.25, inverted_residual_setting=(
        (3, 16, 16, True, "RE", 2), (5, 72, 24, False, "HS", 2))), (32, 32, 3)),
    "densenet": ("densenet121", dict(growth_rate=4, block_config=(2, 2), num_init_features=8), (32, 32, 3)),
    "cifar_densenet": ("densenet_bc_100_12", dict(depth=10, growth_rate=4), (16, 16, 3)),
    "vgg_bn": ("vgg11_bn", dict(width=1 / 16, hidden=16), (32, 32, 3)),
    "vgg_lrn_layernorm": ("vgg11_lrn", dict(norm="layer", width=1 / 16, hidden=16), (32, 32, 3)),
    "alexnet": ("alexnet", dict(width=1 / 8, hidden=16), (64, 64, 3)),
    "googlenet_aux": ("googlenet", dict(width_multiplier=0.125, aux_logits=True), (32, 32, 3)),
    "inception_v2": ("inception_v2", dict(width_multiplier=0.125), (32, 32, 3)),
    "inception_v3": ("inception_v3", dict(width_multiplier=0.125), (75, 75, 3)),
    "inception_v4": ("inception_v4", dict(width_multiplier=0.125, block_counts=(1, 1, 1)), (75, 75, 3)),
    "inception_resnet_v2": ("inception_resnet_v2", dict(width_multiplier=0.125, block_counts=(1, 1, 1)),
                            (75, 75, 3)),
    "vit": ("vit_b_16", dict(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                             image_size=32), (32, 32, 3)),
    "vit_gap_pre_logits": ("vit_s_16", dict(patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                                 mlp_dim=32, image_size=32, classifier="gap",
                                                 representation_size=8), (32, 32, 3)),
    "efficientnet_groupnorm": ("tf_efficientnet_b0", dict(width=0.25, depth=0.25, norm="group"), (32, 32, 3)),
    "wavenet": ("wavenet_small", dict(channels=8, skip_channels=8, dilation_channels=8, layers_per_stack=4,
                                      num_stacks=2), (64, 1)),
}
# A train step compiles for seconds to minutes: one model per family (GoogLeNet and the Inception
# nets share their layers; test_bf16_forward covers each of them).
# A whole bf16 train step (optimizer state included) on three families; the forward check
# above covers every family's variables and BatchNorm updates (a step costs 30 s to 4 min here).
TRAIN = ("resnet_basic", "efficientnet", "vit")


def tiny(kind, dtype=BF16):
    name, overrides, shape = TINY[kind]
    return create_model(name, num_classes=10, dtype=dtype, **overrides), shape


def init_shapes(model, shape):
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)


def not_float32(tree):
    return [(jax.tree_util.keystr(path), leaf.dtype) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if leaf.dtype != jnp.float32]


def compute_ops(jaxpr, found=None):
    """{primitive: [operand dtypes, ...]} of the convolutions and matmuls in `jaxpr` and its
    sub-jaxprs; the CPU depthwise slice form (its own jit) counts as a convolution."""
    found = collections.defaultdict(list) if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("conv_general_dilated", "dot_general"):
            found[name].append(tuple(str(v.aval.dtype) for v in eqn.invars))
            continue
        if eqn.params.get("name") == DEPTHWISE_JIT_NAME:
            found["depthwise_slices"].append(tuple(str(v.aval.dtype) for v in eqn.invars))
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    compute_ops(sub.jaxpr, found)
                elif isinstance(sub, jcore.Jaxpr):
                    compute_ops(sub, found)
    return found


def test_every_model_takes_a_compute_dtype():
    """`build_model` passes train.compute_dtype as `dtype`: a model without the field would
    silently train in float32."""
    assert [n for n in list_models() if "dtype" not in model_fields(n)] == []
    cfg = ml_collections.ConfigDict({"name": "resnet18"})
    assert build_model(cfg, 10, "bfloat16").dtype == COMPUTE_DTYPES["bfloat16"]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("kind", list(TINY))
def test_bf16_forward(kind, backend, monkeypatch):
    model, shape = tiny(kind)
    variables = init_shapes(model, shape)
    assert not_float32(variables) == []
    # Traced only, never compiled: 'gpu' makes the layers pick the accelerator forms
    # (grouped depthwise convolution, convolutions on small maps).
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x = jax.ShapeDtypeStruct((2, *shape), BF16)
    for train in (True, False):
        def apply(v, x):
            return model.apply(v, x, train=train, rngs={"dropout": jax.random.key(0)},
                               mutable=["batch_stats"] if train else False)

        jaxpr = jax.make_jaxpr(apply)(variables, x)
        ops = compute_ops(jaxpr.jaxpr)
        assert ops["conv_general_dilated"] or ops["dot_general"], kind
        if backend == "gpu":
            assert not ops["depthwise_slices"]
        for prim, operands in ops.items():
            wrong = [o for o in operands if set(o) != {"bfloat16"}]
            assert not wrong, (kind, train, prim, collections.Counter(wrong))
        out = jax.eval_shape(apply, variables, x)
        logits, updates = out if train else (out, {})
        # every head (auxiliary ones too) returns float32 logits for the float32 loss
        assert {leaf.dtype for leaf in jax.tree.leaves(logits)} == {jnp.dtype(jnp.float32)}, kind
        assert not_float32(updates) == []


@pytest.mark.parametrize("kind", TRAIN)
def test_bf16_train_step(kind):
    model, shape = tiny(kind)
    # fusion emitters double the compile time of the many-branch Inception nets (tests/test_models_inception.py)
    loss, old, new = tiny_train_step(model, shape, compute_dtype=BF16,
                                     compiler_options={**FAST_COMPILE, "xla_cpu_use_fusion_emitters": False})
    assert not_float32(old.params) == not_float32(old.batch_stats) == []
    assert not_float32(new.params) == not_float32(new.batch_stats) == not_float32(new.opt_state) == []
    if jax.tree.leaves(old.batch_stats):  # train mode updated the float32 running statistics
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), old.batch_stats, new.batch_stats)
        assert any(jax.tree.leaves(moved)), kind


@functools.lru_cache(maxsize=None)
def _logits(kind, dtype):
    model, shape = tiny(kind, dtype)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, *shape)), jnp.float32)
    init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False), compiler_options=FAST_COMPILE)
    variables = init(x)
    apply = jax.jit(lambda v, x: model.apply(v, x.astype(dtype), train=False), compiler_options=FAST_COMPILE)
    return np.asarray(apply(variables, x))


@pytest.mark.parametrize("kind", ["resnet_basic", "vit"])
def test_bf16_logits_follow_float32(kind):
    """Same parameters, bf16 compute: float32 logits close to the float32 model's."""
    ref, got = _logits(kind, jnp.float32), _logits(kind, BF16)
    assert got.dtype == np.float32
    scale = np.abs(ref).max()
    assert scale > 0 and np.abs(got - ref).max() <= 0.05 * scale, (np.abs(got - ref).max(), scale)

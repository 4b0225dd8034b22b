"""MAC counting from the jaxpr, model_stats, and XLA's compiled memory / FLOP estimates."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from scaling.models import create_model
from scaling.models.wide_resnet import WideResNet
from scaling.profile import compiled_flops, compiled_memory, count_macs, model_stats


def spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def module_macs(module, x):
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    return count_macs(module.apply, variables, x)


def test_dense():
    assert module_macs(nn.Dense(7), spec(3, 5)) == 3 * 5 * 7
    assert module_macs(nn.Dense(7), spec(2, 4, 5)) == 2 * 4 * 5 * 7  # leading dims are batch


@pytest.mark.parametrize("conv, x, macs", [
    # 3x3 'SAME' conv, 4 -> 8 channels in 2 groups: 10*10*8 outputs x 9 taps x 4/2 inputs.
    (nn.Conv(8, (3, 3), feature_group_count=2), spec(1, 10, 10, 4), 10 * 10 * 8 * 9 * 2),
    # Depthwise 3x3, stride 2, VALID on 9x9: 4x4x6 outputs x 9 taps x 1 input, batch 2.
    (nn.Conv(6, (3, 3), strides=2, padding="VALID", feature_group_count=6), spec(2, 9, 9, 6),
     2 * 4 * 4 * 6 * 9),
    # Dilation spreads the taps but does not add any: outputs x 9 taps x 3 inputs.
    (nn.Conv(5, (3, 3), kernel_dilation=2), spec(1, 8, 8, 3), 8 * 8 * 5 * 9 * 3),
])
def test_conv(conv, x, macs):
    assert module_macs(conv, x) == macs


def test_batched_matmul_and_nothing_else_counts():
    attn = lambda q, k: jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / 2.0)
    assert count_macs(attn, spec(2, 3, 5, 4), spec(2, 3, 6, 4)) == 2 * 3 * 5 * 6 * 4
    elementwise = lambda x: jnp.tanh(x).sum() + jnp.max(x) * 3
    assert count_macs(elementwise, spec(64, 64)) == 0


def test_recurses_into_sub_jaxprs():
    mm = lambda a, b: a @ b  # 4 x 8 x 16 = 512 MACs

    @jax.custom_vjp
    def custom(a, b):
        return a @ b
    custom.defvjp(lambda a, b: (a @ b, (a, b)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    def f(a, b):
        y = jax.jit(mm)(a, b) + jax.checkpoint(mm)(a, b) + custom(a, b)
        _, ys = jax.lax.scan(lambda c, _: (c, mm(a, b)), 0.0, None, length=3)
        z = jax.lax.cond(a[0, 0] > 0, lambda: mm(a, b), lambda: jnp.zeros((4, 16)))
        return y + ys.sum(0) + z

    assert count_macs(f, spec(4, 8), spec(8, 16)) == 512 * (3 + 3 + 1)


def test_shapes_only_and_kwargs():
    big = spec(4096, 4096)  # 68.7 G MACs: counted without allocating anything
    assert count_macs(lambda a, b: a @ b, big, big) == 4096 ** 3
    f = lambda a, b, transpose=False: (a.T if transpose else a) @ b
    assert count_macs(f, jnp.ones((3, 2)), jnp.ones((3, 5)), transpose=True) == 2 * 3 * 5


def test_resnet18_gmacs():
    stats = model_stats(create_model("resnet18"), 224)
    assert stats["gmacs"] == pytest.approx(1.8141, rel=0.01)  # torchvision: 1.81 GFLOPS (MACs)
    assert (stats["params"], stats["batch_stats"]) == (11_689_512, 9_600)


def test_model_stats_counts_per_image_and_without_batch_stats():
    model = WideResNet(depth=10, widen_factor=1, convs_per_block=1, norm="group")
    one, eight = model_stats(model, 16), model_stats(model, 16, batch=8)
    assert one == eight and one["batch_stats"] == 0 and one["params"] > 0
    assert model_stats(WideResNet(depth=10, widen_factor=2, convs_per_block=1), 16)["gmacs"] > one["gmacs"]


def test_compiled_memory_and_flops():
    model = nn.Dense(64)
    x = jnp.ones((64, 64))
    variables = model.init(jax.random.key(0), x)
    fn = lambda v, x: model.apply(v, x)
    mem = compiled_memory(fn, variables, x)
    assert mem["argument_bytes"] == 4 * (64 * 64 + 64 + 64 * 64)
    assert mem["output_bytes"] == 4 * 64 * 64
    assert mem["temp_bytes"] >= 0 and mem["peak_bytes"] >= mem["argument_bytes"] + mem["output_bytes"]
    flops = compiled_flops(fn, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert flops == pytest.approx(2 * 64 ** 3, rel=0.05)  # XLA counts a multiply-add as 2 FLOPs
    compiled = jax.jit(fn).lower(variables, x).compile()  # a Compiled object is reused as is
    assert compiled_memory(compiled) == mem and compiled_flops(compiled) == flops


def test_compiled_memory_of_tiny_train_step():
    model = WideResNet(depth=7, widen_factor=1, convs_per_block=1, num_classes=10)
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)

    def step(variables, x):
        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return out.mean()
        return jax.grad(loss)(variables["params"])

    mem = compiled_memory(step, variables, x)
    assert min(mem["argument_bytes"], mem["output_bytes"], mem["temp_bytes"], mem["peak_bytes"]) > 0
    assert compiled_flops(step, variables, x) > 2 * model_stats(model, 16)["gmacs"] * 1e9 * 8

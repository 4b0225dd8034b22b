"""Vision Transformer and WaveNet: reference counts, timm parity, position-embedding resizing,
causality and receptive field, tiny training steps."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling.data.audio import mu_law_decode, mu_law_encode
from scaling.models import create_model, list_models
from scaling.models.vit import VisionTransformer, resize_pos_embed
from scaling.models.wavenet import WaveNet
from scaling.weights import from_state_dict
from tests.helpers import FAST_COMPILE, check_reference_counts, tiny_train_step


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def shapes(model, input_shape, batch=1):
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def tiny_vit(**kw):
    return VisionTransformer(**{"patch_size": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                "mlp_dim": 64, "num_classes": 10, "image_size": 32, **kw})


# ---------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("name", ["vit_b_16", "vit_b_32", "vit_l_16"])
def test_vit_matches_reference_table(name, reference_params):
    """torchvision counts exactly; GMACs (conv + linear + attention matmuls) within 1%."""
    stats = check_reference_counts(name, reference_params)
    assert stats["batch_stats"] == 0


def test_every_reference_vit_is_registered(reference_params):
    assert {n for n in reference_params if n.startswith("vit")} <= set(list_models("vit*"))


@pytest.mark.parametrize("name, params", [
    ("vit_ti_16", 5_717_416),             # timm vit_tiny_patch16_224
    ("vit_tiny_patch16_224", 5_717_416),
    ("vit_s_16", 22_050_664),             # timm vit_small_patch16_224
    ("vit_l_32", 306_535_400),            # torchvision
    ("vit_h_14", 632_045_800),            # torchvision
])
def test_vit_published_counts(name, params):
    assert count(shapes(create_model(name), (224, 224, 3))["params"]) == params


def test_vit_timm_fixture_parity(shared_dir):
    """The timm vit_tiny_patch16_224 state dict maps key by key and reproduces its logits.

    The bound 1e-5 is 30x the fixture's float32 noise and below what tanh-GELU (6e-5) or
    LayerNorm eps 1e-5 (1.2e-4) would give."""
    from safetensors.numpy import load_file
    tensors = load_file(shared_dir / "reference" / "fixtures" / "vit_tiny_patch16_224.safetensors")
    x = tensors.pop("__input__").transpose(0, 2, 3, 1)
    want = tensors.pop("__logits__")
    tensors.pop("__logits_f64__")
    model = create_model("vit_tiny_patch16_224")
    params = from_state_dict(model, tensors, source="timm")["params"]
    expected = shapes(model, (224, 224, 3))["params"]
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)
    got = jax.jit(model.apply)({"params": params}, x)
    assert float(np.abs(np.asarray(got) - want).max()) < 1e-5


def test_vit_layout_include_top_and_gap():
    p = shapes(create_model("vit_b_16"), (224, 224, 3))["params"]
    assert p["cls_token"].shape == (1, 1, 768) and p["pos_embed"].shape == (1, 197, 768)
    assert p["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, 768)
    assert set(p["blocks_11"]) == {"norm1", "attn", "norm2", "mlp"}
    assert p["blocks_0"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
    assert p["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (768, 3072)
    assert "blocks_12" not in p and p["head"]["kernel"].shape == (768, 1000)

    x = jnp.ones((2, 32, 32, 3))
    for classifier, tokens in (("token", 65), ("gap", 64)):
        model = tiny_vit(include_top=False, classifier=classifier)
        v = shapes(model, (32, 32, 3))
        assert "head" not in v["params"] and ("cls_token" in v["params"]) == (classifier == "token")
        assert v["params"]["pos_embed"].shape == (1, tokens, 32)
        assert jax.eval_shape(model.apply, v, x).shape == (2, 32)
    v = shapes(tiny_vit(representation_size=16), (32, 32, 3))["params"]
    assert v["pre_logits"]["kernel"].shape == (32, 16) and v["head"]["kernel"].shape == (16, 10)


def test_vit_errors():
    with pytest.raises(ValueError, match=r"model\.classifier.*token, gap"):
        tiny_vit(classifier="cls")
    with pytest.raises(ValueError, match=r"model\.num_heads"):
        tiny_vit(num_heads=3)
    with pytest.raises(ValueError, match=r"model\.image_size"):
        tiny_vit(image_size=30)
    with pytest.raises(ValueError, match=r"model\.image_size.*resize_pos_embed"):
        shapes(tiny_vit(), (48, 48, 3))


def test_vit_train_step_then_resize_pos_embed():
    """Train at 32x32 (8x8 patches), resize the position embeddings to 48x48 (12x12), run there."""
    model = tiny_vit(dropout=0.1, attention_dropout=0.1, drop_path=0.1)
    _, _, state = tiny_train_step(model, (32, 32, 3))
    params = jax.tree.map(np.asarray, state.params)

    same = resize_pos_embed(params, 32, 4)
    assert jax.tree.all(jax.tree.map(np.array_equal, same, params))

    big = resize_pos_embed(params, 48, 4)
    old, new = params["pos_embed"], np.asarray(big["pos_embed"])
    assert new.shape == (1, 1 + 144, 32)
    np.testing.assert_array_equal(new[:, 0], old[:, 0])            # CLS embedding unchanged
    assert big["cls_token"] is params["cls_token"] and params["pos_embed"] is old  # input kept
    grid_old, grid_new = old[0, 1:].reshape(8, 8, 32), new[0, 1:].reshape(12, 12, 32)
    np.testing.assert_allclose(grid_new.mean((0, 1)), grid_old.mean((0, 1)), atol=0.02)
    # The grid is row-major and interpolated in 2-D: an embedding that grows down the rows and
    # is constant along them stays so; a constant one stays constant.
    rows = np.repeat(np.arange(8.0, dtype=np.float32), 8)[None, :, None] * np.ones((1, 1, 32), np.float32)
    for value, check in ((rows, "ramp"), (np.full((1, 64, 32), 0.5, np.float32), "constant")):
        grid = resize_pos_embed({**params, "pos_embed": np.concatenate([old[:, :1], value], 1)}, 48, 4,
                                method="bilinear")["pos_embed"][0, 1:].reshape(12, 12, 32)
        np.testing.assert_allclose(grid, np.broadcast_to(grid[:, :1], grid.shape), atol=1e-6)
        if check == "ramp":
            assert np.all(np.diff(grid[:, 0, 0]) > 0) and grid[0, 0, 0] >= 0 and grid[-1, 0, 0] <= 7
        else:
            np.testing.assert_allclose(grid, 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="bicubic"):
        resize_pos_embed(params, 48, 4, method="nearest")

    variables = resize_pos_embed({"params": params}, 48, 4)        # a variables dict works too
    logits = jax.jit(tiny_vit(image_size=48).apply, compiler_options=FAST_COMPILE)(
        variables, jax.random.normal(jax.random.key(0), (2, 48, 48, 3)))
    assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())


# ---------------------------------------------------------------------------- WaveNet


def random_variables(model, input_shape, seed=0):
    """N(0, 0.5^2) for every parameter, biases included: shapes from eval_shape, values from
    numpy (eager init would compile each op separately)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
                        shapes(model, input_shape))


def tiny_wavenet(**kw):
    return WaveNet(**{"channels": 8, "skip_channels": 8, "dilation_channels": 8,
                      "layers_per_stack": 4, "num_stacks": 2, "num_classes": 6, **kw})


def test_wavenet_registry_and_layout():
    model = create_model("wavenet")
    assert (model.num_stacks, model.layers_per_stack, model.channels) == (2, 10, 64)
    assert model.dilations == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) * 2
    assert model.receptive_field == 1 * 2046 + 2 == 2048
    assert create_model("wavenet_small").receptive_field == 257
    p = shapes(model, (4096, 1))["params"]
    assert p["input_conv"]["kernel"].shape == (2, 1, 64)
    assert p["layers_3"]["filter"]["kernel"].shape == (2, 64, 64)
    assert p["layers_3"]["skip"]["kernel"].shape == (1, 64, 128)
    assert "residual" in p["layers_18"] and "residual" not in p["layers_19"]  # last one unused
    # input conv + 20 x (filter, gate, skip, residual - last) + head1 + head2
    expected = (2 * 64 + 64) + 20 * 2 * (2 * 64 * 64 + 64) + 20 * (64 * 128 + 128) \
        + 19 * (64 * 64 + 64) + (128 * 128 + 128) + (128 * 10 + 10)
    assert count(p) == expected == 593_674


@pytest.mark.parametrize("task, include_top, shape", [
    ("classify", True, (2, 6)), ("classify", False, (2, 8)),
    ("predict", True, (2, 64, 256)), ("predict", False, (2, 64, 8))])   # 256 mu-law classes
def test_wavenet_output_shapes(task, include_top, shape):
    model = tiny_wavenet(task=task, include_top=include_top)
    v = shapes(model, (64, 1), batch=2)
    assert jax.eval_shape(model.apply, v, jax.ShapeDtypeStruct((2, 64, 1), jnp.float32)).shape == shape
    assert jax.eval_shape(model.apply, v, jax.ShapeDtypeStruct((2, 64), jnp.float32)).shape == shape


def test_wavenet_errors():
    with pytest.raises(ValueError, match=r"model\.task.*classify, predict"):
        tiny_wavenet(task="generate")
    with pytest.raises(ValueError, match=r"model\.layers_per_stack"):
        tiny_wavenet(layers_per_stack=0)


@pytest.mark.parametrize("kw", [
    {},                                                            # k=2, 2 stacks x 4: R = 32
    {"kernel_size": 3, "layers_per_stack": 3, "num_stacks": 1, "input_kernel_size": 1},  # R = 15
])
def test_wavenet_causal_with_documented_receptive_field(kw):
    model = tiny_wavenet(task="predict", **kw)
    n, t, t0 = 4, 64, 10
    x = jax.random.normal(jax.random.key(1), (n, t, 1))
    variables = random_variables(model, (t, 1))
    apply = jax.jit(model.apply, compiler_options=FAST_COMPILE)
    y = np.asarray(apply(variables, x))

    # Perturbing the input at t0 changes exactly the outputs t0 .. t0 + R - 1.
    changed = np.abs(np.asarray(apply(variables, x.at[:, t0].add(1.0))) - y).max(axis=(0, 2)) > 0
    assert np.flatnonzero(changed).tolist() == list(range(t0, t0 + model.receptive_field))

    # Causality: new inputs after t1 leave every output at <= t1 bit for bit unchanged.
    t1 = 40
    x2 = x.at[:, t1 + 1:].set(jax.random.normal(jax.random.key(2), (n, t - t1 - 1, 1)))
    y2 = np.asarray(apply(variables, x2))
    np.testing.assert_array_equal(y2[:, :t1 + 1], y[:, :t1 + 1])
    assert np.abs(y2[:, t1 + 1:] - y[:, t1 + 1:]).min(axis=(0, 2)).max() > 0


def test_wavenet_classify_train_step():
    loss, old, new = tiny_train_step(tiny_wavenet(), (64, 1))
    assert loss > 0 and count(new.params) == count(old.params)


def test_mu_law_round_trip():
    audio = jnp.linspace(-1, 1, 1001)
    classes = mu_law_encode(audio)
    assert int(classes.min()) == 0 and int(classes.max()) == 255
    assert bool(jnp.all(jnp.diff(classes) >= 0))
    # quantisation error is smallest near 0, where mu-law spends its levels
    err = jnp.abs(mu_law_decode(classes) - audio)
    assert float(err.max()) < 0.025 and float(err[490:511].max()) < 1e-3


def test_wavenet_predict_next_sample_training():
    """256-way mu-law next-sample prediction: logits at t are scored against the sample t + 1;
    a few SGD steps on one batch lower the loss."""
    model = tiny_wavenet(task="predict", num_classes=256)
    t = jnp.arange(65) / 8000.0
    freqs = jnp.array([440.0, 660.0, 880.0, 1000.0])[:, None]
    classes = mu_law_encode(0.8 * jnp.sin(2 * jnp.pi * freqs * t))        # [4, 65]
    inputs = mu_law_decode(classes[:, :-1])[..., None]                      # [4, 64, 1]
    targets = classes[:, 1:]
    params = model.init(jax.random.key(0), inputs)["params"]
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits = model.apply({"params": params}, inputs, train=True)
        assert logits.shape == (4, 64, 256)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[0] == pytest.approx(np.log(256), rel=0.1)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses

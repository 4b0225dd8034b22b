"""Weight import: float32 parity with the torchvision/timm fixtures, every covered family's
names and layouts (shapes only, eval_shape), exports that reproduce the reference files,
cross-naming imports, one clear error for a file that does not fit, file formats."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from scaling import weights
from scaling.models import create_model, model_info
from scaling.models.vit import VisionTransformer
from tests.helpers import FAST_COMPILE

FIXTURES = ("resnet18", "mobilenet_v2", "tf_efficientnet_b0", "vit_tiny_patch16_224")


def shapes(model, size):
    return flatten_dict(weights.variable_shapes(model, size))


def random_variables(flat, seed=0):
    rng = np.random.default_rng(seed)
    return unflatten_dict({k: rng.standard_normal(s.shape).astype(np.float32) for k, s in flat.items()})


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity_and_exact_export(name, shared_dir):
    """Imported weights reproduce the reference logits in float32 (eval mode) to 1e-4; the
    export of what was imported is the reference state dict, key for key and bit for bit."""
    path = shared_dir / "reference" / "fixtures" / f"{name}.safetensors"
    meta = weights.read_metadata(path)
    tensors = weights.read_state_dict(path)
    model = create_model(name)
    variables = weights.load(name, path, source=meta["source"])
    x = tensors["__input__"].transpose(0, 2, 3, 1)
    got = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=FAST_COMPILE)(variables, x)
    diff = float(np.abs(np.asarray(got) - tensors["__logits__"]).max())
    print(f"\n{name}: max |logits - reference| = {diff:.2e} (fixture fp32 noise {meta['fp32_noise']})")
    assert diff < 1e-4

    exported = weights.to_state_dict(model, variables)
    reference = {k: v for k, v in tensors.items() if not k.startswith("__")}
    assert set(exported) == set(reference)
    for k, v in reference.items():
        assert exported[k].shape == v.shape, k
        np.testing.assert_array_equal(exported[k], v.astype(exported[k].dtype), err_msg=k)


# ---------------------------------------------------------------------------- coverage

# Real torch keys (and shapes) of each reference model, written out independently of the
# importer's rules.
KNOWN = {
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.running_var": (256,),
                 "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.bias": (1000,)},
    "wide_resnet50_2": {"layer1.0.conv2.weight": (128, 128, 3, 3), "layer3.5.bn3.weight": (1024,)},
    "wrn_16_2": {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,),
                 "block1.layer.0.conv1.weight": (32, 16, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                 "block2.layer.1.conv2.weight": (64, 64, 3, 3), "bn1.running_mean": (128,), "fc.weight": (10, 128)},
    "vgg16_bn": {"features.0.weight": (64, 3, 3, 3), "features.1.running_mean": (64,),
                 "features.40.weight": (512, 512, 3, 3), "features.41.running_var": (512,),
                 "classifier.0.weight": (4096, 25088), "classifier.6.weight": (1000, 4096)},
    "vgg16": {"features.28.weight": (512, 512, 3, 3), "classifier.3.bias": (4096,)},
    "alexnet": {"features.0.weight": (64, 3, 11, 11), "features.10.weight": (256, 256, 3, 3),
                "classifier.1.weight": (4096, 9216), "classifier.4.weight": (4096, 4096),
                "classifier.6.weight": (1000, 4096)},
    "densenet121": {"features.conv0.weight": (64, 3, 7, 7), "features.norm0.running_mean": (64,),
                    "features.denseblock1.denselayer1.norm1.weight": (64,),
                    "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
                    "features.denseblock1.denselayer1.conv2.weight": (32, 128, 3, 3),
                    "features.transition1.conv.weight": (128, 256, 1, 1), "features.norm5.weight": (1024,),
                    "classifier.weight": (1000, 1024)},
    "googlenet": {"conv1.conv.weight": (64, 3, 7, 7), "conv1.bn.running_var": (64,),
                  "inception3a.branch1.conv.weight": (64, 192, 1, 1),
                  "inception3a.branch2.0.conv.weight": (96, 192, 1, 1),
                  "inception3a.branch2.1.conv.weight": (128, 96, 3, 3),
                  "inception3a.branch4.1.conv.weight": (32, 192, 1, 1), "aux1.conv.conv.weight": (128, 512, 1, 1),
                  "aux1.fc1.weight": (1024, 2048), "aux2.fc2.weight": (1000, 1024), "fc.weight": (1000, 1024)},
    "inception_v3": {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
                     "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
                     "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
                     "AuxLogits.conv0.conv.weight": (128, 768, 1, 1), "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
                     "AuxLogits.fc.weight": (1000, 768), "fc.weight": (1000, 2048)},
    "inception_v4": {"features.0.conv.weight": (32, 3, 3, 3), "features.0.bn.running_mean": (32,),
                     "features.3.conv.conv.weight": (96, 64, 3, 3), "features.4.branch1.2.conv.weight": (64, 64, 7, 1),
                     "features.21.branch1_1a.conv.weight": (256, 384, 1, 3),
                     "features.21.branch2_0.conv.weight": (384, 1536, 1, 1),
                     "features.21.branch3.1.conv.weight": (256, 1536, 1, 1), "last_linear.weight": (1000, 1536)},
    "inception_resnet_v2": {"conv2d_1a.conv.weight": (32, 3, 3, 3), "mixed_5b.branch3.1.conv.weight": (64, 192, 1, 1),
                            "repeat.0.conv2d.weight": (320, 128, 1, 1), "repeat.0.conv2d.bias": (320,),
                            "repeat_1.3.conv2d.bias": (1088,), "repeat_2.8.branch1.2.conv.weight": (256, 224, 3, 1),
                            "block8.conv2d.weight": (2080, 448, 1, 1), "conv2d_7b.bn.running_var": (1536,),
                            "classif.weight": (1000, 1536)},
    "mobilenet_v3_large": {"features.0.0.weight": (16, 3, 3, 3), "features.1.block.0.0.weight": (16, 1, 3, 3),
                           "features.4.block.2.fc1.weight": (24, 72, 1, 1), "features.4.block.2.fc1.bias": (24,),
                           "features.16.0.weight": (960, 160, 1, 1), "classifier.0.weight": (1280, 960),
                           "classifier.3.weight": (1000, 1280)},
    "mobilenet_v2_050": {"conv_stem.weight": (16, 3, 3, 3), "blocks.0.0.conv_dw.weight": (16, 1, 3, 3),
                         "blocks.0.0.conv_pw.weight": (8, 16, 1, 1), "conv_head.weight": (1280, 160, 1, 1),
                         "classifier.weight": (1000, 1280)},
    "efficientnet_b0": {"features.0.0.weight": (32, 3, 3, 3), "features.1.0.block.0.0.weight": (32, 1, 3, 3),
                        "features.1.0.block.1.fc1.weight": (8, 32, 1, 1), "features.1.0.block.2.0.weight": (16, 32, 1, 1),
                        "features.2.0.block.0.0.weight": (96, 16, 1, 1), "features.8.0.weight": (1280, 320, 1, 1),
                        "classifier.1.weight": (1000, 1280)},
    "vit_b_16": {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
                 "blocks.11.attn.qkv.weight": (2304, 768), "blocks.0.mlp.fc2.bias": (768,), "head.weight": (1000, 768)},
}
# One or two models per family (the fixtures cover resnet18, mobilenet_v2, tf_efficientnet_b0
# and vit_tiny_patch16_224 key for key).
COVERED = [("resnet50", {}), ("wide_resnet50_2", {}), ("wrn_16_2", {}), ("resnet56", {"shortcut": "B"}),
           ("vgg16_bn", {}), ("vgg16", {}), ("alexnet", {}), ("zfnet", {}), ("densenet121", {}),
           ("googlenet", {"aux_logits": True}), ("inception_v3", {"aux_logits": True}),
           ("inception_v4", {}), ("inception_resnet_v2", {}), ("mobilenet_v1", {}), ("mobilenet_v2_050", {}),
           ("mobilenet_v3_large", {}), ("efficientnet_b0", {}), ("vit_b_16", {})]


@pytest.mark.parametrize("name, overrides", COVERED, ids=[c[0] for c in COVERED])
def test_every_leaf_lands(name, overrides):
    """Our variables (shapes from eval_shape) exported to torch names and layouts, then
    imported: every leaf comes back to its own place (each leaf carries its own constant;
    zero-stride arrays, so full-size models cost no memory), the known real keys are among
    the exported ones, and the head table names exactly the class-dependent modules."""
    model = create_model(name, **overrides)
    size = model_info(name)["resolution"]
    flat = shapes(model, size)
    ids = unflatten_dict({k: np.broadcast_to(np.float32(i), s.shape) for i, (k, s) in enumerate(flat.items())})
    exported = weights.to_state_dict(model, ids)
    assert {k: exported[k].shape for k in KNOWN.get(name, {})} == KNOWN.get(name, {})
    back = flatten_dict(weights.from_state_dict(model, exported, image_size=size))
    assert set(back) == set(flat)
    for i, (k, s) in enumerate(flat.items()):
        assert back[k].shape == s.shape and back[k].dtype == s.dtype, k
        assert float(back[k].reshape(-1)[0]) == i, k

    other = shapes(create_model(name, **overrides, num_classes=7), size)
    changed = {k[1:-1] for k in flat if other[k].shape != flat[k].shape}
    heads = {tuple(h.split("/")) for h in weights.head_paths(model)}
    assert changed and changed <= heads


def test_head_paths_and_uncovered_family():
    assert weights.head_paths(create_model("resnet18")) == ("fc",)
    assert weights.head_paths(create_model("efficientnet_b0")) == ("classifier_1",)
    assert weights.head_paths(create_model("mobilenet_v2_050")) == ("classifier",)
    assert weights.head_paths(create_model("vgg11")) == ("classifier_6",)
    with pytest.raises(ValueError, match="no importer for WaveNet"):
        weights.head_paths(create_model("wavenet"))


def tiny_vit(**kw):
    return VisionTransformer(**{"patch_size": 8, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                "mlp_dim": 24, "num_classes": 3, "image_size": 16, **kw})


def test_vit_torchvision_names_and_pos_embed_resize():
    """torchvision's ViT names (written out here) land on our timm-named tree; a model built for
    a larger image gets the position embeddings interpolated."""
    rng = np.random.default_rng(0)
    d, m, n, c = 16, 24, 4 + 1, 3
    layer = "encoder.layers.encoder_layer_0"
    spec = {"class_token": (1, 1, d), "conv_proj.weight": (d, 3, 8, 8), "conv_proj.bias": (d,),
            "encoder.pos_embedding": (1, n, d), f"{layer}.ln_1.weight": (d,), f"{layer}.ln_1.bias": (d,),
            f"{layer}.self_attention.in_proj_weight": (3 * d, d), f"{layer}.self_attention.in_proj_bias": (3 * d,),
            f"{layer}.self_attention.out_proj.weight": (d, d), f"{layer}.self_attention.out_proj.bias": (d,),
            f"{layer}.ln_2.weight": (d,), f"{layer}.ln_2.bias": (d,), f"{layer}.mlp.0.weight": (m, d),
            f"{layer}.mlp.0.bias": (m,), f"{layer}.mlp.3.weight": (d, m), f"{layer}.mlp.3.bias": (d,),
            "encoder.ln.weight": (d,), "encoder.ln.bias": (d,), "heads.head.weight": (c, d), "heads.head.bias": (c,)}
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.items()}
    p = weights.from_state_dict(tiny_vit(), sd)["params"]           # source='auto' finds torchvision
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["kernel"], sd[f"{layer}.self_attention.in_proj_weight"].T)
    np.testing.assert_array_equal(p["patch_embed"]["proj"]["kernel"], sd["conv_proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["blocks_0"]["mlp"]["fc2"]["bias"], sd[f"{layer}.mlp.3.bias"])
    np.testing.assert_array_equal(p["norm"]["scale"], sd["encoder.ln.weight"])
    np.testing.assert_array_equal(p["cls_token"], sd["class_token"])
    with pytest.raises(weights.WeightsMismatchError):
        weights.from_state_dict(tiny_vit(), sd, source="timm")

    big = weights.from_state_dict(tiny_vit(image_size=32), sd, source="torchvision")["params"]
    assert big["pos_embed"].shape == (1, 1 + 16, d)
    np.testing.assert_array_equal(big["pos_embed"][:, 0], sd["encoder.pos_embedding"][:, 0])


def test_efficientnet_timm_state_dict_into_torchvision_names():
    """timm names (conv_pw, se.conv_reduce, ...) load into the torchvision-named network."""
    kw = dict(width=0.25, depth=0.25, num_classes=4)
    timm_model, tv_model = create_model("tf_efficientnet_b0", **kw), create_model("efficientnet_b0", **kw)
    timm_vars = random_variables(shapes(timm_model, 32))
    sd = weights.to_state_dict(timm_model, timm_vars)
    assert "blocks.1.0.se.conv_reduce.weight" in sd and "conv_head.weight" in sd
    got = weights.from_state_dict(tv_model, sd, image_size=32)            # auto -> timm
    want = {col: weights.efficientnet_timm_to_torchvision(tree) for col, tree in timm_vars.items()}
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
    assert set(flatten_dict(got)) == set(shapes(tv_model, 32))


# ---------------------------------------------------------------------------- errors


@functools.lru_cache(maxsize=None)
def small_resnet():
    model = create_model("resnet18", num_filters=4, num_classes=10)
    variables = random_variables(shapes(model, 32))
    return model, variables, weights.to_state_dict(model, variables)


def load_small(sd, source="torchvision", **kw):
    model, _, _ = small_resnet()
    return weights.from_state_dict(model, sd, source=source, image_size=32, **kw)


def test_round_trip_is_bit_exact():
    model, variables, sd = small_resnet()
    assert sd["layer2.0.downsample.0.weight"].shape == (8, 4, 1, 1)
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    assert jax.tree.all(jax.tree.map(np.array_equal, load_small(sd), variables))


@pytest.mark.parametrize("change, kind, listed", [
    (lambda sd: sd.pop("layer1.0.conv1.weight"), "1 missing",
     "layer1.0.conv1.weight  -> params/layer1_0/conv1/kernel (3, 3, 4, 4)"),
    (lambda sd: sd.update({"layer9.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)}), "1 unexpected",
     "layer9.0.conv1.weight (4, 4, 3, 3)  -> params/layer9_0/conv1/kernel"),
    (lambda sd: sd.update({"layer1.0.bn1.running_var": np.ones(5, np.float32)}), "1 wrong shape",
     "layer1.0.bn1.running_var: file (5,) -> (5,), model (4,)"),
])
def test_mismatch_is_one_clear_error(change, kind, listed):
    sd = dict(small_resnet()[2])
    change(sd)
    with pytest.raises(weights.WeightsMismatchError) as e:
        load_small(sd)
    assert f"does not fit ResNet (torchvision names): {kind}." in str(e.value)
    assert listed in str(e.value)


def test_all_problems_in_one_error_and_the_head_hint():
    sd = dict(small_resnet()[2])
    sd.pop("layer1.0.conv1.weight")
    sd.pop("layer4.1.bn2.running_mean")
    sd["extra.weight"] = np.zeros((3, 3), np.float32)
    sd["fc.weight"], sd["fc.bias"] = np.zeros((1000, 32), np.float32), np.zeros(1000, np.float32)
    with pytest.raises(weights.WeightsMismatchError) as e:
        load_small(sd)
    err = e.value
    assert sorted(err.missing) == ["batch_stats/layer4_1/bn2/mean", "params/layer1_0/conv1/kernel"]
    assert err.unexpected == ["extra.weight"] and sorted(err.wrong_shape) == ["fc.bias", "fc.weight"]
    assert "2 missing, 1 unexpected, 2 wrong shape" in str(err)
    assert "head (fc) has 1000 classes in the file and 10 in the model: pass new_head=True" in str(err)


def test_new_head_is_the_fresh_init_and_include_top_false_drops_it():
    model, variables, sd = small_resnet()
    sd = {**sd, "fc.weight": np.zeros((1000, 32), np.float32), "fc.bias": np.zeros(1000, np.float32)}
    rng = jax.random.key(3)
    got = load_small(sd, new_head=True, rng=rng)
    params_rng, dropout_rng = jax.random.split(rng)
    fresh = jax.jit(model.init, compiler_options=FAST_COMPILE)(
        {"params": params_rng, "dropout": dropout_rng}, jnp.zeros((1, 32, 32, 3)))
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(got["params"]["layer1_0"]["conv1"]["kernel"],
                                  variables["params"]["layer1_0"]["conv1"]["kernel"])
    headless = weights.from_state_dict(model.clone(include_top=False), sd, image_size=32)
    assert "fc" not in headless["params"]


def test_bad_source_and_files(tmp_path):
    with pytest.raises(ValueError, match="weights source: unknown 'keras'"):
        load_small(small_resnet()[2], source="keras")
    with pytest.raises(ValueError, match="vgg11 .*follows torchvision names; 'timm' state dicts are not supported"):
        weights.from_state_dict("vgg11", {}, source="timm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.read_state_dict(tmp_path / "none.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type '.npz'"):
        weights.read_state_dict(tmp_path / "w.npz")
    try:
        import torch  # noqa: F401
    except ImportError:
        (tmp_path / "w.pth").write_bytes(b"not read")
        with pytest.raises(ImportError, match=r"pip install torch"):
            weights.read_state_dict(tmp_path / "w.pth")


def test_save_and_load_a_file(tmp_path):
    model, variables, _ = small_resnet()
    path = weights.save(str(tmp_path / "r.safetensors"), model, variables, {"classes": json.dumps([1, 2])})
    assert weights.read_metadata(path) == {"classes": "[1, 2]"}
    got = weights.load(model, path, image_size=32)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, variables))

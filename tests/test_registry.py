"""One record per model: every record is complete and true to its module (head paths in the
param tree, shapes only), and the weight importer, fine-tuning, data defaults, the summary and
the model switch of a config all read it."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import compare, efficientnet_grid, mobilenet_width, train, transfer
from scaling import summary, weights
from scaling.models import (CIFAR10_MEAN, IMAGENET_MEAN, INCEPTION_MEAN, INCEPTION_STD, ModelInfo,
                            create_model, default_model_config, info_of, list_models, model_fields,
                            model_info)
from scaling.train import build_model, data_config, finetune, resolve_image_size


def param_paths(name: str) -> set[tuple[str, ...]]:
    """Every module path of the model's params at its registered input (jax.eval_shape: no
    compute), auxiliary heads built where the model has them."""
    info = model_info(name)
    aux = {"aux_logits": True} if "aux_logits" in model_fields(name) else {}
    model = create_model(name, **aux)
    x = jax.ShapeDtypeStruct((1, *info.input_shape), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
    paths = set()
    for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(k.key for k in keys)
        paths.update(names[:i] for i in range(1, len(names)))
    return paths


def test_every_record_is_complete():
    for name in list_models():
        info = model_info(name)
        assert isinstance(info, ModelInfo) and info.name == name
        assert info.problem() == "", name
        assert info.weights is None or info.weights in weights.FAMILIES, name


def head_groups() -> dict[str, list[str]]:
    """The registered names by (module class, heads claimed), each under its shortest name
    (resnet18 for resnet101 too): one module class names its head by the same code for every
    variant, so one trace per group checks every record's heads (all 80+ full-size traces
    take minutes on 2 cores)."""
    groups: dict[tuple, list[str]] = {}
    for name in list_models():
        groups.setdefault((type(create_model(name)), model_info(name).heads), []).append(name)
    return {min(names, key=lambda n: (len(n), n)): names for names in groups.values()}


@pytest.mark.parametrize("name, group", sorted(head_groups().items()), ids=sorted(head_groups()))
def test_every_records_heads_exist_in_its_param_tree(name, group):
    paths = param_paths(name)
    for head in model_info(name).heads:
        assert tuple(head.split("/")) in paths, f"{group}: head {head!r} is not in the param tree"


def test_record_contents():
    r50, wrn, v3 = model_info("resnet50"), model_info("wrn_28_10"), model_info("inception_v3")
    assert (r50.resolution, r50.input_shape, r50.mean, r50.head, r50.weights) == \
        (224, (224, 224, 3), IMAGENET_MEAN, "fc", "resnet")
    assert (wrn.resolution, wrn.num_classes, wrn.mean, wrn.weights) == (32, 10, CIFAR10_MEAN, "wide_resnet")
    assert (v3.resolution, v3.heads, v3.crop_fraction) == (299, ("fc", "AuxLogits/fc"), 299 / 342)
    assert model_info("inception_v4").mean == INCEPTION_MEAN
    assert model_info("efficientnet_b3").crop_fraction == 300 / 320
    assert model_info("inception_v2").weights is None
    wave = model_info("wavenet")
    assert (wave.modality, wave.input_shape, wave.sample_rate) == ("audio", (16000, 1), 16000)
    assert (wave.mean, wave.std, wave.crop_fraction) == (None, None, None)
    assert r50["resolution"] == 224  # mapping-style reads still work


@pytest.mark.parametrize("bad, problem", [
    (dict(mean=None), "needs mean and std"),
    (dict(crop_fraction=1.5), "crop_fraction in"),
    (dict(modality="video"), "modality='video'"),
    (dict(modality="audio"), "needs a sample_rate"),
    (dict(sample_rate=16000), "sample_rate is for audio"),
])
def test_incomplete_records_are_refused(bad, problem):
    with pytest.raises(ValueError, match=problem):
        ModelInfo(name="x", head="fc", **bad)


def test_modules_map_back_to_their_records():
    for name in list_models():
        info = info_of(create_model(name))
        assert dataclasses.replace(info, name=name) == model_info(name), name
    # Other values of the scaling knobs keep torchvision's record, not tf_efficientnet_b0's.
    assert info_of(create_model("efficientnet_b0", width=0.5, depth=0.5)).head == "classifier_1"
    assert info_of(jax.numpy.zeros(1)) is None


def test_weight_import_reads_the_record():
    for name in ("resnet18", "efficientnet_b0", "tf_efficientnet_b0", "mobilenet_v2_050", "googlenet"):
        assert weights.head_paths(create_model(name)) == model_info(name).heads
    with pytest.raises(ValueError, match=r"no importer for InceptionV2 models \(inception_v2\)"):
        weights.head_paths(create_model("inception_v2"))


def test_finetune_finds_the_head_by_the_record(tmp_path):
    c = transfer.get_config("test")
    c.init.mode = "linear_probe"
    for name, heads in (("tf_efficientnet_b0", {("classifier",)}),
                        ("googlenet", {("fc",), ("aux1", "fc2"), ("aux2", "fc2")})):
        model = create_model(name, num_classes=4, **({"aux_logits": True} if name == "googlenet" else {}))
        x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
        plan = finetune.make_plan(c, model, params)
        assert set(plan.heads) == heads
        assert {k[0] for k in plan.trainable} == {h[0] for h in heads}
    c.model = ml_collections.ConfigDict(dict(name="inception_v2"))
    c.init.path = str(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'inception_v2' has no weight importer"):
        finetune.validate_init_config(c)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", list_models())
def test_default_model_config_builds_the_registered_model(name):
    section = default_model_config(name)
    assert section.name == name
    assert not {"num_classes", "image_size", "dtype", "include_top"} & set(section)
    aux = {"aux_logits": True} if model_info(name).aux_heads else {}   # trained with them
    assert build_model(section, 7) == create_model(name, num_classes=7, **aux)


def test_default_model_config_takes_typed_overrides():
    c = train.get_config("default")
    c.model = default_model_config("vgg16")
    c.lock()
    c.model.norm = "batch"          # a None-valued knob is a typed placeholder
    c.model.width = 0.5
    with pytest.raises(TypeError):
        c.model.width = "wide"
    with pytest.raises(AttributeError):
        c.model.no_such_knob = 1
    assert build_model(c.model, 10) == create_model("vgg16", norm="batch", width=0.5, num_classes=10)
    assert default_model_config("wrn_28_10").to_dict() == dict(
        name="wrn_28_10", depth=28, widen_factor=10, convs_per_block=2, dropout=0.0, norm="batch",
        block_type="B(3,3)")


def switched(name, config=None, **data):
    c = config or train.get_config("default")
    c.model = default_model_config(name)
    c.data.update(data)
    return c


def test_data_defaults_follow_the_model_unless_set():
    d = data_config(train.get_config("default"))
    assert (d.mean, d.crop_fraction) == (CIFAR10_MEAN, 0.875)
    assert data_config(switched("resnet18")).mean == IMAGENET_MEAN
    assert data_config(switched("inception_v4")).std == INCEPTION_STD
    assert data_config(switched("vit_s_16")).crop_fraction == 0.9
    assert data_config(switched("resnet18", mean=(0.1, 0.2, 0.3))).mean == (0.1, 0.2, 0.3)
    assert train.get_config("default").data.mean is None   # the config itself is untouched


@pytest.mark.parametrize("module, preset, mean", [
    (train, "default", CIFAR10_MEAN), (train, "imagenet", IMAGENET_MEAN),
    (compare, "default", CIFAR10_MEAN), (compare, "imagenet", IMAGENET_MEAN),
    (efficientnet_grid, "default", CIFAR10_MEAN), (efficientnet_grid, "imagenet", IMAGENET_MEAN),
    (mobilenet_width, "default", CIFAR10_MEAN), (transfer, "default", CIFAR10_MEAN),
    (transfer, "tfds", IMAGENET_MEAN)])
def test_existing_configs_keep_their_preprocessing(module, preset, mean):
    """What every config normalised with before the records: CIFAR-10 statistics on CIFAR,
    ImageNet's at 224 px; the eval crop 0.875 throughout."""
    c = module.get_config(preset)
    names = [s.name for s in c.sweep.models.values()] if c.get("sweep") and c.sweep.get("models") \
        else [c.model.name]
    for name in names:
        c.model = ml_collections.ConfigDict(dict(name=name))
        d = data_config(c)
        assert (d.mean, d.crop_fraction) == (mean, 0.875), (module.__name__, preset, name)


def test_image_size_follows_the_model_unless_set():
    c = switched("inception_v3")
    assert resolve_image_size(c, user_set=False) == 299 == c.data.image_size
    c = switched("inception_v3", image_size=320)
    assert resolve_image_size(c, user_set=True) == 320
    c = switched("wavenet")
    assert resolve_image_size(c, user_set=False) == 32   # audio: not an image size


def test_vit_image_size_follows_the_data():
    section = default_model_config("vit_ti_16")
    assert build_model(section, 10, image_size=32).image_size == 32
    c = switched("vit_ti_16")
    c.model.image_size = 64
    with pytest.raises(ValueError, match="model.image_size=64 differs from data.image_size=32"):
        build_model(c.model, 10, image_size=32)


def test_summary_reads_the_record():
    assert summary.input_shape("wavenet") == (16000, 1)
    assert summary.input_shape("inception_v3") == (299, 299, 3)
    assert summary.input_shape("resnet18", 64) == (64, 64, 3)
    row = summary.summarize("wavenet_small", memory=False)
    assert (row["modality"], row["head"], row["weights"], row["input_shape"]) == \
        ("audio", "head2", None, [16000, 1])

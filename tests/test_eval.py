"""Evaluation, prediction and weight export of a trained run: experiments/eval.py
(configs/eval.py), scaling/predict.py and scaling/weights/export.py."""
import json
import pathlib

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

from configs import eval as eval_config
from configs import train as train_config
from experiments import eval as eval_exp
from scaling import predict, rundir, weights
from scaling.data import build_dataset, build_source
from scaling.models import create_model
from scaling.models.vit import VisionTransformer
from scaling.train import data_config, fit, load_run
from scaling.train.state import init_variables
from scaling.weights import export
from tests.helpers import run_launch

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run of configs/train.py:test (WRN-10-1 at 16 px, 16 images per class)."""
    workdir = tmp_path_factory.mktemp("run") / "train"
    result = fit(train_config.get_config("test"), str(workdir))
    return str(workdir), result


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def one_line_error(capsys, main, argv) -> str:
    """Runs a command-line `main`, expecting exit status 2 and one `error: ...` line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- eval

def test_eval_of_a_run_reproduces_its_val_top1(trained, tmp_path):
    """launch.py --config configs/eval.py on the run's workdir: its own eval split, the same
    top-1 / top-5 as result.json exactly; eval.json holds per-class top-1 with class names and
    the confusion matrix; confusion.png is written."""
    workdir, result = trained
    out = tmp_path / "train_eval"
    proc = run_launch(["--config", "configs/eval.py", f"--config.eval.workdir={workdir}",
                       "--workdir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / eval_exp.EVAL_JSON).read_text())
    assert report["top1"] == result["val_top1"] and report["top5"] == result["val_top5"]
    assert report["loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    assert report["examples"] == result["val_examples"] == 160
    assert report["class_names"] == list(CIFAR10)
    confusion = np.asarray(report["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 160
    per_class = report["per_class"]
    assert [c["class"] for c in per_class] == list(CIFAR10)
    assert all(c["examples"] == 16 for c in per_class)
    hits = sum(round(c["top1"] * c["examples"]) for c in per_class)
    assert hits == round(result["val_top1"] * 160)
    assert report["data"]["description"] == "embedded:cifar10 validation"
    png = (out / eval_exp.CONFUSION_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def folder_of(root, classes, images_by_class, splits=("train", "val")):
    """root/<split>/<class>/<i>.png, lossless copies of the given images."""
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i, img in enumerate(images_by_class[name]):
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def test_eval_on_a_folder_with_some_of_the_classes(trained, tmp_path):
    """A folder holding two of the model's classes (the run's own validation images as PNG)
    is relabelled by class name: each class scores exactly as in the run's own evaluation."""
    workdir, _ = trained
    config = rundir.read_config(workdir)
    source = build_source(data_config(config), "validation")
    images, labels = source.get(np.arange(len(source)))
    picked = {name: [images[i] for i in np.flatnonzero(labels == CIFAR10.index(name))]
              for name in ("cat", "ship")}
    root = folder_of(tmp_path / "photos", picked, picked)

    def evaluate(**data):
        cfg = eval_config.get_config()
        cfg.eval.workdir = workdir
        cfg.data.update(data)
        eval_exp.validate(cfg, jax.device_count())
        out = tmp_path / f"eval_{len(data)}"
        return eval_exp.run(cfg, str(out)), json.loads((out / eval_exp.EVAL_JSON).read_text())

    _, own = evaluate()
    # Photos of any size are centre-cropped by data.crop_fraction; 1.0 keeps these whole, as
    # the CIFAR source's plain resize does.
    summary, report = evaluate(source="folder", path=str(root), crop_fraction=1.0)
    assert summary["examples"] == report["examples"] == 32
    assert [c["class"] for c in report["per_class"]] == ["cat", "ship"]
    assert [c["index"] for c in report["per_class"]] == [3, 8]
    own_by_class = {c["class"]: c for c in own["per_class"]}
    for c in report["per_class"]:
        assert c["top1"] == own_by_class[c["class"]]["top1"]
    assert np.asarray(report["confusion"])[[3, 8]].tolist() == np.asarray(own["confusion"])[[3, 8]].tolist()

    bad = folder_of(tmp_path / "unicorns", ["cat", "unicorn"],
                    {"cat": picked["cat"][:2], "unicorn": picked["ship"][:2]})
    cfg = eval_config.get_config()
    cfg.eval.workdir = workdir
    cfg.data.update(source="folder", path=str(bad))
    with pytest.raises(ValueError, match=r"classes \['unicorn'\] are not among the model's 10 classes"):
        eval_exp.validate(cfg, jax.device_count())


def test_eval_bad_inputs(trained, tmp_path):
    workdir, _ = trained
    cfg = eval_config.get_config()
    with pytest.raises(ValueError, match="eval.workdir / eval.weights: set exactly one"):
        eval_exp.validate(cfg)
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / rundir.CONFIG).write_text((pathlib.Path(workdir) / rundir.CONFIG).read_text())
    cfg.eval.workdir = str(no_checkpoint)
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint in checkpoints/; train into it"):
        eval_exp.validate(cfg)
    cfg.eval.workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        eval_exp.validate(cfg)
    with pytest.raises(ValueError, match="no presets"):
        eval_config.get_config("nosuch")
    out = tmp_path / "out"
    proc = run_launch(["--config", "configs/eval.py", f"--config.eval.workdir={no_checkpoint}",
                       "--workdir", str(out)])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "has no checkpoint" in proc.stderr and not out.exists()


def test_plotted_classes_keep_the_most_errors(tmp_path):
    rng = np.random.default_rng(0)
    confusion = np.diag(rng.integers(5, 10, 60))
    confusion[7, 3] = confusion[50, 51] = 4           # the classes with errors: 3, 7, 50, 51
    assert eval_exp.plotted_classes(confusion, limit=60).tolist() == list(range(60))
    assert eval_exp.plotted_classes(confusion, limit=4).tolist() == [3, 7, 50, 51]
    path = eval_exp.plot_confusion(confusion, [f"class {i}" for i in range(60)],
                                   str(tmp_path / "c.png"), title="sixty classes")
    assert Image.open(path).size[0] > 1000


# ---------------------------------------------------------------------------- predict

def test_predict_gives_the_evaluation_probabilities(trained, tmp_path, capsys):
    """Validation images saved as PNG get the probabilities of the eval pipeline; the command
    prints the top-5 classes of a JPEG."""
    workdir, _ = trained
    config, run, variables = load_run(workdir)
    data = data_config(config)
    batches = build_dataset(data, data.eval_split, train=False, seed=0).eval_batches(8)
    batch = next(batches)
    batches.close()
    want = np.asarray(jax.nn.softmax(run.model.apply(variables, batch["image"][:3], train=False)))
    images, _ = build_source(data, data.eval_split).get(np.arange(3))
    paths = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    predictor = predict.Predictor(workdir)
    got = predictor.probabilities([predict.read_image(p) for p in paths])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    Image.fromarray(images[0]).resize((96, 64)).save(tmp_path / "photo.jpg", quality=90)
    predict.main(["--workdir", workdir, str(tmp_path / "photo.jpg")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "photo.jpg") and len(lines) == 6
    names = [line.split()[0] for line in lines[1:]]
    probs = [float(line.split()[1]) for line in lines[1:]]
    assert set(names) <= set(CIFAR10) and len(set(names)) == 5
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_predict_bad_inputs_are_one_line(trained, tmp_path, capsys):
    workdir, _ = trained
    err = one_line_error(capsys, predict.main, ["--workdir", workdir, str(tmp_path / "none.jpg")])
    assert "none.jpg: no such file" in err
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    err = one_line_error(capsys, predict.main, ["--workdir", workdir, str(tmp_path / "noise.jpg")])
    assert "noise.jpg is not an image that PIL can read" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    err = one_line_error(capsys, predict.main, ["--workdir", str(tmp_path), str(tmp_path / "ok.png")])
    assert f"{tmp_path} has no config.json" in err
    # One bad file among good ones: the good one is still classified, the bad one is an
    # error line, and the exit status says something failed.
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--workdir", workdir, str(tmp_path / "noise.jpg"), str(tmp_path / "ok.png")])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert err.splitlines() == [l for l in err.splitlines() if l.startswith("error: ")] and "noise.jpg" in err
    assert out.splitlines()[0] == str(tmp_path / "ok.png") and len(out.splitlines()) == 6


# ---------------------------------------------------------------------------- export

def test_export_round_trip_and_the_file_evaluates_as_the_run(trained, tmp_path, capsys):
    """The exported file re-imports bit for bit, records the model and class names, and
    evaluated through eval.weights gives the run's val_top1."""
    workdir, result = trained
    out = tmp_path / "wrn.safetensors"
    export.main(["--workdir", workdir, "--out", str(out)])
    assert "torchvision layout" in capsys.readouterr().out
    _, run, variables = load_run(workdir)
    assert tree_equal(weights.load(run.model, str(out), image_size=16), variables)
    meta = weights.read_metadata(out)
    assert json.loads(meta["class_names"]) == list(CIFAR10) and meta["layout"] == "torchvision"
    assert "block1.layer.0.conv1.weight" in weights.read_state_dict(out)   # the reference WRN's names

    cfg = eval_config.get_config()
    cfg.eval.update(weights=str(out), batch_size=64)
    cfg.data.update(image_size=16, examples_per_class=16)
    eval_exp.validate(cfg, jax.device_count())
    assert eval_exp.run(cfg, str(tmp_path / "eval"))["top1"] == result["val_top1"]

    err = one_line_error(capsys, export.main, ["--workdir", workdir, "--out", str(out),
                                               "--layout", "timm"])
    assert "wide_resnet exports in torchvision layout only" in err
    err = one_line_error(capsys, export.main, ["--workdir", str(tmp_path), "--out", str(out)])
    assert "has no config.json" in err
    unsupported = tmp_path / "inception_v2_run"       # a model without a weight family
    (unsupported / rundir.CHECKPOINTS / "7").mkdir(parents=True)
    recorded = json.loads((pathlib.Path(workdir) / rundir.CONFIG).read_text())
    (unsupported / rundir.CONFIG).write_text(json.dumps({**recorded, "model": {"name": "inception_v2"}}))
    err = one_line_error(capsys, export.main, ["--workdir", str(unsupported), "--out", str(out)])
    assert "inception_v2 has no torchvision / timm layout" in err
    efficientnet = create_model("efficientnet_b0")
    assert export.layouts(efficientnet) == ("torchvision",)
    with pytest.raises(ValueError, match="efficientnet_b0 exports in torchvision layout only"):
        export.resolve_layout(efficientnet, "timm")


def random_batch_stats(variables, seed=0):
    """Non-trivial BatchNorm statistics, so their mapping is exercised."""
    rng = np.random.default_rng(seed)
    flat = flatten_dict(variables["batch_stats"])
    return unflatten_dict({k: (rng.uniform(0.5, 1.5, v.shape) if k[-1] == "var" else
                               rng.normal(0, 0.2, v.shape)).astype(np.float32)
                           for k, v in flat.items()})


def test_export_loads_into_torchvision_with_the_same_logits():
    """A ResNet with one block per stage exported in torchvision layout loads into
    torchvision's ResNet(BasicBlock, [1, 1, 1, 1]) with strict=True and gives our logits."""
    model = create_model("resnet18", stage_sizes=(1, 1, 1, 1), num_classes=10)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    variables["batch_stats"] = random_batch_stats(variables)
    sd = export.state_dict(model, variables, "torchvision")
    assert tree_equal(weights.from_state_dict(model, sd, source="torchvision", image_size=32), variables)
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock, ResNet

    reference = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model.apply(variables, x, train=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_vit_exports_in_timm_and_torchvision_names():
    model = VisionTransformer(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=24,
                              num_classes=3, image_size=16)
    shapes = flatten_dict(weights.variable_shapes(model, 16))
    rng = np.random.default_rng(0)
    variables = unflatten_dict({k: (0.3 * rng.standard_normal(s.shape)).astype(np.float32)
                                for k, s in shapes.items()})
    assert export.layouts(model) == ("timm", "torchvision")
    assert "blocks.0.attn.qkv.weight" in export.state_dict(model, variables)
    sd = export.state_dict(model, variables, "torchvision")
    for key in ("conv_proj.weight", "class_token", "encoder.pos_embedding", "encoder.ln.weight",
                "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                "encoder.layers.encoder_layer_0.mlp.0.weight", "heads.head.weight"):
        assert key in sd, key
    assert tree_equal(weights.from_state_dict(model, sd, source="torchvision"), variables)
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer as TorchViT

    reference = TorchViT(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                         mlp_dim=24, num_classes=3).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)), want,
                               rtol=1e-4, atol=1e-5)

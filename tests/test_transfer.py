"""Fine-tuning modes (what trains, BatchNorm, optimizer state, per-group learning rates),
ViT head-only at a higher resolution, init config validation, and the transfer experiment
end to end at tiny size."""
import importlib.util
import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from configs import train as train_config
from configs import transfer as transfer_config
from experiments import report, sweep, transfer
from scaling import cli, parallel, weights
from scaling.models import create_model
from scaling.models.vit import VisionTransformer, resize_pos_embed
from scaling.train import finetune, load_run, validate_config
from scaling.train.state import create_state, init_variables
from scaling.train.step import cross_entropy, make_train_step
from tests.helpers import FAST_COMPILE

SIZE = 16


def count(tree):
    """Float elements (optimizer step counters are ints)."""
    return sum(np.size(x) for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f")


def tiny_wrn():
    return create_model("wide_resnet", depth=10, widen_factor=1, convs_per_block=1, num_classes=4)


def init_config(mode, **init):
    c = transfer_config.get_config("test")
    c.init.update(mode=mode, **init)
    c.train.update(lr=0.05)
    return c


def batch(n=16, size=SIZE, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def pretrained_like(model, size=SIZE):
    """Initial variables with BatchNorm statistics far from 0 / 1, as trained ones are."""
    v = init_variables(model, jax.random.key(7), (size, size, 3))
    rng = np.random.default_rng(1)
    v["batch_stats"] = unflatten_dict({
        k: (rng.uniform(0.5, 1.5, x.shape) if k[-1] == "var" else rng.normal(0, 0.3, x.shape)).astype(np.float32)
        for k, x in flatten_dict(v["batch_stats"]).items()})
    return v


def run_steps(config, model, variables, data, steps=2, size=SIZE):
    """Plan, optimizer, state and `steps` train steps (one device: the plan is what is tested)."""
    plan = finetune.make_plan(config, model, variables["params"])
    tx, _ = finetune.build_optimizer(config.train, plan, steps_per_epoch=4, total_steps=8)
    mesh = parallel.make_mesh(1)
    state = parallel.replicate(create_state(model, tx, jax.random.PRNGKey(0), (size, size, 3), variables), mesh)
    step = make_train_step(model, tx, mesh, donate=False, compiler_options=FAST_COMPILE, plan=plan)
    old, losses = parallel.fetch(state), []
    for _ in range(steps):
        state, metrics = step(state, parallel.to_global(data, parallel.batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return plan, old, parallel.fetch(state), losses


def same(a, b):
    return jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.parametrize("mode", ["linear_probe", "finetune", "finetune_bn"])
def test_modes(mode):
    model, data = tiny_wrn(), batch()
    variables = pretrained_like(model)
    plan, old, new, losses = run_steps(init_config(mode), model, variables, data)
    # The loss of the first step with BatchNorm on running (False) or batch (True) statistics.
    loss = jax.jit(lambda v, x, y: {t: cross_entropy(model.apply(v, x, train=t, mutable=["batch_stats"])[0],
                                                     y).mean() for t in (False, True)},
                   compiler_options=FAST_COMPILE)(variables, data["image"], data["label"])
    loss = {t: float(x) for t, x in loss.items()}
    head = {"fc"}
    backbone_old = {k: v for k, v in old.params.items() if k not in head}
    backbone_new = {k: v for k, v in new.params.items() if k not in head}
    assert not same(old.params["fc"], new.params["fc"])
    if mode == "linear_probe":
        # Backbone and statistics bit for bit; optimizer state (SGD momentum) for the head only.
        assert same(backbone_old, backbone_new) and same(old.batch_stats, new.batch_stats)
        assert count(new.opt_state) == count(new.params["fc"]) < count(new.params) / 10
        assert losses[0] == pytest.approx(loss[False], abs=1e-5)      # inference-mode network
    else:
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), backbone_old, backbone_new))
        assert all(moved) and count(new.opt_state) == count(new.params)
    if mode == "finetune":
        assert same(old.batch_stats, new.batch_stats)                    # statistics frozen ...
        assert losses[0] == pytest.approx(loss[False], abs=1e-5)      # ... and used
        assert abs(loss[True] - loss[False]) > 1e-3
    if mode == "finetune_bn":
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), old.batch_stats, new.batch_stats)
        assert all(jax.tree.leaves(changed))
        assert losses[0] == pytest.approx(loss[True], abs=1e-5)       # batch statistics


def test_per_group_learning_rates():
    """Plain SGD, one step from the same state: the backbone's update scales with its
    multiplier, the head's does not."""
    model, data = tiny_wrn(), batch()
    variables = pretrained_like(model)
    deltas = {}
    for mult in (1.0, 0.1):
        c = init_config("finetune_bn", head_lr_mult=1.0, backbone_lr_mult=mult)
        c.train.update(momentum=0.0, weight_decay=0.0, schedule="constant", warmup_epochs=0.0)
        _, old, new, _ = run_steps(c, model, variables, data, steps=1)
        deltas[mult] = jax.tree.map(lambda a, b: b.astype(np.float64) - a, old.params, new.params)
    np.testing.assert_array_equal(deltas[0.1]["fc"]["kernel"], deltas[1.0]["fc"]["kernel"])
    for path, p in flatten_dict(old.params).items():
        if path[0] != "fc":  # lr x grad and p + update are rounded to float32
            a, b = flatten_dict(deltas[1.0])[path], flatten_dict(deltas[0.1])[path]
            assert np.all(np.abs(b - 0.1 * a) <= np.spacing(np.maximum(np.abs(p), np.abs(a)).astype(np.float32))), path
            assert np.abs(a).max() > 100 * np.spacing(np.abs(p)).max(), path  # a real update


def test_vit_head_only_at_a_higher_resolution(tmp_path):
    """A ViT trained at 16 px is probed at 32 px: position embeddings interpolated on load,
    new 5-class head, only the head moves."""
    small = VisionTransformer(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=24,
                              num_classes=3, image_size=16)
    source = init_variables(small, jax.random.key(0), (16, 16, 3))
    path = weights.save(str(tmp_path / "vit.safetensors"), small, source)
    model = small.clone(image_size=32, num_classes=5)
    c = init_config("linear_probe", path=path, source="timm")
    variables = finetune.initial_variables(c, model, jax.random.PRNGKey(0), 32)
    want = np.asarray(resize_pos_embed(source["params"], 32, 8)["pos_embed"])
    np.testing.assert_allclose(variables["params"]["pos_embed"], want, rtol=1e-6)
    assert variables["params"]["head"]["kernel"].shape == (16, 5)
    plan, old, new, _ = run_steps(c, model, variables, batch(size=32, classes=5), size=32)
    assert plan.heads == (("head",),)
    assert same({k: v for k, v in old.params.items() if k != "head"},
                {k: v for k, v in new.params.items() if k != "head"})
    assert not same(old.params["head"], new.params["head"])


def base_train_config(**init):
    c = train_config.get_config("test")
    with c.unlocked():
        c.init = finetune.default_init_config()
    c.init.update(**init)
    return c


@pytest.mark.parametrize("init, message", [
    ({"mode": "probe"}, r"^init\.mode: unknown 'probe'; use one of scratch, linear_probe, finetune, finetune_bn"),
    ({"source": "keras"}, r"^init\.source: unknown 'keras'; use one of torchvision, timm, auto"),
    ({"mode": "finetune"}, r"^init\.path: init\.mode='finetune' starts from pretrained weights"),
    ({"mode": "finetune", "path": "/no/such.safetensors"}, r"^init\.path='/no/such\.safetensors' does not exist"),
    ({"mode": "finetune", "path": "w.npz"}, r"^init\.path='w\.npz': unsupported file type"),
    ({"path": "w.safetensors"}, r"^init\.path='w\.safetensors' is set but init\.mode='scratch'"),
    ({"backbone_lr_mult": 0.0}, r"^init\.backbone_lr_mult=0\.0: must be > 0"),
])
def test_init_config_errors_name_the_field(init, message):
    with pytest.raises(ValueError, match=message):
        validate_config(base_train_config(**init), 8)


def test_pth_without_torch_is_a_config_error(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    (tmp_path / "w.pth").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"^init\.path='.*w\.pth' is a PyTorch pickle .*pip install torch"):
        validate_config(base_train_config(mode="finetune", path=str(tmp_path / "w.pth")), 8)


def test_transfer_validation():
    c = transfer_config.get_config("test")
    transfer.validate(c, 8)
    c.transfer.modes = ("scratch", "probe")
    with pytest.raises(ValueError, match=r"^transfer\.modes="):
        transfer.validate(c, 8)
    c = transfer_config.get_config("tfds")
    with pytest.raises(ValueError, match=r"^init\.path: set the pretrained weights"):
        transfer.validate(c, 8)


def test_transfer_experiment_end_to_end(tmp_path):
    """Pretrain on 2 classes, export, then scratch and linear_probe on 2 others (finetune's
    step is tested above; each trial costs two compiles)."""
    c = transfer_config.get_config("test")
    c.transfer.modes = ("scratch", "linear_probe")
    launch = ["launch.py", "--config", "configs/transfer.py:test",
              "--config.transfer.modes=('scratch', 'linear_probe')", "--workdir", str(tmp_path)]
    out = cli.main(launch)
    assert set(out["val_top1"]) == {"modescratch", "modelinear_probe"}
    text = (tmp_path / "transfer.txt").read_text()
    assert "linear_probe" in text and "source: (0, 1), val top-1" in text
    assert (tmp_path / "curves_eval_top1.png").stat().st_size > 1000
    exported = transfer.export_path(str(tmp_path))
    assert json.loads(weights.read_metadata(exported)["classes"]) == [0, 1]
    # The probe's backbone is the exported one, bit for bit; its head is new.
    cfg = transfer.sweep_config(c, exported)
    trial = sweep.trials_of(cfg, sweep.build_points(cfg))[1]
    assert trial.id == "modelinear_probe" and trial.config.init.mode == "linear_probe"
    assert "Best: **mode" in (tmp_path / "study.md").read_text()
    _, run, trained = load_run(str(tmp_path / "trials" / trial.id))
    model = run.model
    pretrained = weights.load(model, exported, new_head=True, image_size=SIZE)
    for col in ("params", "batch_stats"):
        a, b = flatten_dict(trained[col]), flatten_dict(pretrained[col])
        assert all(np.array_equal(a[k], b[k]) for k in a if k[0] != "fc") and len(a) == len(b)
    assert not np.array_equal(trained["params"]["fc"]["kernel"], pretrained["params"]["fc"]["kernel"])
    # A relaunch (after a preemption, say) resumes the same study: the recorded config is
    # the launch's, and nothing finished runs again.
    results, study = (tmp_path / "results.csv").read_text(), (tmp_path / "study.md").read_text()
    again = cli.main(launch)
    assert again["val_top1"] == out["val_top1"] and (tmp_path / "results.csv").read_text() == results
    # The study can be re-analysed from the workdir alone.
    (tmp_path / "study.md").unlink()
    report.main([str(tmp_path)])
    assert (tmp_path / "study.md").read_text() == study

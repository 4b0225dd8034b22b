"""FSDP over the ('data', 'fsdp') mesh: the same numbers as data parallelism, one process or
two, checkpoints that move between meshes, and the config's mesh / sharding checks."""
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import train as train_config
from scaling import parallel
from scaling.checkpoint import Checkpointer
from scaling.models import create_model
from scaling.train import fit, prepare, restore, validate_config
from scaling.train.state import create_state
from scaling.train.step import make_train_step
from tests.conftest import ROOT
from tests.helpers import run_launch, run_processes

# Tiny tensors here: split everything of at least 64 elements.
MIN_SIZE = 64


def fsdp_config(**train_overrides):
    c = train_config.get_config("test")
    c.mesh.fsdp = 8
    c.sharding.fsdp_min_size = MIN_SIZE
    c.train.update(**train_overrides)
    return c


def _split(tree):
    """Leaves that each device holds only part of, as '/'-joined paths."""
    return sorted(parallel.path_name(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                  if not x.sharding.is_fully_replicated)


# ----------------------------------------------------------------------------- numerics
def _train_10_steps(mesh, sharding_cfg, model, tx, batches):
    """10 train steps in float64 on `mesh`, the state placed by `sharding_cfg`; returns the
    losses, the final state on the host and the device state."""
    host = create_state(model, tx, jax.random.PRNGKey(0), batches[0]["image"].shape[1:])
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    host = host.replace(params=f64(host.params), batch_stats=f64(host.batch_stats))
    host = host.replace(opt_state=tx.init(host.params))
    shardings = parallel.state_shardings(host, mesh, sharding_cfg)
    state = parallel.place(host, shardings)
    # XLA's optimisations on: unoptimised float64 convolutions take seconds a step
    step = make_train_step(model, tx, mesh, compute_dtype=jnp.float64, donate=False,
                           state_sharding=shardings)
    losses = []
    for b in batches:
        state, m = step(state, parallel.to_global(b, parallel.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
    return losses, parallel.fetch(state), state


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fsdp8_equals_data8_in_float64(optimizer):
    """fsdp=8 vs data=8, 10 steps of a WRN with BatchNorm, in float64 (where the two reduction
    orders agree far below the tolerance, so a wrong sharding, a BN statistic over a partial
    batch or a momentum mixed up between parameters would show): losses and every final
    parameter, BN statistic and optimizer-state leaf agree within 1e-5."""
    assert jax.device_count() == 8
    with jax.enable_x64(True):
        model = create_model("wide_resnet", depth=10, widen_factor=1, convs_per_block=1,
                             num_classes=10, dtype=jnp.float64)
        tx = (optax.sgd(0.1, momentum=0.9, nesterov=True) if optimizer == "sgd" else
              optax.adamw(3e-3, weight_decay=5e-4))
        rng = np.random.default_rng(0)
        batches = [{"image": rng.standard_normal((16, 16, 16, 3)),
                    "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(10)]
        cfg = {"rules": (("fc/kernel", ("fsdp", None)),), "fsdp_min_size": MIN_SIZE}
        l_dp, s_dp, dev_dp = _train_10_steps(parallel.make_mesh(8), cfg, model, tx, batches)
        l_fs, s_fs, dev_fs = _train_10_steps(parallel.make_mesh(8, data=1, fsdp=8), cfg, model,
                                             tx, batches)

    # data=8: nothing is split; fsdp=8: every conv kernel and its optimizer state are, the
    # head by its rule on its first dimension; BN statistics, step and rng stay replicated.
    assert _split(dev_dp) == []
    split = _split(dev_fs)
    assert "params/conv1/kernel" in split and "params/block3_1/conv1/kernel" in split
    assert dev_fs.params["fc"]["kernel"].sharding.spec == P("fsdp", None)
    assert dev_fs.params["block2_0"]["conv1"]["kernel"].sharding.spec[-1] == "fsdp"
    assert sum(p.startswith("opt_state/") for p in split) >= sum(p.startswith("params/") for p in split)
    assert not any(p.startswith(("batch_stats/", "step", "rng")) for p in split)
    shard = dev_fs.params["block3_1"]["conv1"]["kernel"].addressable_shards[0].data
    assert shard.shape == (3, 3, 64, 8)  # each device holds 1/8 of the kernel

    assert jax.tree.leaves(s_fs.params)[0].dtype == np.float64
    assert np.max(np.abs(np.subtract(l_dp, l_fs))) < 1e-5, (l_dp, l_fs)
    assert l_dp[-1] != l_dp[0]  # it trained
    for a, b in zip(jax.tree.leaves(s_dp), jax.tree.leaves(s_fs)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_default_config_is_data_parallel():
    """The default mesh section puts every device on 'data' and nothing of the state is split."""
    c = train_config.get_config("test")
    assert (c.mesh.data, c.mesh.fsdp) == (-1, 1)
    run = prepare(c)
    assert dict(parallel.mesh_from_config(c).shape) == {"data": 8, "fsdp": 1}
    assert _split(run.state_spec) == []
    assert run.batch_spec["image"].sharding.spec == P(("data", "fsdp"))


def test_mesh_shapes_and_state_split():
    c = fsdp_config()
    c.mesh.update(data=2, fsdp=4)
    run = prepare(c)
    assert dict(run.batch_spec["image"].sharding.mesh.shape) == {"data": 2, "fsdp": 4}
    spec = run.state_spec
    assert spec.params["block3_1"]["conv1"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    assert spec.params["fc"]["bias"].sharding.spec == P()           # 10 elements: replicated
    # the momentum of a parameter is split as the parameter
    trace = jax.tree_util.tree_flatten_with_path(spec.opt_state)[0]
    for path, x in trace:
        name = parallel.path_name(path)
        if name.endswith("block3_1/conv1/kernel"):
            assert x.sharding.spec == P(None, None, None, "fsdp")
    # the train state per device: about 1/4 of it
    rep = prepare(train_config.get_config("test")).state_spec
    assert parallel.state_bytes_per_device(spec) < 0.35 * parallel.state_bytes_per_device(rep)


# ----------------------------------------------------------------------------- multi-host
def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def test_two_processes_fsdp_match_one_process(tmp_path):
    """fsdp=8 spanning two processes of 4 devices trains as fsdp=8 in one process of 8, in 2
    microbatches (on CPU driven from Python: every process runs the same calls)."""
    args = ["--config", "configs/train.py:test", "--config.mesh.fsdp=8", "--config.train.grad_accum_steps=2",
            f"--config.sharding.fsdp_min_size={MIN_SIZE}", "--config.train.num_steps=8",
            "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=4",
            "--config.train.lr=0.01"]
    one = run_launch([*args, "--workdir", str(tmp_path / "one")], devices=8)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "mesh data=1 x fsdp=8" in one.stderr
    outs = run_processes([str(ROOT / "launch.py"), *args, "--workdir", str(tmp_path / "two")],
                         num_processes=2, devices=4)
    assert "8 device(s) x 2 process(es)" in outs[0][1] and "mesh data=1 x fsdp=8" in outs[0][1]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())
    assert abs(r1["val_loss"] - r2["val_loss"]) < 1e-4 and abs(r1["val_top1"] - r2["val_top1"]) < 1e-3
    # the two-process checkpoint holds the same weights as the one-process one
    v1 = restore(fsdp_config(num_steps=8), str(tmp_path / "one"))
    v2 = restore(fsdp_config(num_steps=8), str(tmp_path / "two"))
    for x, y in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)


_FETCH_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from scaling import parallel
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    parallel.initialize_distributed(flags["coordinator_address"], int(flags["num_processes"]),
                                    int(flags["process_id"]))
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = parallel.make_mesh(fsdp=8, data=1)
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    a = parallel.place({"w": x, "b": x[0]}, {"w": NamedSharding(mesh, P("fsdp")),
                                            "b": NamedSharding(mesh, P())})
    assert not a["w"].is_fully_addressable
    got = parallel.fetch(a)
    assert np.array_equal(got["w"], x) and np.array_equal(got["b"], x[0]), got
    print("fetched", got["w"].shape)
""")


def test_fetch_gathers_an_array_split_over_two_processes():
    outs = run_processes(["-c", _FETCH_SCRIPT], num_processes=2, devices=4)
    assert all("fetched (8, 6)" in out for out, _ in outs), outs


# ----------------------------------------------------------------------------- checkpoints
def _eval_on(config, workdir, mesh):
    """The trainer's evaluation of the newest checkpoint of `workdir`, restored onto `mesh`
    with that mesh's state shardings (as `fit` resumes)."""
    from scaling import data as data_lib
    from scaling.train.loop import Evaluator
    from scaling.train.run import data_config
    from scaling.train.step import make_eval_step

    run = prepare(config, mesh)
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, step = ck.restore(run.state_spec)
    finally:
        ck.close()
    assert step is not None
    data = data_config(config)
    ds = data_lib.build_dataset(data, data.eval_split, train=False, seed=config.seed)
    evaluator = Evaluator(ds, make_eval_step(run.model, mesh, state_sharding=run.state_sharding),
                          config.train.eval_batch_size, mesh)
    return evaluator(state), state


def test_checkpoints_move_between_fsdp8_and_one_device(tmp_path):
    one = parallel.make_mesh(1)
    fsdp8 = parallel.make_mesh(data=1, fsdp=8)
    cfg8 = fsdp_config(num_steps=4)
    cfg1 = train_config.get_config("test")
    cfg1.train.num_steps = 4

    # saved at fsdp=8 -> read on one device: the same values, the same evaluation
    res8 = fit(cfg8, str(tmp_path / "fsdp8"))
    m1, s1 = _eval_on(cfg1, str(tmp_path / "fsdp8"), one)
    m8, s8 = _eval_on(cfg8, str(tmp_path / "fsdp8"), fsdp8)
    assert _split(s8.params) and not _split(s1.params)
    for a, b in zip(jax.tree.leaves(parallel.fetch(s1)), jax.tree.leaves(parallel.fetch(s8))):
        assert np.array_equal(a, b)
    for m in (m1, m8):
        assert m["examples"] == res8["val_examples"] and m["top1"] == res8["val_top1"]
        assert abs(m["loss"] - res8["val_loss"]) < 1e-6 and m["top5"] == res8["val_top5"]
    v_one = restore(cfg8, str(tmp_path / "fsdp8"), one)
    v_all = restore(cfg8, str(tmp_path / "fsdp8"))
    for a, b in zip(jax.tree.leaves(v_one), jax.tree.leaves(v_all)):
        assert np.array_equal(a, b)

    # saved on one device -> read at fsdp=8
    res1 = fit(cfg1, str(tmp_path / "one"), mesh=one)
    m8, s8 = _eval_on(cfg8, str(tmp_path / "one"), fsdp8)
    m1, s1 = _eval_on(cfg1, str(tmp_path / "one"), one)
    assert _split(s8.params)
    for a, b in zip(jax.tree.leaves(parallel.fetch(s1)), jax.tree.leaves(parallel.fetch(s8))):
        assert np.array_equal(a, b)
    for m in (m1, m8):
        assert m["examples"] == res1["val_examples"] and m["top1"] == res1["val_top1"]
        assert abs(m["loss"] - res1["val_loss"]) < 1e-6 and m["top5"] == res1["val_top5"]


def test_fit_resumes_an_fsdp_run_on_another_mesh(tmp_path):
    """Paused at step 3 at fsdp=8, resumed on one device (and then on data=8): the losses of an
    uninterrupted fsdp=8 run, to float32 rounding."""
    cfg = fsdp_config(num_steps=6, log_every_steps=1, checkpoint_every_steps=3, lr=0.01)
    straight = fit(cfg, str(tmp_path / "straight"))
    fit(cfg, str(tmp_path / "moved"), until_step=3)
    fit(cfg, str(tmp_path / "moved"), until_step=5, mesh=parallel.make_mesh(1))
    moved = fit(cfg, str(tmp_path / "moved"), mesh=parallel.make_mesh(8))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "moved")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    assert abs(straight["val_loss"] - moved["val_loss"]) < 1e-4


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("edit, match", [
    (lambda c: c.mesh.update(fsdp=3), r"mesh.data=-1 x mesh.fsdp=3: 3 does not divide the 8 devices"),
    (lambda c: c.mesh.update(data=2, fsdp=2), r"= 4 devices, but there are 8"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), r"at most one axis can be -1"),
    (lambda c: c.mesh.update(fsdp=0), r"mesh.fsdp=0: must be a positive integer or -1"),
    (lambda c: setattr(c.mesh, "model", 2), r"mesh.model: unknown mesh axis; the axes are data, fsdp"),
    (lambda c: c.sharding.update(rules=(("blocks_(", (None, "fsdp")),)), r"sharding.rules\[0\]: bad regex"),
    (lambda c: c.sharding.update(rules=(("fc", (None, "model")),)),
     r"sharding.rules\[0\]: spec .* names the unknown mesh axis 'model'; the mesh axes are data, fsdp"),
    (lambda c: c.sharding.update(rules=("fc",)), r"sharding.rules\[0\]='fc': not a \(regex, spec\) pair"),
    (lambda c: c.sharding.update(fsdp_min_size=-1), r"sharding.fsdp_min_size=-1"),
])
def test_bad_mesh_or_sharding_names_the_field(edit, match):
    c = train_config.get_config("test")
    edit(c)
    with pytest.raises(ValueError, match=match):
        validate_config(c, num_devices=8)


def test_rule_that_does_not_fit_a_tensor_names_the_rule():
    c = fsdp_config()
    c.sharding.rules = (("fc/kernel", (None, None, "fsdp")),)
    with pytest.raises(ValueError, match=r"sharding.rules\[0\] .* matches fc/kernel of shape "
                                         r"\(64, 10\): the spec has more entries"):
        prepare(c)
    c.sharding.rules = (("fc/kernel", (None, "fsdp")),)
    with pytest.raises(ValueError, match=r"dimension 1 \(10\) is not divisible by the 8 devices"):
        prepare(c)


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.fsdp=3", "mesh.data=-1 x mesh.fsdp=3: 3 does not divide the 8 devices"),
    ("--config.sharding.rules=(('(', (None, 'fsdp')),)", "sharding.rules[0]: bad regex '('"),
    ("--config.sharding.rules=(('fc', ('model',)),)", "names the unknown mesh axis 'model'"),
    ("--config.mesh.model=2", "section 'mesh' has no field 'model'"),
])
def test_launch_prints_one_line(capsys, tmp_path, override, message):
    from tests.test_bad_inputs import assert_clean_error

    assert_clean_error(capsys, tmp_path / "w", ["--config", "configs/train.py:test", override],
                       message)

"""GoogLeNet and Inception v3 train with their auxiliary classifiers: the project's train step
minimises the main loss plus the papers' weight times each auxiliary loss (checked against a
hand computation from the logits), the auxiliary heads learn, and eval sees the main head only."""
import jax
import numpy as np
import optax
import pytest

from scaling import parallel
from scaling.models import create_model
from scaling.train.state import TrainState
from scaling.train.step import classifier_losses, make_eval_step, make_train_step
from tests.test_models_inception import FAST, host_variables, shapes

CLASSES, BATCH = 5, 8


def hand_cross_entropy(logits, labels, smoothing=0.0):
    """Mean softmax cross-entropy in float64 numpy, targets smoothed as torch / TF do."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    target = np.eye(logits.shape[-1])[labels] * (1 - smoothing) + smoothing / logits.shape[-1]
    return float(-(target * logp).sum(-1).mean())


def test_classifier_losses_by_hand():
    rng = np.random.default_rng(0)
    main, aux1, aux2 = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3))
    labels = np.array([0, 2, 1, 2])
    logits, losses = classifier_losses((main, aux1, aux2), labels, 0.3, label_smoothing=0.1)
    np.testing.assert_array_equal(logits, main)
    expect = [hand_cross_entropy(x, labels, 0.1) for x in (main, aux1, aux2)]
    assert float(losses["loss"]) == pytest.approx(expect[0], rel=1e-6)
    assert float(losses["total_loss"]) == pytest.approx(expect[0] + 0.3 * (expect[1] + expect[2]), rel=1e-6)
    # A plain classifier: one loss, no total.
    _, plain = classifier_losses(main, labels)
    assert set(plain) == {"loss"} and float(plain["loss"]) == pytest.approx(hand_cross_entropy(main, labels), rel=1e-6)
    with pytest.raises(TypeError, match="aux_weight"):
        classifier_losses((main, aux1), labels)


def test_aux_weight_defaults_and_validation():
    assert create_model("googlenet").aux_weight == 0.3      # Szegedy et al. 2014
    assert create_model("inception_v3").aux_weight == 0.4   # TF-slim's Inception trainer
    with pytest.raises(ValueError, match=r"model\.aux_weight"):
        create_model("googlenet", aux_weight=-0.1)


def state_of(variables, tx, seed=0):
    params = variables["params"]
    opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))
    return TrainState(step=np.zeros((), np.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=opt_state, rng=np.array([0, seed], np.uint32))


# Inception v3's aux head needs the 17x17 grid of a 299 input: its train step costs ~100 s of
# CPU here, so this file trains GoogLeNet's two heads; Inception v3 shares the step's code
# (classifier_losses above) and its model's train-mode outputs are checked by shape below.
@pytest.mark.parametrize("name, resolution, heads", [("googlenet", 32, ("aux1", "aux2"))])
def test_train_steps_with_aux_heads(name, resolution, heads):
    kw = dict(aux_logits=True, width_multiplier=0.125, num_classes=CLASSES)
    model = create_model(name, **kw)
    variables = host_variables(shapes(name, resolution, **kw))
    assert set(heads) <= set(variables["params"])
    tx = optax.sgd(0.05, momentum=0.9)
    state = state_of(variables, tx)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((BATCH, resolution, resolution, 3)).astype(np.float32),
             "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}

    # The first step's forward pass by hand: train mode, the step's dropout key.
    key = jax.random.fold_in(state.rng, 0)
    outputs, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": key},
                                                  mutable=["batch_stats"]),
                         compiler_options=FAST)(variables, batch["image"])
    assert len(outputs) == 1 + (len(heads) if name == "googlenet" else 1)
    main, *aux = (hand_cross_entropy(o, batch["label"]) for o in outputs)
    total = main + model.aux_weight * sum(aux)

    mesh = parallel.make_mesh(8)
    step = make_train_step(model, tx, mesh, donate=False, compiler_options=FAST)
    sharded_batch = parallel.to_global(batch, parallel.batch_sharding(mesh))
    s = parallel.replicate(state, mesh)
    history = []
    for _ in range(3):
        s, metrics = step(s, sharded_batch)
        history.append({k: float(v) for k, v in metrics.items()})
    first = history[0]
    assert first["loss"] == pytest.approx(main, rel=1e-4)           # main head only
    assert first["total_loss"] == pytest.approx(total, rel=1e-4)    # main + weight * aux losses
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert history[-1]["total_loss"] < first["total_loss"]          # the same batch: it learns

    # The aux heads' classifiers feed nothing but their own losses: they moved, so the
    # objective includes them.
    new = parallel.fetch(s)
    for head in heads:
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params[head], new.params[head])
        assert all(jax.tree.leaves(moved)), head

    # Eval: the main head alone, from the same variables.
    trained = {"params": new.params, "batch_stats": new.batch_stats}
    x = jax.ShapeDtypeStruct(batch["image"].shape, np.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), trained, x)
    assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (BATCH, CLASSES)
    if name == "googlenet":  # numerically too (one more compile; cheap at 32x32)
        logits = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=FAST)(
            trained, batch["image"])
        evaluate = make_eval_step(model, mesh, compiler_options=FAST)
        sums = evaluate(s, parallel.to_global({**batch, "mask": np.ones(BATCH, np.float32)},
                                              parallel.batch_sharding(mesh)))
        assert float(sums["loss"]) / BATCH == pytest.approx(
            hand_cross_entropy(logits, batch["label"]), rel=1e-4)


def test_inception_v3_returns_its_aux_logits_in_train_mode_only():
    model = create_model("inception_v3", aux_logits=True, width_multiplier=0.125, num_classes=CLASSES)
    variables = shapes("inception_v3", 299, aux_logits=True, width_multiplier=0.125, num_classes=CLASSES)
    x = jax.ShapeDtypeStruct((2, 299, 299, 3), np.float32)
    train_out, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                                           mutable=["batch_stats"]), variables, x)
    assert [o.shape for o in train_out] == [(2, CLASSES), (2, CLASSES)]
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (2, CLASSES)

"""Evaluate a trained run, or imported torchvision / timm weights, on any data
(configs/eval.py): WORKDIR/eval.json and WORKDIR/confusion.png.

The model is `eval.workdir`, a training run directory (the config `fit` recorded there and
its newest checkpoint, `scaling.train.load_run`), or `eval.weights`, a state dict file of the
registered model `eval.model` (`scaling.weights.load`). The data is the run's data section
with every field the eval config sets (its `data.*` fields are None until set), so by default
the run's own eval split with the run's preprocessing; for `eval.weights`, the data defaults
at the model's resolution, mean, std and crop (its registry record). The evaluation is the
trainer's own (`Evaluator`, with the eval step's per-class sums), with the run's eval batch
size and compute dtype: on the run's eval split it reproduces the run's `val_top1` exactly.

Classes: the model's class names are those of the run's training data (for `eval.weights`,
the file's `class_names` metadata, which `scaling.weights.export` writes). Eval data whose
classes differ is relabelled by name, so a folder holding some of the model's classes is
scored against the right outputs; a class the model does not know is an error. Without
class names in the file, the data's labels are taken as the model's class indices.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from scaling import parallel, rundir

log = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
CONFUSION_PNG = "confusion.png"
MAX_PLOTTED = 40      # classes in the confusion plot: beyond that, the ones with most errors
MAX_ANNOTATED = 15    # classes up to which each cell of the plot shows its count


# --------------------------------------------------------------------------- what is evaluated
def target_config(config: Any) -> ml_collections.ConfigDict:
    """The training-style config (model, data, train, seed) that the evaluated model runs
    with: the run's recorded config, or one for `eval.weights`, with the eval config's data
    fields applied. Cheap: opens no data and loads no weights."""
    from scaling.data import default_data_config
    from scaling.models import check_model_name, model_info
    from scaling.train import default_train_config, run_config

    ev = config.eval
    check_model_choice(ev)
    if ev.workdir:
        target = copy.deepcopy(run_config(ev.workdir))
    else:
        model = weights_model_section(ev.weights, ev.model)
        check_model_name(model["name"], "eval.model")
        info = model_info(model["name"])
        data = default_data_config()
        data.image_size = info.resolution
        recorded = json.loads(weights_metadata(ev.weights).get("class_names", "[]"))
        model["num_classes"] = (int(ev.num_classes) or model.get("num_classes") or len(recorded)
                                or info.num_classes)
        target = ml_collections.ConfigDict(dict(
            seed=0, model=model, data=data.to_dict(), train=default_train_config().to_dict()))
    if ev.batch_size:
        target.train.eval_batch_size = int(ev.batch_size)
    for field, value in config.data.items():
        if value is not None:
            target.data[field] = value
    return target


def check_model_choice(ev: Any) -> None:
    """Exactly one of eval.workdir / eval.weights, and a readable weight file."""
    from scaling.weights import SOURCES

    if bool(ev.workdir) == bool(ev.weights):
        raise ValueError("eval.workdir / eval.weights: set exactly one: a training run's workdir "
                         "(--config.eval.workdir=runs/train) or a weight file with its model "
                         "(--config.eval.weights=resnet50.safetensors "
                         "--config.eval.model=resnet50).")
    if ev.weights:
        if ev.source not in SOURCES:
            raise ValueError(f"eval.source: unknown {ev.source!r}; use one of "
                             f"{', '.join(SOURCES)}.")
        if not os.path.isfile(ev.weights):
            raise FileNotFoundError(f"eval.weights={ev.weights!r} does not exist or is not a file.")


def weights_metadata(path: str) -> dict[str, str]:
    """The metadata of a .safetensors weight file ({} for other files or a missing one)."""
    from scaling.weights import read_metadata
    from scaling.weights.io import SAFETENSORS_EXTENSIONS

    if not (os.path.isfile(path) and path.lower().endswith(SAFETENSORS_EXTENSIONS)):
        return {}
    return read_metadata(path)


def weights_model_section(path: str, name: str) -> dict:
    """The model section for weight file `path`: the model fields its metadata records (a file
    of `scaling.weights.export`) when `name` is unset or the same model, else just `name`."""
    fields = json.loads(weights_metadata(path).get("fields", "{}"))
    if fields.get("name") and name in ("", fields["name"]):
        return fields
    if not name:
        raise ValueError(f"eval.model: set the registered model of eval.weights={path!r} "
                         "(e.g. --config.eval.model=resnet50; python -m scaling.summary --all "
                         "lists them).")
    return {"name": name}


def model_class_names(config: Any) -> tuple[str, ...] | None:
    """The class names of the model's outputs: the classes of the run's training data (as
    the run recorded it, whatever the eval data), or the weight file's `class_names`
    metadata (None when it has none)."""
    from scaling.data import build_source
    from scaling.train import run_config

    if config.eval.workdir:
        data = run_config(config.eval.workdir).data
        return tuple(build_source(data, data.train_split).class_names)
    names = weights_metadata(config.eval.weights).get("class_names")
    return tuple(json.loads(names)) if names else None


def class_mapping(data_names: Sequence[str], model_names: Sequence[str] | None,
                  num_classes: int) -> np.ndarray | None:
    """Data label -> model class index, matched by name; None when the labels are the model's
    indices already (the same class list, or no model names to match)."""
    data_names = tuple(data_names)
    if model_names is None:
        if len(data_names) > num_classes:
            raise ValueError(f"data: the eval data has {len(data_names)} classes but the model's "
                             f"head has {num_classes}; set eval.num_classes or other data.")
        return None
    model_names = tuple(model_names)
    if data_names == model_names:
        return None
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        shown = ", ".join(model_names[:20]) + (", ..." if len(model_names) > 20 else "")
        raise ValueError(f"data: the eval data's classes {unknown[:10]} are not among the model's "
                         f"{len(model_names)} classes ({shown}); name the data's classes (e.g. "
                         "its class folders) after the model's.")
    return np.asarray([model_names.index(n) for n in data_names], np.int32)


class Relabelled:
    """A source whose labels are mapped to the model's class indices (`class_mapping`)."""

    def __init__(self, source: Any, mapping: np.ndarray, class_names: Sequence[str]):
        self.source, self.mapping = source, mapping
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.image_size = source.image_size

    def __len__(self) -> int:
        return len(self.source)

    def get(self, indices):
        images, labels = self.source.get(indices)
        return images, self.mapping[np.asarray(labels)]

    def labels(self) -> np.ndarray:
        return self.mapping[self.source.labels()]


def eval_dataset(target: Any, model_names: Sequence[str] | None, num_classes: int):
    """The eval split of the target's data, preprocessed exactly as training evaluates it
    (`data_config`: the model's mean / std / crop where unset), labels in the model's classes."""
    from scaling.data import Dataset, Transform, build_source
    from scaling.train import data_config

    data = data_config(target)
    source = build_source(data, data.eval_split)
    mapping = class_mapping(source.class_names, model_names, num_classes)
    if mapping is not None:
        source = Relabelled(source, mapping, model_names)
    return Dataset(source, Transform.from_config(data, native=source.image_size),
                   split=data.eval_split, train=False, seed=int(target.seed), workers=data.workers)


# --------------------------------------------------------------------------- experiment API
def validate(config: Any, num_devices: int | None = None) -> None:
    """Checks the eval config, the run directory or weight file, and the eval data (its
    classes against the model's) before anything is loaded or written."""
    from scaling.data import validate_data_config
    from scaling.models import model_info
    from scaling.train import data_config

    ev = config.eval
    if int(ev.batch_size) < 0 or int(ev.num_classes) < 0:
        raise ValueError("eval.batch_size / eval.num_classes: must be >= 0 (0: the run's / "
                         "the model's).")
    check_model_choice(ev)
    target = target_config(config)
    modality = model_info(target.model.name).modality
    if modality != "image":
        raise ValueError(f"eval: {target.model.name} is an {modality} model; the eval experiment "
                         "scores image classifiers.")
    validate_data_config(data_config(target))
    if num_devices and target.train.eval_batch_size % num_devices:
        raise ValueError(f"eval.batch_size={target.train.eval_batch_size} is not divisible by the "
                         f"{num_devices} devices; set --config.eval.batch_size to a multiple of "
                         f"{num_devices}.")
    names = model_class_names(config)
    eval_dataset(target, names, target.model.get("num_classes") or len(names or ()))  # its classes


def load_model(config: Any, target: Any, mesh) -> tuple[Any, dict]:
    """(model, variables) to evaluate: the run's newest checkpoint or the weight file."""
    from scaling import weights
    from scaling.train import build_model, load_run

    if config.eval.workdir:
        _, run, variables = load_run(config.eval.workdir, mesh)
        return run.model, variables
    model = build_model(target.model, target.model.num_classes, target.train.compute_dtype,
                        image_size=target.data.image_size)
    variables = weights.load(model, config.eval.weights, source=config.eval.source,
                             image_size=target.data.image_size)
    return model, variables


def evaluate(model: Any, variables: dict, dataset: Any, batch_size: int, compute_dtype: str,
             mesh) -> dict:
    """The trainer's evaluation of `variables` over `dataset`, with per-class sums."""
    from scaling.train.loop import COMPUTE_DTYPES, Evaluator
    from scaling.train.state import TrainState
    from scaling.train.step import make_eval_step

    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    state = parallel.replicate(TrainState(
        step=np.zeros((), np.int32), params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), opt_state=(),
        rng=np.zeros((2,), np.uint32)), mesh)
    step = make_eval_step(model, mesh, compute_dtype=COMPUTE_DTYPES[compute_dtype], per_class=True)
    return Evaluator(dataset, step, batch_size, mesh)(state)


def run(config: Any, workdir: str) -> dict:
    target = target_config(config)
    mesh = parallel.make_mesh()
    model, variables = load_model(config, target, mesh)
    names = model_class_names(config)
    dataset = eval_dataset(target, names, model.num_classes)
    metrics = evaluate(model, variables, dataset, int(target.train.eval_batch_size),
                       target.train.compute_dtype, mesh)
    names = names or tuple(dataset.class_names) + tuple(
        f"class {i}" for i in range(dataset.num_classes, model.num_classes))
    report = eval_report(metrics, names, target, origin=_origin(config))
    paths = {"eval_json": os.path.join(workdir, EVAL_JSON),
             "confusion_png": os.path.join(workdir, CONFUSION_PNG)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        rundir.write_json_atomic(paths["eval_json"], report)
        title = (f"{target.model.name} ({_origin(config)}) on {report['data']['description']}\n"
                 f"top-1 {report['top1']:.4f}, top-5 {report['top5']:.4f}, "
                 f"{report['examples']} images")
        plot_confusion(report["confusion"], names, paths["confusion_png"], title)
    log.info("%s on %s: top-1 %.4f, top-5 %.4f, loss %.4f (%d images) -> %s",
             _origin(config), report["data"]["description"], report["top1"], report["top5"],
             report["loss"], report["examples"], paths["eval_json"])
    return {k: report[k] for k in ("top1", "top5", "loss", "examples")} | paths


def _origin(config: Any) -> str:
    return config.eval.workdir or config.eval.weights


def data_description(data: Any) -> str:
    """'embedded:cifar10 validation', 'folder:~/photos val', 'tfds:imagenet2012 validation'."""
    where = data.path if data.source == "folder" else data.name
    return f"{data.source}:{where} {data.eval_split}"


def eval_report(metrics: dict, class_names: Sequence[str], target: Any, origin: str) -> dict:
    """eval.json: the totals, per-class top-1 of every class with examples, the confusion
    matrix (rows: true class, columns: arg-max prediction; counts) and what was evaluated."""
    confusion = np.rint(metrics["confusion"]).astype(np.int64)
    counts = confusion.sum(axis=1)
    hits = np.rint(metrics["class_top1"]).astype(np.int64)
    per_class = [{"class": class_names[c], "index": c, "examples": int(counts[c]),
                  "top1": float(hits[c] / counts[c])} for c in np.flatnonzero(counts)]
    data = target.data
    return {
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
        "examples": metrics["examples"], "per_class": per_class,
        "class_names": list(class_names), "confusion": confusion,
        "model": target.model.name, "evaluated": origin,
        "data": {"source": data.source, "name": data.name, "path": data.path,
                 "split": data.eval_split, "image_size": data.image_size,
                 "description": data_description(data)},
    }


# --------------------------------------------------------------------------- plot
def plotted_classes(confusion: np.ndarray, limit: int = MAX_PLOTTED) -> np.ndarray:
    """Classes the plot shows: every class that occurs or is predicted, or when those are
    more than `limit`, the `limit` with the most errors (as the true or the predicted class)."""
    errors = confusion.sum(axis=0) + confusion.sum(axis=1) - 2 * np.diag(confusion)
    seen = np.flatnonzero(confusion.sum(axis=0) + confusion.sum(axis=1))
    if len(seen) <= limit:
        return seen
    return np.sort(seen[np.argsort(-errors[seen], kind="stable")[:limit]])


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str, title: str) -> str:
    """The confusion matrix as a PNG: rows true class, columns predicted class, colour the
    fraction of the true class's images, counts written in the cells for small matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = plotted_classes(confusion)
    counts = confusion.sum(axis=1, keepdims=True)
    fraction = np.divide(confusion, counts, out=np.zeros(confusion.shape), where=counts > 0)
    sub, frac = confusion[np.ix_(shown, shown)], fraction[np.ix_(shown, shown)]
    labels = [class_names[i] for i in shown]
    n = len(shown)
    side = min(max(6.0, 0.32 * n + 3.0), 18.0)
    fontsize = 9 if n <= 20 else 7
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor",
                  fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= MAX_ANNOTATED:
        for i in range(n):
            for j in range(n):
                if sub[i, j]:
                    ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=fontsize,
                            color="white" if frac[i, j] > 0.5 else "black")
    if n < len(np.flatnonzero(confusion.sum(axis=0) + confusion.sum(axis=1))):
        title += f"\n(the {n} classes with the most errors)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of the true class's images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Classify image files with a trained run: the top-5 class names and their probabilities.

    python -m scaling.predict --workdir runs/train cat.jpg dog.png [--top 5]

The model is the run's newest checkpoint, rebuilt from the config the run recorded
(`scaling.train.load_run`). Each image goes through the run's own eval preprocessing, built
from its data section exactly as evaluation builds it (`Transform.eval`: a plain resize for a
dataset of one fixed image size such as CIFAR, else the shorter side to image_size /
crop_fraction and a centre crop; then the run's mean and std), so an image of the run's eval
split gets the probabilities evaluation computes for it. Class names are those of the run's
training data. A missing or unreadable file is one line `error: ...` on stderr; the other
files are still classified, and the exit status is then 2. A workdir without a checkpoint (or
no readable file at all) is one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

TOP = 5


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file; FileNotFoundError / ValueError naming the file."""
    from PIL import UnidentifiedImageError

    from scaling.data import decode_image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"predict: {path}: no such file.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image(data)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        unknown = isinstance(e, UnidentifiedImageError)
        detail = "an unknown format" if unknown else f"{type(e).__name__}: {e}"
        raise ValueError(f"predict: {path} is not an image that PIL can read ({detail}).") from None


class Predictor:
    """A run directory's model with its eval preprocessing and class names."""

    def __init__(self, run_dir: str):
        import jax
        import jax.numpy as jnp

        from scaling.data import Transform, build_source
        from scaling.models import model_info
        from scaling.train import data_config, load_run, run_config
        from scaling.train.run import COMPUTE_DTYPES

        config = run_config(run_dir)
        if model_info(config.model.name).modality != "image":
            raise ValueError(f"predict: {run_dir} trained {config.model.name}, an "
                             f"{model_info(config.model.name).modality} model; predict "
                             "classifies images.")
        config, run, self.variables = load_run(run_dir)
        data = data_config(config)
        self.class_names = tuple(build_source(data, data.train_split).class_names)
        self.transform = Transform.from_config(
            data, native=build_source(data, data.eval_split).image_size)
        self.batch_size = int(config.train.eval_batch_size)
        dtype, model = COMPUTE_DTYPES[config.train.compute_dtype], run.model
        self._probs = jax.jit(lambda v, x: jax.nn.softmax(
            model.apply(v, x.astype(dtype), train=False).astype(jnp.float32), axis=-1))

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities [n, num_classes] of uint8 RGB images of any size."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = self.transform.eval(list(images[start:start + self.batch_size]))
            out.append(np.asarray(self._probs(self.variables, x)))
        return np.concatenate(out)

    def top(self, probs: np.ndarray, k: int = TOP) -> list[tuple[str, float]]:
        """The k most probable (class name, probability) of one image's probabilities."""
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.class_names[i], float(probs[i])) for i in order]


def format_predictions(path: str, top: list[tuple[str, float]]) -> str:
    width = max(len(name) for name, _ in top)
    return "\n".join([path] + [f"  {name:<{width}}  {p:.4f}" for name, p in top])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scaling.predict",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--top", type=int, default=TOP, help="classes shown per image (default 5)")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    args = parser.parse_args(argv)
    from scaling.cli import fail

    if args.top < 1:
        fail(f"--top={args.top}: must be >= 1.")
    images, unreadable = {}, []
    for path in args.images:
        try:
            images[path] = read_image(path)
        except (ValueError, OSError) as e:
            unreadable.append(e)
    if not images:
        fail(unreadable[0] if len(unreadable) == 1 else
             f"predict: none of the {len(unreadable)} files is a readable image: {unreadable[0]}")
    try:
        predictor = Predictor(args.workdir)
    except (ValueError, OSError) as e:
        fail(e)
    for e in unreadable:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    for path, probs in zip(images, predictor.probabilities(list(images.values()))):
        print(format_predictions(path, predictor.top(probs, args.top)))
    if unreadable:
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Model summary: params, BatchNorm statistics, MACs, size and train-step memory.

    python -m scaling.summary resnet50
    python -m scaling.summary efficientnet_b3 --num-classes 10 --resolution 300 --batch 32
    python -m scaling.summary --all [--json] [--no-memory]

Everything is computed from shapes (jax.eval_shape, jaxpr walking, XLA compile without
running), so full-size models take seconds. The input, head size and (in --json rows) the
modality, head path and weight family come from the model's registry record. Columns:
  params       trainable parameters (as torchvision/timm count them)
  bn_stats     BatchNorm running mean + variance elements (not trained)
  GMACs        multiply-accumulates per image (conv / linear / attention matmuls)
  size_MB      float32 size of params + statistics (10^6 bytes)
  train_MB     XLA's peak-memory estimate of one SGD-momentum train step at --batch
               (one device; includes activations kept for the backward pass)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import scaling  # noqa: F401  (CPU XLA defaults before jax loads)
import jax
import jax.numpy as jnp
import optax

from scaling import parallel, profile
from scaling.models import create_model, list_models, model_info
from scaling.train.state import abstract_state
from scaling.train.state import batch_spec as make_batch_spec
from scaling.train.step import make_train_step


def input_shape(name: str, resolution: int | None = None) -> tuple[int, ...]:
    """Per-example input shape at `resolution` (default: the model's): (R, R, C) for images,
    (R, C) for audio (R samples)."""
    return model_info(name).input_shape_at(resolution)


def _count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def summarize(name: str, *, num_classes: int | None = None, resolution: int | None = None,
              batch: int = 32, memory: bool = True) -> dict[str, Any]:
    info = model_info(name)
    num_classes = num_classes or info.num_classes
    model = create_model(name, num_classes=num_classes)
    shape = input_shape(name, resolution)
    x1 = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x1)
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    macs = profile.count_macs(lambda v, x: model.apply(v, x, train=False), variables, x1)
    n_params, n_stats = _count(params), _count(stats)
    row = {"name": name, "modality": info.modality, "num_classes": num_classes, "input_shape": list(shape),
           "params": n_params, "batch_stats": n_stats, "gmacs": macs / 1e9,
           "size_mb": (n_params + n_stats) * 4 / 1e6, "head": info.head, "weights": info.weights}
    if memory:
        t = time.perf_counter()
        mesh = parallel.make_mesh(1)
        tx = optax.sgd(0.1, momentum=0.9)
        state = abstract_state(variables, tx, parallel.replicated(mesh))
        batch_spec = make_batch_spec(batch, shape, parallel.batch_sharding(mesh))
        compiled = make_train_step(model, tx, mesh).lower(state, batch_spec).compile()
        mem = profile.compiled_memory(compiled)
        row.update(batch=batch, train_peak_mb=mem.get("peak_bytes", 0) / 1e6,
                   compile_s=round(time.perf_counter() - t, 1))
    return row


def _fmt(row: dict[str, Any]) -> str:
    mem = f"{row['train_peak_mb']:10.1f}" if "train_peak_mb" in row else f"{'-':>10}"
    shape = "x".join(str(s) for s in row["input_shape"])
    return (f"{row['name']:24s} {shape:>11s} {row['params']:>13,d} {row['batch_stats']:>9,d} "
            f"{row['gmacs']:9.4f} {row['size_mb']:9.1f} {mem}")


HEADER = (f"{'model':24s} {'input':>11s} {'params':>13s} {'bn_stats':>9s} {'GMACs':>9s} "
          f"{'size_MB':>9s} {'train_MB':>10s}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaling.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="registered model names (globs allowed)")
    p.add_argument("--all", action="store_true", help="every registered model")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None,
                   help="input side in pixels, or length in samples for audio (default: the model's own)")
    p.add_argument("--batch", type=int, default=32, help="batch of the train step for train_MB")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip compiling the train step (train_MB)")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    args = p.parse_args(argv)
    names = list_models() if args.all else [n for pat in args.names for n in (list_models(pat) or [pat])]
    if not names:
        p.error("name a model (see --all), e.g. python -m scaling.summary resnet50")
    if not args.json:
        print(HEADER)
    status = 0
    for name in names:
        try:
            row = summarize(name, num_classes=args.num_classes, resolution=args.resolution,
                            batch=args.batch, memory=args.memory)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        print(json.dumps(row) if args.json else _fmt(row), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""A run's trained weights as a torchvision / timm state dict: the inverse of weight import.

    python -m scaling.weights.export --workdir runs/train --out wrn.safetensors [--layout torchvision|timm]

The newest checkpoint of the run directory (`scaling.train.load_run`) is written as a
.safetensors state dict in the names and layouts of the model's weight family
(`scaling.weights.families`, the model's registry record names it): convolution kernels
HWIO -> OIHW, dense [in, out] -> [out, in], BatchNorm statistics as `running_mean` /
`running_var` with a `num_batches_tracked`, so `torch.nn.Module.load_state_dict(strict=True)`
of the torchvision / timm model takes it, and `scaling.weights.load` gives the variables back
bit for bit. The metadata records the model, its config fields, the layout and the class
names (`class_names`, JSON), which `configs/eval.py` reads for imported weights.

Layouts: the family's own naming (the default), and another source's where its names are the
same or differ only in spellings that import rewrites one to one (ViT's torchvision names).
A naming that import rebuilds whole trees for (timm's names of the torchvision EfficientNet)
is import-only. Models without a weight family (no torchvision / timm counterpart) cannot be
exported: one line says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

from scaling.weights.convert import _rewrite, to_state_dict
from scaling.weights.families import FAMILIES, family_of, record_of
from scaling.weights.io import write_state_dict


def layouts(model: Any) -> tuple[str, ...]:
    """The layouts `model` exports to, its family's own naming first."""
    namings = family_of(model).namings(model)
    native = next(iter(namings.values()))
    return tuple(s for s, n in namings.items() if n.tree is None and n.renames == native.renames)


def resolve_layout(model: Any, layout: str | None, name: str | None = None) -> str:
    """`layout`, or the family's own naming when None; ValueError when `model` (registered
    as `name`) cannot be written in it."""
    available = layouts(model)
    if layout is None:
        return available[0]
    if layout not in available:
        raise ValueError(f"--layout {layout}: {name or record_of(model).name} exports in "
                         f"{' or '.join(available)} layout only.")
    return layout


def state_dict(model: Any, variables: dict, layout: str | None = None) -> dict[str, np.ndarray]:
    """`variables` as a torch state dict in `layout` (None: the family's own naming)."""
    layout = resolve_layout(model, layout)
    namings = family_of(model).namings(model)
    tensors = to_state_dict(model, variables)
    if namings[layout] == next(iter(namings.values())):
        return tensors
    return {_rewrite(k, namings[layout].aliases, reverse=True): v for k, v in tensors.items()}


def check_exportable(model_name: str) -> None:
    """Raises ValueError when the registered model has no torchvision / timm counterpart."""
    from scaling.models import model_info

    if model_info(model_name).weights not in FAMILIES:
        raise ValueError(f"export: {model_name} has no torchvision / timm layout (its registry "
                         "record names no weight family); exportable families: "
                         f"{', '.join(sorted(FAMILIES))}.")


def export_run(run_dir: str, out: str, layout: str | None = None) -> tuple[str, str]:
    """Writes the newest checkpoint of `run_dir` to `out` (.safetensors); returns (path, layout)."""
    from scaling.data import build_source
    from scaling.train import build_model, load_run, run_config

    config = run_config(run_dir)
    check_exportable(config.model.name)
    layout = resolve_layout(build_model(config.model, num_classes=1), layout,  # before restoring
                            config.model.name)
    config, run, variables = load_run(run_dir)
    names = build_source(config.data, config.data.train_split).class_names
    metadata = {"model": config.model.name, "fields": json.dumps(config.model.to_dict()),
                "layout": layout, "class_names": json.dumps(list(names))}
    return write_state_dict(out, state_dict(run.model, variables, layout), metadata), layout


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scaling.weights.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--layout", choices=("torchvision", "timm"), default=None,
                        help="whose names to write (default: the model family's own)")
    args = parser.parse_args(argv)
    from scaling.cli import fail

    try:
        path, layout = export_run(args.workdir, args.out, args.layout)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"{path}: {args.workdir} in {layout} layout")


if __name__ == "__main__":
    main(sys.argv[1:])

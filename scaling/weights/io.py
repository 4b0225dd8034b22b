"""Reading and writing state dicts as numpy arrays.

`.safetensors` files are read with the `safetensors` package (no code runs on load).
`.pth` / `.pt` / `.bin` files are PyTorch pickles: they are read only through
`torch.load(path, weights_only=True)`, which refuses anything but tensors and plain
containers. torch is an optional extra, imported only for these files; nothing else is
ever unpickled.
"""
from __future__ import annotations

import os

import numpy as np

SAFETENSORS_EXTENSIONS = (".safetensors",)
TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
# Training checkpoints wrap the state dict; the first of these keys that holds a dict is used.
_WRAPPERS = ("state_dict", "model", "model_state", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{torch key: numpy array} from a .safetensors file, or a torch pickle when torch is
    installed. A `module.` prefix on every key (DistributedDataParallel) is removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: {path!r} does not exist or is not a file.")
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        tensors = _read_safetensors(path)
    elif ext in TORCH_EXTENSIONS:
        tensors = _read_torch(path)
    else:
        raise ValueError(f"weights: {path!r} has an unsupported file type {ext!r}; use "
                         f"{', '.join(SAFETENSORS_EXTENSIONS)} (or {', '.join(TORCH_EXTENSIONS)} "
                         "with torch installed).")
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), "np") as f:
        return dict(f.metadata() or {})


def write_state_dict(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> str:
    """Writes `tensors` as .safetensors (atomically: a temporary file, then a rename)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() not in SAFETENSORS_EXTENSIONS:
        raise ValueError(f"weights: {path!r}: state dicts are written as .safetensors only.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(path, "np") as f:  # bfloat16 arrives as ml_dtypes.bfloat16
        return {k: f.get_tensor(k) for k in f.keys()}


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"weights: {path!r} is a PyTorch pickle; reading it needs torch, an optional extra "
            "(pip install torch). Or convert it once to .safetensors "
            "(safetensors.torch.save_file(state_dict, 'weights.safetensors')).") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"weights: {path!r} holds a {type(obj).__name__}, not a state dict.")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().cpu()
        out[k] = (v.float() if v.is_floating_point() and v.dtype != torch.float64 else v).numpy()
    return out

"""torch state dicts <-> Flax variables for our models, by one generic rule.

Import (`from_state_dict`, `load`):

1. keys starting with `__` (metadata such as a fixture's `__input__`) and BatchNorm
   `num_batches_tracked` are skipped;
2. the source's spellings are rewritten to the family's reference spelling (`aliases`,
   `renames`, see scaling.weights.families);
3. the key becomes our path: a numeric component joins the one before it by '_'
   (`layer1.0.conv1.weight` -> `layer1_0/conv1/weight`);
4. the leaf and layout: `weight` with >= 2 dims -> `kernel` (linear [out, in] -> [in, out];
   conv OIHW -> HWIO, so depthwise [C, 1, kh, kw] -> [kh, kw, 1, C]; Conv1d OIK -> KIO),
   1-D `weight` -> `scale`, `bias` -> `bias`, `running_mean` / `running_var` ->
   `batch_stats` `mean` / `var`; any other leaf keeps its name (ViT `cls_token`);
5. the result is compared with the model's variables (shapes from `jax.eval_shape`, no
   compute): missing, unexpected and wrongly shaped entries raise one `WeightsMismatchError`
   that lists them all, with torch names.

Export (`to_state_dict`) is the inverse, in the reference naming our module names follow,
and adds a zero `num_batches_tracked` per BatchNorm so `torch.load_state_dict(strict=True)`
accepts the file.

Heads: `new_head=True` drops the file's classifier (whatever its size) and keeps the
model's own freshly initialised head, initialised exactly as `model.init` with the same key
would; without it a head of another size is an error that says so. A model built with
`include_top=False` ignores the file's classifier layers. A ViT built for another
resolution gets the file's position embeddings interpolated to its grid
(`scaling.models.vit.resize_pos_embed`, bicubic).
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from scaling.models import create_model
from scaling.weights import io
from scaling.weights.families import Naming, family_of, head_paths, record_of

SOURCES = ("torchvision", "timm", "auto")
SKIPPED_LEAVES = ("num_batches_tracked",)
_STATS = {"running_mean": "mean", "running_var": "var"}
_STATS_BACK = {v: k for k, v in _STATS.items()}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_INDEX_SUFFIX = re.compile(r"^(.+?)((?:_\d+)+)$")
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_LISTED = 25  # entries shown per category in a mismatch error


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and wrongly
    shaped entry (attributes `missing`, `unexpected`, `wrong_shape`)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape


# ----------------------------------------------------------------------------- key rules

def torch_key_to_path(key: str) -> tuple[str, ...]:
    """'features.2.conv.0.0.weight' -> ('features_2', 'conv_0_0', 'weight')."""
    path: list[str] = []
    for part in key.split("."):
        path.append(f"{path.pop()}_{part}" if part.isdigit() and path else part)
    return tuple(path)


def path_to_torch_key(path: tuple[str, ...], split: bool = True) -> str:
    """('features_2', 'conv_0_0', 'weight') -> 'features.2.conv.0.0.weight' (the inverse of
    `torch_key_to_path` where every '_<digits>' suffix is an index; `split=False` keeps them)."""
    parts = []
    for p in path:
        m = _INDEX_SUFFIX.match(p) if split else None
        parts.append(m.group(1) + m.group(2).replace("_", ".") if m else p)
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def _template(template: str) -> tuple[re.Pattern, str]:
    """A spelling template ('blocks.{i}.norm1') -> (regex over whole components, replacement)."""
    regex, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        regex += [re.escape(template[pos:m.start()]), rf"(?P<{m.group(1)}>\d+)"]
        pos = m.end()
    regex.append(re.escape(template[pos:]))
    pattern = re.compile(r"(?<![^.])" + "".join(regex) + r"(?![^.])")
    replacement = _PLACEHOLDER.sub(lambda m: rf"\g<{m.group(1)}>", template.replace("\\", "\\\\"))
    return pattern, replacement


def _rewrite(key: str, rules, reverse: bool = False) -> str:
    for theirs, ours in rules:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        pattern, _ = _template(src)
        key = pattern.sub(_template(dst)[1], key)
    return key


def _kernel_perm(ndim: int, to_torch: bool = False) -> tuple[int, ...]:
    """torch [O, I, *spatial] -> ours [*spatial, I, O] (and back)."""
    if to_torch:
        return (ndim - 1, ndim - 2, *range(ndim - 2))
    return (*range(2, ndim), 1, 0)


# ----------------------------------------------------------------------------- import

class _Entry:
    """One file tensor on its way to our layout; the transpose happens only when used."""

    def __init__(self, key: str, value: np.ndarray, perm: tuple[int, ...] | None):
        self.key, self.value, self.perm = key, value, perm

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.value.shape)
        return tuple(shape[p] for p in self.perm) if self.perm else shape

    def array(self, dtype) -> np.ndarray:
        v = np.transpose(self.value, self.perm) if self.perm else self.value
        return np.asarray(v, dtype=dtype)


def _map(state_dict: dict[str, np.ndarray], naming: Naming) -> dict[tuple[str, ...], _Entry]:
    """File tensors -> {(collection, *path): entry} under `naming`."""
    flat: dict[tuple[str, ...], _Entry] = {}
    for key, value in state_dict.items():
        if key.startswith("__") or key.rsplit(".", 1)[-1] in SKIPPED_LEAVES:
            continue
        value = np.asarray(value)
        *module, leaf = torch_key_to_path(_rewrite(_rewrite(key, naming.aliases), naming.renames))
        perm = None
        if leaf in _STATS:
            collection, leaf = "batch_stats", _STATS[leaf]
        else:
            collection = "params"
            if leaf == "weight":
                leaf = "kernel" if value.ndim >= 2 else "scale"
                perm = _kernel_perm(value.ndim) if value.ndim >= 2 else None
        flat[(collection, *module, leaf)] = _Entry(key, value, perm)
    if naming.tree is not None:
        nested = unflatten_dict(flat)
        flat = flatten_dict({col: naming.tree(tree) for col, tree in nested.items()})
    return flat


def _under(key: tuple[str, ...], prefixes) -> bool:
    return any(key[1:1 + len(p)] == p for p in prefixes)


def _fmt(key: tuple[str, ...]) -> str:
    return "/".join(key)


class _Fit:
    """How a mapped file compares with the model's variables."""

    def __init__(self, flat, expected, heads, drop_heads, ignore):
        self.flat = {k: e for k, e in flat.items() if not (_under(k, heads) and drop_heads)
                     and not _under(k, ignore)}
        self.missing = sorted(k for k in expected if k not in self.flat
                              and not (drop_heads and _under(k, heads)))
        self.unexpected = sorted(k for k in self.flat if k not in expected)
        self.wrong = sorted(k for k in self.flat if k in expected
                            and self.flat[k].shape != tuple(expected[k].shape))

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong)


def _model(model, **overrides):
    """(name for messages, module) from a registered name or a module, with field overrides."""
    if isinstance(model, str):
        return model, create_model(model, **overrides)
    return type(model).__name__, model.clone(**overrides) if overrides else model


def variable_shapes(model, size: int) -> dict:
    """The model's variables as ShapeDtypeStructs for a size x size input (jax.eval_shape:
    no compute), cached per (model, size)."""
    try:
        return flax.core.unfreeze(_cached_shapes(model, size))
    except TypeError:  # a field holds something unhashable (a list): no cache
        return flax.core.unfreeze(_cached_shapes.__wrapped__(model, size))


@functools.lru_cache(maxsize=16)
def _cached_shapes(model, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _default_size(model) -> int:
    """A ViT's own `image_size`, else the model's registered resolution."""
    size = getattr(model, "image_size", None) or record_of(model).resolution
    return size if isinstance(size, int) else size[0]


def from_state_dict(model: Any, state_dict: dict[str, np.ndarray], *, source: str = "auto",
                    new_head: bool = False, rng: jax.Array | None = None,
                    image_size: int | None = None, origin: str = "state dict",
                    **overrides) -> dict[str, Any]:
    """Flax variables ({'params', 'batch_stats'} as the model has them) from a torch state dict.

    `model` is a registered name (then `overrides` are its fields, e.g. num_classes=5) or a
    Linen module. `source`: 'torchvision' | 'timm' | 'auto' (the naming that fits best).
    `new_head`: keep the model's freshly initialised head (initialised from `rng`, default
    key 0, as `model.init` would) instead of the file's. `image_size` is the input side
    used for shape inference (default: a ViT's `image_size`, else the registered resolution).
    """
    if source not in SOURCES:
        raise ValueError(f"weights source: unknown {source!r}; use one of {', '.join(SOURCES)}.")
    name, model = _model(model, **overrides)
    family = family_of(model)
    namings = family.namings(model)
    if source != "auto" and source not in namings:
        raise ValueError(f"weights source: {name} ({type(model).__name__}) follows "
                         f"{' / '.join(namings)} names; {source!r} state dicts are not supported "
                         f"for it. Use source={next(iter(namings))!r} or 'auto'.")
    size = image_size or _default_size(model)
    shapes = variable_shapes(model, size)
    expected = flatten_dict(shapes)
    heads = [tuple(h.split("/")) for h in head_paths(model)]
    ignore = _missing_top_layers(model, size, shapes) if not getattr(model, "include_top", True) else []
    fits = {s: _Fit(_map(state_dict, namings[s]), expected, heads, new_head, ignore)
            for s in (namings if source == "auto" else [source])}
    chosen = min(fits, key=lambda s: fits[s].problems)  # ties: the first (native) naming
    fit = fits[chosen]
    pos_embed = ("params", "pos_embed")
    resize = (pos_embed in fit.wrong and family.resize_pos_embed
              and fit.flat[pos_embed].shape[-1] == expected[pos_embed].shape[-1])
    if resize:
        fit.wrong.remove(pos_embed)
    if fit.problems:
        raise _mismatch(name, chosen, origin, fit, expected, model, heads, new_head)
    flat = {k: e.array(expected[k].dtype) for k, e in fit.flat.items()}
    if resize:
        from scaling.models.vit import resize_pos_embed
        params = resize_pos_embed({k[1:][0]: v for k, v in flat.items() if len(k) == 2
                                   and k[0] == "params"}, size, model.patch_size)
        flat[pos_embed] = np.asarray(params["pos_embed"], np.float32)
    if new_head:
        fresh = [k for k in expected if _under(k, heads)]
        flat.update(_fresh_init(model, size, fresh, rng))
    return unflatten_dict(flat)


def load(model: Any, path: str, *, source: str = "auto", new_head: bool = False,
         rng: jax.Array | None = None, image_size: int | None = None, **overrides) -> dict[str, Any]:
    """Flax variables for `model` (a registered name + field `overrides`, e.g.
    `num_classes=5`, or a Linen module) from a torchvision / timm state dict file
    (.safetensors; .pth/.pt/.bin need torch installed). See `from_state_dict`."""
    return from_state_dict(model, io.read_state_dict(path), source=source, new_head=new_head,
                           rng=rng, image_size=image_size, origin=str(path), **overrides)


def _missing_top_layers(model, size, shapes) -> list[tuple[str, ...]]:
    """Top-level modules a full model (include_top=True) has and this one lacks."""
    full = variable_shapes(model.clone(include_top=True), size)
    return [(name,) for name in full.get("params", {}) if name not in shapes.get("params", {})]


def _fresh_init(model, size, keys, rng) -> dict[tuple[str, ...], np.ndarray]:
    """The head's initial values as `model.init(rng)` gives them. Only those leaves are
    outputs, so XLA drops the rest of the network from the compiled init."""
    rng = jax.random.key(0) if rng is None else rng

    def init(rng):
        params_rng, dropout_rng = jax.random.split(rng)
        v = model.init({"params": params_rng, "dropout": dropout_rng},
                       jnp.zeros((1, size, size, 3), jnp.float32), train=False)
        flat = flatten_dict(flax.core.unfreeze(v))
        return {"/".join(k): flat[k] for k in keys}

    out = jax.jit(init, compiler_options=_FAST_COMPILE)(rng)
    return {tuple(k.split("/")): np.asarray(v) for k, v in out.items()}


def _mismatch(name, source, origin, fit, expected, model, heads, new_head) -> WeightsMismatchError:
    def listing(title, keys, fmt):
        if not keys:
            return []
        more = f"    ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else None
        return [f"  {title} ({len(keys)}):"] + [f"    {fmt(k)}" for k in keys[:_LISTED]] + ([more] if more else [])

    missing = listing("missing: in the model, not in the file", fit.missing,
                      lambda k: f"{reference_key(k, model)}  -> {_fmt(k)} {tuple(expected[k].shape)}")
    unexpected = listing("unexpected: in the file, not in the model", fit.unexpected,
                         lambda k: f"{fit.flat[k].key} {tuple(fit.flat[k].value.shape)}  -> {_fmt(k)}")
    wrong = listing("wrong shape", fit.wrong,
                    lambda k: f"{fit.flat[k].key}: file {tuple(fit.flat[k].value.shape)} -> "
                              f"{fit.flat[k].shape}, model {tuple(expected[k].shape)}  ({_fmt(k)})")
    counts = ", ".join(f"{n} {what}" for n, what in ((len(fit.missing), "missing"),
                                                     (len(fit.unexpected), "unexpected"),
                                                     (len(fit.wrong), "wrong shape")) if n)
    lines = [f"weights: {origin} does not fit {name} ({source} names): {counts}.",
             *missing, *unexpected, *wrong]
    head_wrong = [k for k in fit.wrong if _under(k, heads) and k[-1] == "bias"]
    if head_wrong and not new_head:
        k = head_wrong[0]
        lines.append(f"  The head ({'/'.join(k[1:-1])}) has {fit.flat[k].shape[0]} classes in the file and "
                     f"{expected[k].shape[0]} in the model: pass new_head=True (config: "
                     f"init.new_head=True) to train a new head, or build the model with "
                     f"num_classes={fit.flat[k].shape[0]}.")
    return WeightsMismatchError("\n".join(lines), [_fmt(k) for k in fit.missing],
                                [fit.flat[k].key for k in fit.unexpected], [fit.flat[k].key for k in fit.wrong])


# ----------------------------------------------------------------------------- export

def reference_key(key: tuple[str, ...], model: Any) -> str:
    """Our variable key (collection, *path, leaf) -> the torch key of the reference naming."""
    family = family_of(model)
    collection, *module, leaf = key
    if collection == "batch_stats":
        leaf = _STATS_BACK.get(leaf, leaf)
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    dotted = path_to_torch_key((*module, leaf), split=family.split)
    return _rewrite(dotted, next(iter(family.namings(model).values())).renames, reverse=True)


def to_state_dict(model: Any, variables: dict[str, Any], *,
                  num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
    """Our variables -> a torch state dict (reference names and layouts) as numpy arrays."""
    if isinstance(model, str):
        model = create_model(model)
    out: dict[str, np.ndarray] = {}
    for key, value in flatten_dict(flax.core.unfreeze(jax.device_get(variables))).items():
        value = np.asarray(value)
        if key[-1] == "kernel":
            value = np.transpose(value, _kernel_perm(value.ndim, to_torch=True))
        torch_key = reference_key(key, model)
        if torch_key in out:
            raise ValueError(f"weights: two variables export to {torch_key!r}.")
        out[torch_key] = value
        if num_batches_tracked and key[0] == "batch_stats" and key[-1] == "mean":
            out[torch_key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


def save(path: str, model: Any, variables: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """Writes `variables` as a .safetensors torch state dict (`to_state_dict`)."""
    return io.write_state_dict(path, to_state_dict(model, variables), metadata)

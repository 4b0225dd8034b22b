"""Per-family facts the generic importer needs: where a family's reference names depart from
the generic rule. Which family a model belongs to, and its head modules, are the model's
registry record's (`scaling.models.model_info(name).weights` and `.heads`).

The generic rule (scaling.weights.convert): a torch key's components are our module path,
with a numeric component (a `Sequential` index) joined to the one before it by '_'
(`features.2.conv.0.0.weight` -> `features_2/conv_0_0/kernel`). Exporting splits such
suffixes again (`features_2` -> `features.2`). A family lists only its exceptions:

- `renames`: (reference spelling, generic spelling) pairs, used both ways, e.g. ResNet's
  `downsample.0` is our `downsample_conv`;
- `aliases`: import-only spellings of other sources or older releases (torchvision's ViT
  names, DenseNet's pre-0.3 `norm.1`), rewritten to the reference spelling;
- `tree`: an import-only rename of a whole variable tree, where the mapping depends on a
  block's contents (EfficientNet timm -> torchvision names);
- `split=False`: the family's names contain '_<digits>' that are not indices (Inception v3's
  `branch7x7_2`), so exporting must not split them;
- `resize_pos_embed`: the family has ViT position embeddings, which a file made for another
  resolution gets interpolated to the model's grid.

Spellings are templates over whole dot-separated components; `{i}` matches digits.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn

from scaling.models import ModelInfo, info_of

Rule = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Naming:
    """How one source (torchvision or timm) names a family's tensors."""
    renames: tuple[Rule, ...] = ()
    aliases: tuple[Rule, ...] = ()
    tree: Callable[[dict], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    # source -> Naming; the first source is the one our module names follow (exports use it).
    namings: Callable[[nn.Module], dict[str, Naming]]
    split: bool = True
    resize_pos_embed: bool = False


PLAIN = Naming()


def _only(*sources: str, naming: Naming = PLAIN) -> Callable[[nn.Module], dict[str, Naming]]:
    return lambda model: {s: naming for s in sources}


# ---------------------------------------------------------------------------- EfficientNet

def efficientnet_timm_to_torchvision(tree: dict, num_stages: int = 7) -> dict:
    """Renames a timm-naming EfficientNet variable tree (one collection) to torchvision's
    names: `blocks_{i}_{j}` -> `features_{i+1}_{j}`, a block's convs/norms -> `block_{k}_0/1`
    in the order expand, depthwise, SE (`block_{k}/{fc1, fc2}`), project; `conv_stem`/`bn1`
    -> `features_0_0/1`, `conv_head`/`bn2` -> `features_{num_stages+1}_0/1`, `classifier` ->
    `classifier_1`. Names it does not know pass through (so a bad file still reports them)."""
    def block(b):
        expand = "bn3" in b or "conv_pwl" in b
        convs = ["conv_pw", "conv_dw", "se", "conv_pwl"] if expand else ["conv_dw", "se", "conv_pw"]
        bns = ["bn1", "bn2", None, "bn3"] if expand else ["bn1", None, "bn2"]
        names = {}
        for k, (conv, bn) in enumerate(zip(convs, bns)):
            names.update({conv: f"block_{k}_0", bn: f"block_{k}_1"} if bn else {conv: f"block_{k}"})
        out = {names.get(k, k): v for k, v in b.items()}
        for se in [names["se"]] if names["se"] in out else []:
            out[se] = {{"conv_reduce": "fc1", "conv_expand": "fc2"}.get(k, k): v for k, v in out[se].items()}
        return out

    top = {"conv_stem": "features_0_0", "bn1": "features_0_1", "conv_head": f"features_{num_stages + 1}_0",
           "bn2": f"features_{num_stages + 1}_1", "classifier": "classifier_1"}
    out = {}
    for name, sub in tree.items():
        parts = name.split("_")
        if len(parts) == 3 and parts[0] == "blocks" and isinstance(sub, dict):
            out[f"features_{int(parts[1]) + 1}_{parts[2]}"] = block(sub)
        else:
            out[top.get(name, name)] = sub
    return out


def _efficientnet(model) -> dict[str, Naming]:
    if model.naming == "timm":
        return {"timm": PLAIN}
    # timm's efficientnet_b* (not tf_) is torchvision's network under timm's names.
    tree = functools.partial(efficientnet_timm_to_torchvision, num_stages=len(model.blocks))
    return {"torchvision": PLAIN, "timm": Naming(tree=tree)}


# ---------------------------------------------------------------------------- Inception v4

def _inception_v4(model) -> dict[str, Naming]:
    """timm's Inception-C blocks name their convs `branch1_0`, `branch2_0..2` (attributes, not
    indices), unlike the other blocks' `branch1.0` Sequentials."""
    n_a, n_b, n_c = model.block_counts
    first = 3 + 3 + n_a + 1 + n_b + 1   # stem convs, Mixed3a/4a/5a, A x n_a, Red-A, B x n_b, Red-B
    renames = tuple((f"features.{i}.branch{b}_{j}", f"features.{i}.branch{b}.{j}")
                    for i in range(first, first + n_c) for b, j in ((1, 0), (2, 0), (2, 1), (2, 2)))
    return {"timm": Naming(renames=renames)}


# ------------------------------------------------------------------------------------ ViT

def _vit_torchvision_aliases() -> tuple[Rule, ...]:
    layer = "encoder.layers.encoder_layer_{i}"
    pairs = [("conv_proj", "patch_embed.proj"), ("class_token", "cls_token"),
             ("encoder.pos_embedding", "pos_embed"), ("encoder.ln", "norm"),
             ("heads.head", "head"), ("heads.pre_logits", "pre_logits")]
    for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2"),
                         ("self_attention.in_proj_weight", "attn.qkv.weight"),
                         ("self_attention.in_proj_bias", "attn.qkv.bias"),
                         ("self_attention.out_proj", "attn.proj"),
                         ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2"),
                         ("mlp.linear_1", "mlp.fc1"), ("mlp.linear_2", "mlp.fc2")):  # torchvision < 0.13
        pairs.append((f"{layer}.{theirs}", f"blocks.{{i}}.{ours}"))
    return tuple(pairs)


_RESNET = Naming(renames=(("downsample.0", "downsample_conv"), ("downsample.1", "downsample_bn")))
# The reference PyTorch WRN (Zagoruyko & Komodakis; xternalz/WideResNet-pytorch).
_WRN = Naming(renames=(("block{g}.layer.{i}", "block{g}.{i}"), ("convShortcut", "conv_shortcut")))
# torchvision < 0.3 DenseNet checkpoints (still what its download URLs serve) say `norm.1`.
_DENSENET = Naming(aliases=tuple((f"denselayer{{i}}.{m}.{{j}}", f"denselayer{{i}}.{m}{{j}}")
                                 for m in ("norm", "relu", "conv")))
_IRV2 = Naming(renames=(("repeat_1.{i}", "repeat.1.{i}"), ("repeat_2.{i}", "repeat.2.{i}")))

# By the `weights` field of a model's registry record.
FAMILIES: dict[str, Family] = {
    "resnet": Family(_only("torchvision", "timm", naming=_RESNET)),
    "cifar_resnet": Family(_only("torchvision", naming=_RESNET)),
    "wide_resnet": Family(_only("torchvision", naming=_WRN)),
    "vgg": Family(_only("torchvision")),
    "alexnet": Family(_only("torchvision")),
    "densenet": Family(_only("torchvision", "timm", naming=_DENSENET)),
    "cifar_densenet": Family(_only("torchvision", naming=_DENSENET)),
    "googlenet": Family(_only("torchvision")),
    "inception_v3": Family(_only("torchvision", "timm"), split=False),
    "inception_v4": Family(_inception_v4),
    "inception_resnet_v2": Family(_only("timm", naming=_IRV2)),
    "mobilenet_v1": Family(_only("timm")),
    "mobilenet_v2": Family(lambda model: {model.naming: PLAIN}),
    "mobilenet_v3": Family(_only("torchvision")),
    "efficientnet": Family(_efficientnet),
    "vit": Family(lambda model: {"timm": PLAIN, "torchvision": Naming(aliases=_vit_torchvision_aliases())},
                  resize_pos_embed=True),
}


def record_of(model: Any) -> ModelInfo:
    """The registry record of `model` (a module), which must name a weight family."""
    info = info_of(model)
    if info is None or info.weights not in FAMILIES:
        which = f" ({info.name})" if info is not None else ""
        raise ValueError(f"weights: no importer for {type(model).__name__} models{which}; covered "
                         f"families: {', '.join(sorted(FAMILIES))}.")
    return info


def family_of(model: Any) -> Family:
    return FAMILIES[record_of(model).weights]


def head_paths(model: Any) -> tuple[str, ...]:
    """The modules whose shapes depend on `num_classes` ('fc', 'classifier_1', 'aux1/fc2', ...),
    whether or not this instance builds them (auxiliary heads are optional): the record's."""
    return record_of(model).heads

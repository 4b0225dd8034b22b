"""Vision Transformer (Dosovitskiy et al. 2021), as torchvision `vit_*` and timm `vit_*_patch*`.

Image -> p x p patches embedded by a stride-p conv -> [CLS] token prepended -> learned position
embeddings -> (dropout) -> L pre-LN encoder blocks -> final LayerNorm -> head on the CLS token
(`classifier='token'`) or on the mean of the patch tokens (`classifier='gap'`, no CLS token).
Block: x + MHA(LN(x)); x + MLP(LN(x)), MLP = Linear -> exact (erf) GELU -> Linear.
LayerNorm epsilon 1e-6. Attention uses one fused qkv projection (3 x hidden), whose parameter
count equals torchvision's `in_proj` and whose layout is timm's (output = [3, heads, head_dim]).

Module names follow timm, so a timm state dict maps key by key (`blocks.3.attn.qkv.weight`
-> `blocks_3/attn/qkv/kernel`, transposed): cls_token [1, 1, D], pos_embed [1, 1 + N, D],
patch_embed/proj, blocks_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}, norm,
(pre_logits), head. torchvision names differ (conv_proj, encoder.layers.encoder_layer_i.
{ln_1, self_attention.in_proj_*, self_attention.out_proj, ln_2, mlp.0, mlp.3}, encoder.ln,
heads.head) but map one to one onto the same tensors.

The number of position embeddings is fixed by `image_size`; to run at another resolution,
interpolate them with `resize_pos_embed(params, new_image_size, patch_size)` and build the
model with the new `image_size`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scaling.models.layers import DropPath, Dtype, activation, dense_init, logits_dense
from scaling.models.registry import INCEPTION_MEAN, INCEPTION_STD, register_model

CLASSIFIERS = ("token", "gap")
LN_EPS = 1e-6

# torchvision's ViT initialisation: xavier-uniform linears with zero biases, a
# truncated-normal fan-in patch projection, N(0, 0.02) position embeddings, zero CLS token.
_xavier = nn.initializers.xavier_uniform()
_patch_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_pos_init = nn.initializers.normal(0.02)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def grid_size(image_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    """Patches per side (rows, cols) of an image of `image_size` cut into p x p patches."""
    h, w = _pair(image_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"model.image_size: {image_size} is not a multiple of "
                         f"model.patch_size={patch_size}.")
    return h // patch_size, w // patch_size


def dropout(x, rate: float, train: bool):
    """nn.Dropout on the 'dropout' RNG stream; no module at all when `rate` is 0."""
    return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x


class PatchEmbed(nn.Module):
    """p x p patches -> hidden_size by a stride-p conv, flattened to [N, rows * cols, D]."""
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=_patch_init, name="proj")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as timm's `Attention`."""
    num_heads: int
    attention_dropout: float = 0.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n, length, dim = x.shape
        heads = self.num_heads
        qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=_xavier, name="qkv")(x)
        q, k, v = qkv.reshape(n, length, 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)
        logits = jnp.einsum("nhqd,nhkd->nhqk", q * (dim // heads) ** -0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        weights = dropout(weights, self.attention_dropout, train)
        y = jnp.einsum("nhqk,nhkd->nqhd", weights, v).reshape(n, length, dim)
        y = nn.Dense(dim, dtype=self.dtype, kernel_init=_xavier, name="proj")(y)
        return dropout(y, self.dropout, train)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        dim = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_xavier, name="fc1")(x)
        x = dropout(activation("gelu")(x), self.dropout, train)
        x = nn.Dense(dim, dtype=self.dtype, kernel_init=_xavier, name="fc2")(x)
        return dropout(x, self.dropout, train)


class Block(nn.Module):
    """Pre-LN transformer encoder block with optional stochastic depth on both branches."""
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype)
        y = Attention(self.num_heads, self.attention_dropout, self.dropout, dtype=self.dtype,
                      name="attn")(norm(name="norm1")(x), train)
        x = x + DropPath(self.drop_path)(y, deterministic=not train)
        y = Mlp(self.mlp_dim, self.dropout, dtype=self.dtype, name="mlp")(norm(name="norm2")(x), train)
        return x + DropPath(self.drop_path)(y, deterministic=not train)


class VisionTransformer(nn.Module):
    """ViT with its scaling knobs as fields.

    `include_top=False` returns the pooled feature after the final LayerNorm: the CLS token
    ('token') or the mean over patch tokens ('gap'), [N, hidden_size]. `representation_size`
    adds torchvision's `pre_logits` Linear + tanh before the head. `drop_path` is the
    stochastic-depth rate of the last block, scaled linearly from 0 over the blocks (timm).
    """
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    num_classes: int = 1000
    include_top: bool = True
    classifier: str = "token"
    representation_size: int | None = None
    image_size: int | Sequence[int] = 224
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"model.classifier: unknown classifier {self.classifier!r}; "
                             f"use one of {', '.join(CLASSIFIERS)}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads: hidden_size={self.hidden_size} is not divisible "
                             f"by num_heads={self.num_heads}.")
        grid_size(self.image_size, self.patch_size)
        super().__post_init__()

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.classifier == "token" else 0

    @property
    def num_patches(self) -> int:
        rows, cols = grid_size(self.image_size, self.patch_size)
        return rows * cols

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or tuple(x.shape[1:3]) != _pair(self.image_size):
            raise ValueError(f"model.image_size: input of shape {x.shape} does not match "
                             f"image_size={self.image_size} (patch_size={self.patch_size}); build the "
                             "model with the input's image_size and resize the position embeddings "
                             "with scaling.models.vit.resize_pos_embed.")
        x = PatchEmbed(self.patch_size, self.hidden_size, dtype=self.dtype,
                       name="patch_embed")(x.astype(self.dtype))
        n, _, dim = x.shape
        if self.classifier == "token":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, dim), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, dim)), x], axis=1)
        pos = self.param("pos_embed", _pos_init, (1, self.num_prefix_tokens + self.num_patches, dim),
                         jnp.float32)
        x = x + pos.astype(self.dtype)
        x = dropout(x, self.dropout, train)
        for i in range(self.num_layers):
            rate = self.drop_path * i / max(self.num_layers - 1, 1)
            x = Block(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, rate,
                      dtype=self.dtype, name=f"blocks_{i}")(x, train)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
        if not self.include_top:
            return x
        if self.representation_size is not None:
            x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, kernel_init=dense_init,
                                  name="pre_logits")(x))
        return logits_dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init, name="head")(x)


def resize_pos_embed(params: dict[str, Any], new_image_size: int | Sequence[int], patch_size: int,
                     *, method: str = "bicubic") -> dict[str, Any]:
    """Returns `params` with `pos_embed` interpolated to the patch grid of `new_image_size`.

    The grid part ([1, rows * cols, D], row-major) is resized in 2-D with `method`
    ('bicubic' as timm, or 'bilinear'; no antialiasing); the CLS embedding, present when
    `params` has a `cls_token`, is kept unchanged. The old grid must be square. `params` is a
    ViT 'params' dict (or a variables dict holding one); the input is not modified. Build the
    model with `image_size=new_image_size` to apply the result.
    """
    if "params" in params and "pos_embed" not in params:
        return {**params, "params": resize_pos_embed(params["params"], new_image_size, patch_size,
                                                     method=method)}
    if method not in ("bicubic", "bilinear"):
        raise ValueError(f"method: unknown interpolation {method!r}; use one of bicubic, bilinear.")
    pos = params["pos_embed"]
    prefix = 1 if "cls_token" in params else 0
    old = pos.shape[1] - prefix
    side = int(round(old ** 0.5))
    if side * side != old:
        raise ValueError(f"pos_embed: {old} grid positions do not form a square grid.")
    rows, cols = grid_size(new_image_size, patch_size)
    if (rows, cols) == (side, side):
        return dict(params)
    grid = pos[:, prefix:].reshape(1, side, side, -1)
    grid = jax.image.resize(grid.astype(jnp.float32), (1, rows, cols, grid.shape[-1]), method=method,
                            antialias=False).astype(pos.dtype)
    new = jnp.concatenate([pos[:, :prefix], grid.reshape(1, rows * cols, -1)], axis=1)
    return {**params, "pos_embed": new}


# name: (patch_size, hidden_size, num_layers, num_heads, mlp_dim)
_VARIANTS = {
    "vit_ti_16": (16, 192, 12, 3, 768),
    "vit_s_16": (16, 384, 12, 6, 1536),
    "vit_b_16": (16, 768, 12, 12, 3072),
    "vit_b_32": (32, 768, 12, 12, 3072),
    "vit_l_16": (16, 1024, 24, 16, 4096),
    "vit_l_32": (32, 1024, 24, 16, 4096),
    "vit_h_14": (14, 1280, 32, 16, 5120),
}
_ALIASES = {"vit_tiny_patch16_224": "vit_ti_16"}  # timm's name for the same model
# Eval preprocessing of the reference weights: torchvision's ImageNet-1k weights (ImageNet
# mean/std, 224 cropped from 256; vit_l_16 from 242); the sizes torchvision has no weights for
# follow timm's augreg weights (inputs scaled to [-1, 1], crop_pct 0.9).
_TIMM = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_fraction=0.9)
_EVAL = {"vit_ti_16": _TIMM, "vit_s_16": _TIMM, "vit_l_16": dict(crop_fraction=224 / 242)}

for _name, (_p, _d, _l, _h, _m) in _VARIANTS.items():
    _factory = functools.partial(VisionTransformer, patch_size=_p, hidden_size=_d, num_layers=_l,
                                 num_heads=_h, mlp_dim=_m)
    for _alias in [_name] + [a for a, target in _ALIASES.items() if target == _name]:
        register_model(_alias, _factory, head="head", weights="vit", **_EVAL.get(_name, {}))

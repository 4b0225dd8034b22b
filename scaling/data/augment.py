"""Host-side augmentation and normalisation (numpy + PIL), vectorised over a batch where it can.

All randomness arrives as one float64 matrix of uniforms `u` [batch, NUM_UNIFORMS] drawn
per global batch (see `pipeline.augment_uniforms`), so an image's augmentation depends
only on (seed, step, row) and not on how the batch is split over hosts or threads.

Geometry ends at `image_size` x `image_size`:
- sources with one fixed square size (`native`, e.g. CIFAR 32) work at that size and are
  resized plainly when `image_size` differs (CIFAR upsampled for transfer);
- sources of any size (photos) use `random_resized` boxes, or are resized on the shorter
  side and centre-cropped (train `pad_crop` first squares them to `image_size`; eval resizes
  the shorter side to image_size / crop_fraction then centre-crops);
- an image already `image_size` x `image_size` is left as it is in eval.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

RRC_ATTEMPTS = 10                       # Inception crop: tries before the centre fallback
RRC = slice(0, 4 * RRC_ATTEMPTS)        # per attempt: area, log-ratio, top, left
CROP_Y, CROP_X, FLIP, ROTATE = 40, 41, 42, 43
JITTER = slice(44, 47)                  # brightness, contrast, saturation
NUM_UNIFORMS = 47


def _gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, elementwise so a row's result never depends on the batch around it."""
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def random_resized_boxes(heights, widths, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop boxes (left, top, right, bottom) [n, 4], torchvision's rule:
    up to 10 tries of (area fraction, aspect ratio), then a ratio-clamped centre crop."""
    h_img = np.asarray(heights, np.float64)[:, None]
    w_img = np.asarray(widths, np.float64)[:, None]
    u = u.reshape(len(u), RRC_ATTEMPTS, 4)
    area = h_img * w_img * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    log_r = np.log(ratio)
    aspect = np.exp(log_r[0] + u[..., 1] * (log_r[1] - log_r[0]))
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    ok = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(u))
    w, h, uy, ux = w[rows, first], h[rows, first], u[rows, first, 2], u[rows, first, 3]
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    top = np.floor(uy * (h_img - h + 1))
    left = np.floor(ux * (w_img - w + 1))
    # Fallback: whole image, aspect ratio clamped into `ratio`, centred.
    in_ratio = w_img / h_img
    fw = np.where(in_ratio < ratio[0], w_img, np.where(in_ratio > ratio[1], np.round(h_img * ratio[1]), w_img))
    fh = np.where(in_ratio < ratio[0], np.round(w_img / ratio[0]), h_img)
    found = ok.any(axis=1)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    top = np.where(found, top, (h_img - h) // 2)
    left = np.where(found, left, (w_img - w) // 2)
    return np.stack([left, top, left + w, top + h], axis=1)


def pad_crop(images: np.ndarray, pad: int, mode: str, uy: np.ndarray, ux: np.ndarray) -> np.ndarray:
    """Pads [n,H,W,C] by `pad` ('reflect' | 'zero') and crops back to H x W at offsets
    floor(u * (2 pad + 1)), for the whole batch in one gather."""
    if pad == 0:
        return images
    n, height, width = images.shape[:3]
    if mode == "reflect" and pad >= min(height, width):
        raise ValueError(f"data.pad={pad} must be smaller than the image side {min(height, width)} "
                         "for data.pad_mode='reflect'")
    np_mode = "reflect" if mode == "reflect" else "constant"
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    oy = np.minimum((uy * (2 * pad + 1)).astype(np.int64), 2 * pad)
    ox = np.minimum((ux * (2 * pad + 1)).astype(np.int64), 2 * pad)
    rows = (oy[:, None] + np.arange(height))[:, :, None]
    cols = (ox[:, None] + np.arange(width))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def hflip(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mirrors images `rows` (bool [n]) of [n,H,W,C] `x`, in place when x is writable and
    contiguous, moving whole pixels (a C-byte void view): 4x faster than np.where."""
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x)
    pixels = x.view(np.dtype((np.void, x.shape[-1] * x.itemsize)))[..., 0]
    pixels[rows] = pixels[rows][:, :, ::-1]
    return x


def resize_box(image: np.ndarray, box, size: int) -> np.ndarray:
    """Crops `box` (left, top, right, bottom; may be fractional) and resizes it to size x size
    in one bilinear PIL call (antialiased when shrinking)."""
    height, width = image.shape[:2]
    if (height, width) == (size, size) and tuple(box) == (0, 0, width, height):
        return image
    out = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=tuple(float(b) for b in box))
    return np.asarray(out)


def centre_box(height: int, width: int, fraction: float = 1.0):
    """The centred square of side min(H, W) * fraction."""
    side = min(height, width) * fraction
    top, left = (height - side) / 2, (width - side) / 2
    return left, top, left + side, top + side


def _stack(images) -> np.ndarray:
    return images if isinstance(images, np.ndarray) else np.stack(images)


@dataclasses.dataclass(frozen=True)
class Transform:
    """Train / eval preprocessing to float32 [n, size, size, 3], normalised per channel."""
    image_size: int
    native: int | None = None           # fixed square side of the source, None if variable
    crop: str = "pad_crop"
    pad: int = 4
    pad_mode: str = "reflect"
    flip: bool = True
    rotation: float = 0.0
    color_jitter: float = 0.0
    crop_fraction: float = 0.875
    mean: Sequence[float] = (0.4914, 0.4822, 0.4465)
    std: Sequence[float] = (0.2470, 0.2435, 0.2616)

    @classmethod
    def from_config(cls, cfg, native: int | None) -> "Transform":
        """From a data section; its unset (None) fields keep the defaults above."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "native"]
        values = {n: cfg[n] for n in names if cfg[n] is not None}
        for n in ("mean", "std"):
            if n in values:
                values[n] = tuple(values[n])
        return cls(native=native, **values)

    # ----------------------------------------------------------------- geometry
    def _eval_geometry(self, images) -> np.ndarray:
        size = self.image_size
        if isinstance(images, np.ndarray) and images.shape[1:3] == (size, size):
            return images
        out = []
        for img in images:
            height, width = img.shape[:2]
            if (height, width) == (size, size):
                out.append(img)
            elif self.native is not None:       # small fixed-size datasets: plain resize
                out.append(resize_box(img, (0, 0, width, height), size))
            else:
                out.append(resize_box(img, centre_box(height, width, self.crop_fraction), size))
        return _stack(out)

    def _resize_all(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] == (self.image_size, self.image_size):
            return images
        return np.stack([resize_box(img, (0, 0, img.shape[1], img.shape[0]), self.image_size)
                         for img in images])

    def _train_geometry(self, images, u: np.ndarray) -> np.ndarray:
        size = self.image_size
        if self.crop == "random_resized":
            heights = [img.shape[0] for img in images]
            widths = [img.shape[1] for img in images]
            boxes = random_resized_boxes(heights, widths, u[:, RRC])
            return np.stack([resize_box(img, box, size) for img, box in zip(images, boxes)])
        if self.crop == "none":
            return self._eval_geometry(images)
        if self.native is not None:             # pad-crop at native size, then resize
            x = pad_crop(_stack(images), self.pad, self.pad_mode, u[:, CROP_Y], u[:, CROP_X])
            return self._resize_all(x)
        x = np.stack([resize_box(img, centre_box(*img.shape[:2]), size) for img in images])
        return pad_crop(x, self.pad, self.pad_mode, u[:, CROP_Y], u[:, CROP_X])

    # ----------------------------------------------------------------- photometric
    def _rotate(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        angles = (2 * u - 1) * self.rotation
        return np.stack([np.asarray(Image.fromarray(img).rotate(a, Image.BILINEAR))
                         for img, a in zip(x, angles)])

    def _jitter(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Brightness, contrast, saturation factors 1 +- color_jitter, torchvision's formulas."""
        f = np.maximum(1 + (2 * u - 1) * self.color_jitter, 0).astype(np.float32)
        b, c, s = (f[:, i, None, None, None] for i in range(3))
        x = np.clip(x * b, 0, 255)
        mean = _gray(x).mean(axis=(1, 2))[:, None, None, None]
        x = np.clip((x - mean) * c + mean, 0, 255)
        gray = _gray(x)[..., None]
        return np.clip((x - gray) * s + gray, 0, 255)

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        """(x / 255 - mean) / std as float32, computed on [n*H, W*3] rows so numpy's inner
        loop runs over whole rows rather than 3 channels (5x faster at 224 px)."""
        n, height, width, channels = x.shape
        std = np.asarray(self.std, np.float32)
        scale = np.tile(1 / (255 * std), width)
        shift = np.tile(np.asarray(self.mean, np.float32) / std, width)
        out = np.empty(x.shape, np.float32)
        rows = out.reshape(n * height, width * channels)
        np.multiply(x.reshape(n * height, width * channels), scale, out=rows)
        np.subtract(rows, shift, out=rows)
        return out

    # ----------------------------------------------------------------- entry points
    def train(self, images, u: np.ndarray) -> np.ndarray:
        """Random augmentation of uint8 images with uniforms u [n, NUM_UNIFORMS]."""
        x = self._train_geometry(images, u)
        if x is images:                          # never modify the caller's array in place
            x = np.array(x)
        if self.rotation:
            x = self._rotate(x, u[:, ROTATE])
        if self.flip:
            x = hflip(x, u[:, FLIP] < 0.5)
        if self.color_jitter:
            x = self._jitter(x.astype(np.float32), u[:, JITTER])
        return self._normalise(x)

    def eval(self, images) -> np.ndarray:
        """Deterministic resize / centre crop, then normalisation."""
        return self._normalise(self._eval_geometry(images))

    def empty(self, n: int) -> np.ndarray:
        return np.zeros((n, self.image_size, self.image_size, 3), np.float32)


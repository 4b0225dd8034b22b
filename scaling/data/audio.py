"""Waveform data: WAV folders, TFDS speech_commands and the embedded spoken digits.

A data section with `modality='audio'` (`default_audio_data_config()`) selects this module:

    source   'embedded'  spoken_digits: the words "zero" ... "nine" synthesised by espeak-ng in
                         60 voices (500 train / 100 validation clips, 8 kHz; validation voices
                         are not in train); made by tools/make_spoken_digits.py
             'folder'    your WAV files, `path/<class>/*.wav`, split as the image folder source
                         (`train/` + `val/` sub-folders, else the last val_fraction of each class)
             'tfds'      speech_commands (or any TFDS dataset with (audio, label) supervised
                         keys), prepared as array_record
    sample_rate          every waveform is resampled to this rate (Hz)
    clip_samples         T, the model's input length in samples

Each example becomes a window of T + 1 samples: a longer waveform is cropped, a shorter one
padded with silence; in training the window's position (and, with `gain_db`, a gain) is
random, in evaluation the window is centred. Batches hold

    audio        float32 [b, T, 1]  samples 0 .. T-1, mu-law quantised to 256 levels and given
                                    as the companded level in [-1, 1] (`companded`)
    label        int32   [b]        the example's class
    next_sample  int32   [b, T]     the mu-law class of samples 1 .. T: the target of step t
                                    is the sample after it, so a causal model sees x[<= t]
                                    and predicts x[t + 1]

A classifier is scored against `label`, a next-sample model against `next_sample` (see the
model's `label_key`). Order, uniforms and host slicing are `pipeline.Dataset`'s, so a batch is
a pure function of (seed, step) and resuming is exact, as for images.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Sequence

import ml_collections
import numpy as np
from ml_collections import config_dict

from scaling.data.pipeline import Dataset
from scaling.data.sources import FolderSource, SubsetSource
from scaling.data.tfds_source import TfdsSource

MU_LAW_CHANNELS = 256
EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded" / "spoken_digits"
EMBEDDED_NAMES = ("spoken_digits",)
EMBEDDED_RATE = 8000
SOURCES = ("embedded", "folder", "tfds")
_POSITION, _GAIN = 0, 1   # columns of the per-example uniforms this transform reads


# --------------------------------------------------------------------------- mu-law
def mu_law_encode(audio, channels: int = MU_LAW_CHANNELS) -> np.ndarray:
    """Waveform in [-1, 1] (clipped) -> int32 classes 0 .. channels - 1 (mu-law companding,
    mu = channels - 1, rounded to the nearest level)."""
    mu = channels - 1
    x = np.clip(np.asarray(audio, np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.floor((y + 1) / 2 * mu + 0.5).astype(np.int32)


def companded(classes, channels: int = MU_LAW_CHANNELS):
    """Classes (numpy or jax) -> their companded level 2 c / (channels - 1) - 1 in [-1, 1]: the
    model's input, the quantised signal on the scale where mu-law spaces its levels evenly."""
    return classes * (2.0 / (channels - 1)) - 1.0


def mu_law_decode(classes, channels: int = MU_LAW_CHANNELS) -> np.ndarray:
    """Inverse of `mu_law_encode`: classes -> waveform in [-1, 1], float32."""
    mu = channels - 1
    y = companded(np.asarray(classes), channels)
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


# --------------------------------------------------------------------------- config
def default_audio_data_config() -> ml_collections.ConfigDict:
    """Defaults: the embedded spoken digits at 8 kHz, one-second clips."""
    return ml_collections.ConfigDict(dict(
        modality="audio",
        source="embedded",            # 'embedded' | 'folder' | 'tfds'
        name="spoken_digits",         # embedded set, or TFDS name ('speech_commands')
        data_dir=config_dict.placeholder(str),  # TFDS data_dir (None: TFDS default)
        path=config_dict.placeholder(str),      # folder source: path/<class>/*.wav
        download=False,               # tfds: download and prepare when missing
        train_split="train",
        eval_split="validation",
        sample_rate=EMBEDDED_RATE,    # Hz; sources are resampled to it
        clip_samples=EMBEDDED_RATE,   # T: model input length in samples
        gain_db=0.0,                  # train: random gain, uniform in +-gain_db dB
        classes=(),                   # class indices to keep, relabelled 0..n-1; () = all
        examples_per_class=0,         # first n of each class; 0 = all
        val_fraction=0.1,             # folder without split dirs: last fraction of each class
        workers=2,                    # decode threads of the prefetcher
    ))


def is_audio(cfg) -> bool:
    """True for a data section that describes audio (`modality='audio'`)."""
    return cfg.get("modality", "image") == "audio"


AUDIO_FOLDER = "/path/to/audio, a directory laid out as <path>/<class>/*.wav"


def validate_audio_data_config(cfg) -> None:
    """Raises ValueError naming the first bad field of an audio data section."""
    from scaling.data.config import (_fail, _is_int, check_folder_path, check_tfds_name,
                                     validate_subset_fields)

    if cfg.source not in SOURCES:
        _fail("source", cfg.source, f"audio data allows {', '.join(SOURCES)}")
    for field in ("sample_rate", "clip_samples"):
        if not _is_int(cfg[field]) or cfg[field] < 1:
            _fail(field, cfg[field], "must be a positive integer (Hz / samples)")
    if not cfg.gain_db >= 0:
        _fail("gain_db", cfg.gain_db, "must be >= 0 (0 turns it off)")
    validate_subset_fields(cfg)
    if cfg.source == "embedded" and cfg.name not in EMBEDDED_NAMES:
        _fail("name", cfg.name, f"embedded audio is {', '.join(EMBEDDED_NAMES)}; use "
              "data.source='tfds' (speech_commands) or 'folder' for other audio")
    if cfg.source == "folder":
        check_folder_path(cfg.path, AUDIO_FOLDER)
    if cfg.source == "tfds":
        check_tfds_name(cfg.name)


# --------------------------------------------------------------------------- waveforms
def to_float(samples: np.ndarray) -> np.ndarray:
    """PCM samples of any WAV sample type -> float32 mono in [-1, 1] (channels averaged)."""
    x = np.asarray(samples)
    if x.dtype == np.uint8:                       # 8-bit WAV is unsigned, centred on 128
        x = (x.astype(np.float32) - 128) / 128
    elif np.issubdtype(x.dtype, np.integer):      # 24-bit arrives left-justified in int32
        x = x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    x = x.astype(np.float32)
    return x.mean(axis=1) if x.ndim == 2 else x


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`audio` at `rate` Hz -> `target` Hz (polyphase filter, scipy.signal.resample_poly)."""
    if rate == target:
        return audio
    from scipy import signal

    g = math.gcd(int(rate), int(target))
    return signal.resample_poly(audio, target // g, rate // g).astype(np.float32)


def _read_pcm(path: str) -> tuple[int, np.ndarray]:
    from scipy.io import wavfile

    try:
        return wavfile.read(path)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable WAV file ({e})") from e


def read_wav(path: str, sample_rate: int) -> np.ndarray:
    """A WAV file (PCM 8/16/24/32-bit or float, any channel count) as float32 mono samples at
    `sample_rate`."""
    rate, samples = _read_pcm(path)
    return resample(to_float(samples), rate, sample_rate)


class WavFolderSource(FolderSource):
    """A class-per-folder directory of WAV files, `root/<class>/*.wav`, with the splits of the
    image folder source; `get` returns float32 waveforms at `sample_rate`."""
    extensions = (".wav",)

    def __init__(self, root: str, split: str, val_fraction: float = 0.1,
                 sample_rate: int = EMBEDDED_RATE):
        super().__init__(root, split, val_fraction)
        self.sample_rate = sample_rate

    @staticmethod
    def check(path: str) -> None:
        """Raises ValueError when `path` cannot be read as WAV: such files are left out when
        the source opens (see FolderSource), so none stops a run midway."""
        _read_pcm(path)

    def get(self, indices):
        indices = np.asarray(indices, np.int64)
        return [read_wav(self.paths[i], self.sample_rate) for i in indices], self._labels[indices]


class TfdsAudioSource(TfdsSource):
    """A TFDS audio-classification split, e.g. speech_commands (16 kHz int16 clips of 1 s,
    12 classes: ten words, silence, unknown); `get` returns float32 waveforms at `sample_rate`.
    The supervised input key (`image_key`, named for the image source) is the audio feature."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, download: bool = False,
                 sample_rate: int = EMBEDDED_RATE):
        super().__init__(name, split, data_dir, download)
        from scaling.data.tfds_source import import_tfds

        feature = import_tfds().builder(name, data_dir=data_dir).info.features[self.image_key]
        if getattr(feature, "sample_rate", None) is None:
            raise ValueError(f"data.name={name!r}: TFDS feature {self.image_key!r} is "
                             f"{type(feature).__name__}, not audio; give an audio dataset "
                             "(speech_commands) or use an image config")
        self.source_rate, self.sample_rate = int(feature.sample_rate), sample_rate
        self.image_size = None

    def get(self, indices):
        records = self._read(np.asarray(indices, np.int64))
        waves = [resample(to_float(r[self.image_key]), self.source_rate, self.sample_rate)
                 for r in records]
        return waves, np.asarray([r[self.label_key] for r in records], np.int32)


def build_source(cfg, split: str):
    """The audio source of data section `cfg` for `split`, with class filters applied."""
    if cfg.source == "embedded":
        source = WavFolderSource(str(EMBEDDED_DIR), split, 0.0, cfg.sample_rate)
    elif cfg.source == "folder":
        from scaling.data.config import check_folder_path

        source = WavFolderSource(check_folder_path(cfg.path, AUDIO_FOLDER), split,
                                 cfg.val_fraction, cfg.sample_rate)
    else:
        source = TfdsAudioSource(cfg.name, split, cfg.data_dir, cfg.download, cfg.sample_rate)
    if cfg.classes or cfg.examples_per_class:
        source = SubsetSource(source, cfg.classes or (), cfg.examples_per_class)
    return source


# --------------------------------------------------------------------------- batches
@dataclasses.dataclass(frozen=True)
class AudioTransform:
    """Waveforms -> the batch fields of the module docstring (audio, label, next_sample)."""
    clip_samples: int
    gain_db: float = 0.0

    def window(self, wave: np.ndarray, position: float) -> np.ndarray:
        """The clip_samples + 1 samples at `position` in [0, 1]: where the window starts
        within a longer waveform, or where a shorter one sits inside a window of silence."""
        width = self.clip_samples + 1
        out = np.zeros(width, np.float32)
        slack = abs(len(wave) - width)
        offset = min(int(position * (slack + 1)), slack)
        if len(wave) >= width:
            out[:] = wave[offset:offset + width]
        else:
            out[offset:offset + len(wave)] = wave
        return out

    def _fields(self, waves: Sequence[np.ndarray], labels, positions, gains) -> dict:
        windows = np.stack([self.window(w, p) for w, p in zip(waves, positions)])
        classes = mu_law_encode(windows * np.asarray(gains, np.float32)[:, None])
        return {"audio": companded(classes[:, :-1])[..., None].astype(np.float32),
                "label": np.asarray(labels, np.int32), "next_sample": classes[:, 1:]}

    def train(self, waves, labels, u: np.ndarray) -> dict:
        """Random window positions (and gains) from the uniforms u [n, k]."""
        gains = 10 ** ((2 * u[:, _GAIN] - 1) * self.gain_db / 20)
        return self._fields(waves, labels, u[:, _POSITION], gains)

    def eval(self, waves, labels) -> dict:
        """Centred windows, unit gain."""
        n = len(waves)
        return self._fields(waves, labels, np.full(n, 0.5), np.ones(n))

    def empty(self, n: int) -> dict:
        """n rows of zeros: the padding of a last eval batch (masked out)."""
        return {"audio": np.zeros((n, self.clip_samples, 1), np.float32),
                "label": np.zeros(n, np.int32),
                "next_sample": np.zeros((n, self.clip_samples), np.int32)}


def example_spec(cfg) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of one example's batch fields for audio data section `cfg`."""
    t = cfg.clip_samples
    return {"audio": ((t, 1), np.float32), "label": ((), np.int32), "next_sample": ((t,), np.int32)}


class AudioDataset(Dataset):
    """`pipeline.Dataset` (order, uniforms, host rows, prefetch) over waveforms: batches are
    the dicts of `AudioTransform`."""

    def _load(self, indices: np.ndarray, u: np.ndarray | None) -> dict:
        waves, labels = self.source.get(indices)
        return self.transform.train(waves, labels, u) if u is not None else \
            self.transform.eval(waves, labels)

    def _rows(self, indices: np.ndarray, u: np.ndarray | None, pool=None) -> dict:
        if pool is None or len(indices) < 2 * self.workers:
            return self._load(indices, u)
        chunks = np.array_split(np.arange(len(indices)), self.workers)
        parts = list(pool.map(lambda c: self._load(indices[c], None if u is None else u[c]),
                              chunks))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _eval_batch(self, index: int, global_batch: int, rows: slice, pool=None) -> dict:
        per_host = rows.stop - rows.start
        positions = np.arange(index * global_batch + rows.start, index * global_batch + rows.stop)
        real = positions[positions < self.num_examples]
        batch = self.transform.empty(per_host)
        if len(real):
            for key, value in self._rows(real, None, pool).items():
                batch[key][:len(real)] = value
        batch["mask"] = (positions < self.num_examples).astype(np.float32)
        return batch


def build_dataset(cfg, split: str, *, train: bool, seed: int) -> AudioDataset:
    """Validates audio data section `cfg` and returns split `split` (`train`: random windows)."""
    validate_audio_data_config(cfg)
    transform = AudioTransform(cfg.clip_samples, cfg.gain_db)
    return AudioDataset(build_source(cfg, split), transform, split=split, train=train, seed=seed,
                        workers=cfg.workers)

"""Builds the embedded audio dataset `scaling/data/embedded/spoken_digits/`.

The ten English digit words ("zero" ... "nine") spoken by espeak-ng (Debian package
`espeak-ng`, GPL-3.0-or-later; its synthetic voices are formant models, no recordings of
people) in 5 accents x 12 voice variants, each utterance at its own random speed (130-210
words/min) and pitch (25-75). Each (accent, variant) pair is one speaker; the 2 held-out variants
(all their accents) form the validation split, so validation measures generalisation to
unseen voices:

    spoken_digits/train/<word>/<accent>_<variant>.wav        5 x 10 speakers x 10 words = 500
    spoken_digits/validation/<word>/<accent>_<variant>.wav   5 x 2 speakers x 10 words = 100

espeak-ng writes 22,050 Hz; the waveform is resampled to 8 kHz (scipy's polyphase filter),
leading and trailing silence is trimmed (below -40 dB of the peak, with 20 ms kept on each
side), the peak is normalised to 0.8, and it is stored as mono 16-bit PCM WAV (about
4.0 MiB in all). The same command reproduces the files byte for byte with the same espeak-ng
release (1.51 when they were made):

    apt-get install espeak-ng
    python tools/make_spoken_digits.py [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import shutil
import subprocess
import sys
import tempfile
import wave

import numpy as np
from scipy import signal

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "scaling" / "data" / "embedded" / "spoken_digits"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m5", "m7", "f1", "f2", "f4", "klatt2", "croak")
VALIDATION_VARIANTS = ("m4", "f3")
SAMPLE_RATE = 8000
ESPEAK_RATE = 22050
SPEED, PITCH = (130, 210), (25, 75)
SILENCE_DB, MARGIN_S, PEAK = -40.0, 0.02, 0.8


def speak(word: str, voice: str, speed: int, pitch: int, tmp: pathlib.Path) -> np.ndarray:
    """espeak-ng's rendering of `word` as float64 samples in [-1, 1] at 22,050 Hz."""
    path = tmp / "word.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path),
                    word], check=True, capture_output=True)
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (ESPEAK_RATE, 1, 2):
            raise RuntimeError(f"espeak-ng wrote {w.getframerate()} Hz, {w.getnchannels()} "
                               f"channel(s), {8 * w.getsampwidth()}-bit; expected 22050 Hz mono "
                               "16-bit")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0


def condition(audio: np.ndarray) -> np.ndarray:
    """Resample to 8 kHz, trim silence at both ends, normalise the peak; int16 samples."""
    audio = signal.resample_poly(audio, SAMPLE_RATE, ESPEAK_RATE)
    loud = np.flatnonzero(np.abs(audio) > np.abs(audio).max() * 10 ** (SILENCE_DB / 20))
    margin = int(MARGIN_S * SAMPLE_RATE)
    audio = audio[max(loud[0] - margin, 0):loud[-1] + margin + 1]
    audio = audio * (PEAK / np.abs(audio).max())
    return np.round(audio * 32767).astype("<i2")


def write_wav(path: pathlib.Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.tobytes())


def build(out: pathlib.Path, seed: int = 0) -> int:
    """Writes every split; returns the total bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for split, variants in (("train", TRAIN_VARIANTS), ("validation", VALIDATION_VARIANTS)):
            for accent, variant, word in itertools.product(ACCENTS, variants, WORDS):
                speed = int(rng.integers(*SPEED, endpoint=True))
                pitch = int(rng.integers(*PITCH, endpoint=True))
                wave_in = speak(word, f"{accent}+{variant}", speed, pitch, pathlib.Path(tmp))
                samples = condition(wave_in)
                path = out / split / word / f"{accent}_{variant}.wav"
                write_wav(path, samples)
                total += path.stat().st_size
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="speeds and pitches")
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        sys.exit("error: espeak-ng is not installed; run `apt-get install espeak-ng`")
    for split in ("train", "validation"):          # only what this script writes
        shutil.rmtree(args.out / split, ignore_errors=True)
    total = build(args.out, args.seed)
    files = sum(1 for _ in args.out.rglob("*.wav"))
    print(f"wrote {files} files, {total / 2**20:.2f} MiB, to {args.out}")


if __name__ == "__main__":
    main()

"""Sample audio from a trained next-sample WaveNet into a WAV file.

    python -m scaling.generate --workdir runs/wavenet --out sample.wav [--seconds 1]
        [--temperature 1.0] [--seed 0] [--prompt start.wav]

Restores the newest checkpoint of WORKDIR, a run of a WaveNet with `model.task='predict'` on
audio (configs/wavenet.py), with the config it was launched with, draws `seconds` of audio
one sample at a time (`scaling.models.wavenet.sample`: each mu-law class from the softmax of
the model's logits given every sample before it, after one silent sample or the waveform of
`--prompt`), and writes it at the data's sample rate as mono 16-bit PCM WAV. The file is read
back with the `wave` module to check it before the summary line is printed. Bad input prints
one `error: ...` line and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import wave

import numpy as np

from scaling.cli import fail


def check_generative(config) -> None:
    """Only a next-sample model on audio can generate."""
    from scaling.models import model_info

    name = config.model.name
    if model_info(name).modality != "audio" or config.model.get("task") != "predict":
        raise ValueError(f"model.name={name!r} with model.task={config.model.get('task')!r} "
                         "cannot generate audio: train a WaveNet with model.task='predict' "
                         "(python launch.py --config configs/wavenet.py).")


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float waveform in [-1, 1] -> little-endian int16 samples."""
    return np.clip(np.round(np.asarray(audio) * 32767), -32768, 32767).astype("<i2")


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Writes int16 `samples` as a mono 16-bit PCM WAV file."""
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.asarray(samples, "<i2").tobytes())


def check_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Reads `path` back and checks its format and samples against what was written."""
    with wave.open(path, "rb") as w:
        got = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
        frames = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    if got != (1, 2, sample_rate, len(samples)) or not np.array_equal(frames, samples):
        raise OSError(f"{path}: read back (channels, bytes/sample, rate, frames) = {got}, "
                      f"expected (1, 2, {sample_rate}, {len(samples)}) and the same samples")


def generate(config, workdir: str, seconds: float, *, temperature: float = 1.0, seed: int = 0,
             prompt: str | None = None) -> np.ndarray:
    """int16 samples of `seconds` of audio from the newest checkpoint of WORKDIR."""
    import jax

    from scaling.data.audio import mu_law_decode, mu_law_encode, read_wav
    from scaling.models.wavenet import sample
    from scaling.train import prepare, restore

    rate = int(config.data.sample_rate)
    run = prepare(config)
    params = restore(config, workdir, run=run)["params"]
    start = read_wav(prompt, rate) if prompt else np.zeros(1, np.float32)
    classes = sample(run.model, params, mu_law_encode(start)[None], int(round(seconds * rate)),
                     jax.random.key(seed), temperature=temperature)
    return to_pcm16(mu_law_decode(np.asarray(classes)[0]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scaling.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run of configs/wavenet.py (task 'predict')")
    p.add_argument("--out", required=True, help="the WAV file to write")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0, help="0: always the likeliest class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="a WAV file the audio continues")
    args = p.parse_args(argv)
    try:
        if not args.seconds > 0 or not args.temperature >= 0:
            raise ValueError(f"--seconds={args.seconds} must be > 0 and --temperature="
                             f"{args.temperature} >= 0.")
        if args.prompt and not os.path.isfile(args.prompt):
            raise FileNotFoundError(f"--prompt {args.prompt}: no such file.")
        from scaling.train import run_config

        config = run_config(args.workdir)
        check_generative(config)
        samples = generate(config, args.workdir, args.seconds, temperature=args.temperature,
                           seed=args.seed, prompt=args.prompt)
        rate = int(config.data.sample_rate)
        write_wav(args.out, samples, rate)
        check_wav(args.out, samples, rate)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {args.out}: {len(samples) / rate:.3f} s, {len(samples)} samples at {rate} Hz, "
          "mono 16-bit PCM (read back and checked)")


if __name__ == "__main__":
    main()

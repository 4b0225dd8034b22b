"""WaveNet on audio: mu-law, causality, fast sampling, waveform sources, training and generation."""
import os
import wave

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling import data, parallel
from scaling.data import audio
from scaling.models import create_model, model_info
from scaling.models.wavenet import WaveNet, sample
from scaling.train.state import create_state
from scaling.train.step import make_train_step
from tests.helpers import FAST_COMPILE

DIGITS = ("eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero")


def tiny(**kw):
    return WaveNet(**{"channels": 8, "dilation_channels": 8, "skip_channels": 8,
                      "layers_per_stack": 3, "num_stacks": 2, "num_classes": 3, **kw})


def random_params(model, length, seed=0):
    """N(0, 0.3^2) for every parameter (biases too), so no output is trivially zero."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length, 1)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def write_wav(path, samples, rate, width=2):
    """Mono or stereo ([T, 2]) PCM of `width` bytes from float samples in [-1, 1]."""
    samples = np.asarray(samples, np.float64)
    pcm = (np.round(samples * 127) + 128).astype(np.uint8) if width == 1 else \
        np.round(samples * 32767).astype("<i2")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


# ----------------------------------------------------------------------------- mu-law
def test_mu_law_round_trip_and_levels():
    classes = np.arange(256)
    np.testing.assert_array_equal(audio.mu_law_encode(audio.mu_law_decode(classes)), classes)
    x = np.linspace(-1, 1, 2001)
    err = np.abs(audio.mu_law_decode(audio.mu_law_encode(x)) - x)
    assert err.max() < 0.025 and err[np.abs(x) < 0.01].max() < 3e-4   # fine levels near 0
    assert audio.mu_law_encode(np.array([-2.0, 0.0, 2.0])).tolist() == [0, 128, 255]  # clipped
    levels = audio.companded(classes)
    assert levels[0] == -1 and levels[-1] == 1 and np.allclose(np.diff(levels), 2 / 255)


# ----------------------------------------------------------------------------- model
def test_tiny_wavenet_heads_and_causality():
    predict = tiny(task="predict")
    assert predict.label_key == "next_sample" and tiny().label_key == "label"
    x = jax.random.uniform(jax.random.key(1), (2, 48, 1), minval=-1, maxval=1)
    params = random_params(predict, 48)
    y = np.asarray(predict.apply({"params": params}, x))
    assert y.shape == (2, 48, 256)            # mu-law classes, whatever num_classes is
    t = 20                                    # new inputs after t leave outputs <= t unchanged
    x2 = x.at[:, t + 1:].set(jax.random.uniform(jax.random.key(2), (2, 27, 1)))
    y2 = np.asarray(predict.apply({"params": params}, x2))
    np.testing.assert_array_equal(y2[:, :t + 1], y[:, :t + 1])
    assert np.abs(y2[:, t + 1:] - y[:, t + 1:]).max() > 1e-3
    classify = tiny()
    assert classify.apply({"params": random_params(classify, 48)}, x).shape == (2, 3)


def test_sampling_one_step_per_layer_equals_the_full_model():
    """Greedy samples from the incremental sampler are the argmax of the full model's logits
    over the generated sequence at every step, with kernels 2 and 3."""
    for kw in ({}, {"kernel_size": 3, "input_kernel_size": 3}):
        model = tiny(task="predict", **kw)
        params = random_params(model, 64, seed=3)
        prompt = jnp.asarray(audio.mu_law_encode(0.5 * np.sin(np.arange(2 * 5).reshape(2, 5))))
        new = np.asarray(sample(model, params, prompt, 40, jax.random.key(0), temperature=0.0))
        assert new.shape == (2, 40) and new.dtype == np.int32
        seq = np.concatenate([np.asarray(prompt), new], axis=1)
        logits = model.apply({"params": params}, audio.companded(seq[:, :-1])[..., None])
        np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1)[:, 4:], new)
    drawn = [np.asarray(sample(model, params, prompt, 30, jax.random.key(k))) for k in (0, 0, 1)]
    np.testing.assert_array_equal(drawn[0], drawn[1])
    assert not np.array_equal(drawn[0], drawn[2])
    with pytest.raises(ValueError, match="task='predict'"):
        sample(tiny(), params, prompt, 4, jax.random.key(0))


def test_registry_record_is_audio():
    info = model_info("wavenet")
    assert (info.modality, info.input_shape, info.sample_rate) == ("audio", (16000, 1), 16000)
    assert create_model("wavenet", task="predict").label_key == "next_sample"


# ----------------------------------------------------------------------------- data
@pytest.fixture
def wav_folder(tmp_path):
    """Two classes of 16 kHz tones in several WAV formats: 16-bit mono, 8-bit, 16-bit stereo;
    plus a text file and a .wav of random bytes, which the source leaves out."""
    t = np.arange(16000) / 16000
    for c, freq in (("high", 1000.0), ("low", 200.0)):
        for i in range(5):
            tone = 0.5 * np.sin(2 * np.pi * freq * (1 + 0.05 * i) * t[:8000 + 1000 * i])
            write_wav(tmp_path / c / f"{i}.wav", tone, 16000)
        write_wav(tmp_path / c / "8bit.wav", tone, 16000, width=1)
        write_wav(tmp_path / c / "stereo.wav", np.stack([tone, tone], 1), 16000)
    (tmp_path / "low" / "notes.txt").write_text("not audio")
    (tmp_path / "low" / "broken.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    return tmp_path


def folder_config(path, **kw):
    cfg = data.default_audio_data_config()
    cfg.update({"source": "folder", "path": str(path), "clip_samples": 1024, "val_fraction": 0.3,
                **kw})
    return cfg


def test_wav_folder_source_reads_formats_and_resamples(wav_folder):
    train = audio.WavFolderSource(str(wav_folder), "train", 0.3, sample_rate=8000)
    val = audio.WavFolderSource(str(wav_folder), "validation", 0.3, sample_rate=8000)
    assert train.class_names == ("high", "low") and (len(train), len(val)) == (10, 4)
    assert not any(p.endswith("broken.wav") for p in train.paths + val.paths)
    waves, labels = train.get(np.arange(len(train)))
    assert labels.tolist() == [0] * 5 + [1] * 5
    assert [len(w) for w in waves[:5]] == [4000, 4500, 5000, 5500, 6000]   # 16 kHz -> 8 kHz
    assert all(w.dtype == np.float32 for w in waves)
    # 8-bit and stereo files decode to the same tone as 16-bit mono.
    names = [os.path.basename(p) for p in val.paths]
    got = dict(zip(names[:2], val.get([0, 1])[0]))
    np.testing.assert_allclose(got["8bit.wav"], got["stereo.wav"], atol=0.01)
    assert 0.45 < np.abs(got["stereo.wav"]).max() < 0.55


def test_audio_batches_are_pure_functions_of_seed_and_step(wav_folder):
    ds = data.build_dataset(folder_config(wav_folder, gain_db=6.0), "train", train=True, seed=0)
    assert isinstance(ds, audio.AudioDataset) and ds.num_classes == 2
    b = ds.train_batch(3, 4)
    assert b["audio"].shape == (4, 1024, 1) and b["audio"].dtype == np.float32
    assert b["next_sample"].shape == (4, 1024) and b["next_sample"].dtype == np.int32
    assert b["label"].shape == (4,)
    # The target of step t is the input of step t + 1 (the same quantised signal, shifted).
    np.testing.assert_array_equal(audio.companded(b["next_sample"][:, :-1]).astype(np.float32),
                                  b["audio"][:, 1:, 0])
    again = data.build_dataset(folder_config(wav_folder, gain_db=6.0), "train", train=True, seed=0)
    for key in b:
        np.testing.assert_array_equal(b[key], again.train_batch(3, 4)[key])
    assert not np.array_equal(b["audio"], ds.train_batch(4, 4)["audio"])
    with data.prefetch(ds, 2, 5, 4, process_index=1, process_count=2) as it:
        for step, half in it:
            np.testing.assert_array_equal(half["audio"], ds.train_batch(step, 4)["audio"][2:])


def test_audio_eval_batches_are_centred_and_masked(wav_folder):
    ds = data.build_dataset(folder_config(wav_folder, clip_samples=7000), "validation",
                            train=False, seed=0)
    batches = list(ds.eval_batches(3))
    assert [b["mask"].tolist() for b in batches] == [[1, 1, 1], [1, 0, 0]]
    # A 6000-sample tone sits centred in a 7001-sample window of silence: samples 501-6500.
    row = batches[1]["audio"][0, :, 0]
    silence = np.float32(audio.companded(128))
    assert np.all(row[:501] == silence) and np.all(row[6501:] == silence)
    assert np.abs(row[501:6501] - silence).max() > 0.5


def test_embedded_spoken_digits():
    cfg = data.default_audio_data_config()
    train, val = (data.build_source(cfg, s) for s in ("train", "validation"))
    assert (len(train), len(val)) == (500, 100) and train.class_names == DIGITS
    assert np.bincount(train.labels()).tolist() == [50] * 10
    voices = lambda s: {os.path.basename(p) for p in s.paths}  # noqa: E731
    assert not voices(train) & voices(val)     # validation speaks in unseen voices
    waves, _ = val.get(np.arange(100))
    lengths = np.array([len(w) for w in waves]) / 8000
    assert 0.2 < lengths.min() and lengths.max() < 1.0
    assert min(np.sqrt(np.mean(w ** 2)) for w in waves) > 0.05   # speech, not silence
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(audio.EMBEDDED_DIR)
               for f in fs)
    assert size < 5 * 2**20


def test_tfds_speech_commands_with_mock_data():
    from scaling.data.tfds_source import import_tfds

    tfds = import_tfds()
    cfg = data.default_audio_data_config()
    cfg.update(source="tfds", name="speech_commands", data_dir="/nonexistent/tfds", download=True)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.build_dataset(cfg, "train", train=True, seed=0)
        assert (ds.num_examples, ds.num_classes) == (12, 12)
        assert ds.source.source_rate == 16000
        b = ds.train_batch(1, 4)
        assert b["audio"].shape == (4, 8000, 1) and b["label"].max() < 12


def test_unprepared_speech_commands_says_how_to_prepare(tmp_path):
    cfg = data.default_audio_data_config()
    cfg.update(source="tfds", name="speech_commands", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not prepared.*tfds build speech_commands"):
        data.build_source(cfg, "train")


@pytest.mark.parametrize("overrides, message", [
    (dict(source="hdf5"), r"data.source='hdf5'.*embedded, folder, tfds"),
    (dict(name="cifar10"), r"data.name='cifar10'.*spoken_digits"),
    (dict(clip_samples=0), r"data.clip_samples=0"),
    (dict(sample_rate=0), r"data.sample_rate=0"),
    (dict(gain_db=-1.0), r"data.gain_db"),
    (dict(source="folder"), r"data.path is not set.*<class>/\*\.wav"),
    (dict(source="tfds", name="speech_comands"), r"speech_commands"),
])
def test_audio_config_errors_name_the_field(overrides, message):
    cfg = data.default_audio_data_config()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=message):
        data.validate_data_config(cfg)


def test_model_and_data_modality_must_agree():
    from configs import train as train_config
    from configs import wavenet as wavenet_config
    from scaling.train import validate_config

    config = train_config.get_config("test")
    config.model = wavenet_config.get_config("test").model
    with pytest.raises(ValueError, match=r"'wavenet' takes audio input.*configs/wavenet.py"):
        validate_config(config, 8)
    config = wavenet_config.get_config("test")
    config.model = train_config.get_config("test").model
    with pytest.raises(ValueError, match=r"takes image input but the data section describes audio"):
        validate_config(config, 8)


# ----------------------------------------------------------------------------- training
def test_next_sample_train_steps_lower_the_loss():
    """The mu-law loss starts near ln 256 and falls at every one of a few steps on a real batch."""
    cfg = data.default_audio_data_config()
    cfg.update(clip_samples=512)
    batch = data.build_dataset(cfg, "train", train=True, seed=0).train_batch(0, 8)
    model = tiny(task="predict")
    mesh = parallel.make_mesh(8)
    tx = optax.adam(2e-2)
    state = parallel.replicate(create_state(model, tx, jax.random.PRNGKey(0), (512, 1)), mesh)
    step = make_train_step(model, tx, mesh, compiler_options=FAST_COMPILE)
    batch = parallel.to_global(batch, parallel.batch_sharding(mesh))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - np.log(256)) < 0.3, losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """configs/wavenet.py:test trained through the trainer (a few steps)."""
    from configs import wavenet as wavenet_config
    from scaling.train import fit, validate_config

    config = wavenet_config.get_config("test")
    validate_config(config, jax.device_count())
    workdir = str(tmp_path_factory.mktemp("wavenet"))
    return config, workdir, fit(config, workdir)


def test_fit_trains_and_evaluates_next_sample_wavenet(trained_run):
    config, _, result = trained_run
    assert result["status"] == "done" and result["step"] == config.train.num_steps
    assert result["val_examples"] == 40 and 0 <= result["val_top1"] <= 1
    assert np.isfinite(result["val_loss"]) and result["val_loss"] < np.log(256) + 0.5


def test_fit_trains_a_classifying_wavenet_on_the_same_data(tmp_path):
    from configs import wavenet as wavenet_config
    from scaling.train import fit

    config = wavenet_config.get_config("test")
    config.model.task = "classify"
    result = fit(config, str(tmp_path))
    assert result["status"] == "done" and result["val_examples"] == 40
    assert abs(result["train_loss"] - np.log(10)) < 1.0 and 0 <= result["val_top1"] <= 1


def test_generate_writes_a_wav_that_reads_back(trained_run, tmp_path, capsys):
    from scaling import generate

    _, workdir, _ = trained_run
    out = tmp_path / "sample.wav"
    generate.main(["--workdir", workdir, "--out", str(out), "--seconds", "0.05"])
    assert "0.050 s, 400 samples at 8000 Hz" in capsys.readouterr().out
    with wave.open(str(out), "rb") as w:
        got = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
    assert got == (1, 2, 8000, 400)
    with pytest.raises(SystemExit) as e:
        generate.main(["--workdir", str(tmp_path / "none"), "--out", str(out)])
    assert e.value.code == 2 and "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        generate.main(["--workdir", str(tmp_path / "empty"), "--out", str(out)])
    assert e.value.code == 2 and "has no config.json; train into it first" in capsys.readouterr().err

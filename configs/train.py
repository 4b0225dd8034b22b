"""Train one model.

    python launch.py --config configs/train.py --workdir runs/wrn
    python launch.py --config configs/train.py:cifar10 --config.model.widen_factor=10

Presets:
  default   WRN-16-2-style net on the CIFAR-10 subset embedded in the package; CPU size
            (4-8 minutes on 2 CPU cores, val top-1 above 0.6); evaluated every epoch,
            which adds ~4 % (one eval of the 2,000 images costs ~3.7 train steps).
  cifar10   WRN-28-10 on TFDS cifar10 with the WRN paper's recipe (SGD Nesterov 0.9, lr 0.1,
            wd 5e-4, batch 128, 200 epochs, lr x0.2 at epochs 60/120/160, dropout 0.3).
  imagenet  ResNet-50 on TFDS imagenet2012 (90 epochs, batch 1024, lr 0.4, 5 warmup epochs,
            cosine, label smoothing 0.1, 224px random-resized crops).
  test      a tiny net for a few steps (smoke tests).
data.mean / data.std / data.crop_fraction are unset (None) in every preset: they are the
model's (its registry record), e.g. CIFAR-10 statistics for WRN, ImageNet's for ResNet-50.
`--config.model.name=X` switches any preset to model X (its defaults; X's resolution unless
data.image_size is given).
"""
import ml_collections

from scaling.data import default_data_config
from scaling.parallel import default_mesh_config, default_sharding_config
from scaling.train import default_train_config

PRESETS = ("default", "cifar10", "imagenet", "test")


def base_config() -> ml_collections.ConfigDict:
    """Everything a single training run reads; other configs start from this."""
    c = ml_collections.ConfigDict()
    c.experiment = "train"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="wide_resnet", depth=16, widen_factor=1, convs_per_block=2, dropout=0.0, norm="batch"))
    c.data = default_data_config()
    c.train = default_train_config()
    c.mesh = default_mesh_config()          # data=-1, fsdp=1: data parallelism on every device
    c.sharding = default_sharding_config()  # how parameters and optimizer state are split
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    if preset == "default":
        c.train.update(batch_size=128, num_epochs=10.0, lr=0.1, weight_decay=5e-4,
                       schedule="cosine", warmup_epochs=0.5, log_every_steps=20,
                       checkpoint_every_steps=100, eval_every_epochs=1.0)
    elif preset == "cifar10":
        c.model.update(depth=28, widen_factor=10, dropout=0.3)
        c.data.update(source="tfds", name="cifar10", train_split="train", eval_split="test",
                      image_size=32)
        c.train.update(batch_size=128, num_epochs=200.0, lr=0.1, momentum=0.9, nesterov=True,
                       weight_decay=5e-4, schedule="step", decay_epochs=(60, 120, 160),
                       decay_factor=0.2, eval_every_epochs=5.0, log_every_steps=100,
                       checkpoint_every_steps=1000)
    elif preset == "imagenet":
        c.model = ml_collections.ConfigDict(dict(name="resnet50"))
        c.data.update(source="tfds", name="imagenet2012", train_split="train",
                      eval_split="validation", image_size=224, crop="random_resized", workers=16)
        c.train.update(batch_size=1024, eval_batch_size=1024, num_epochs=90.0, lr=0.4,
                       weight_decay=1e-4, nesterov=False, schedule="cosine", warmup_epochs=5.0,
                       label_smoothing=0.1, compute_dtype="bfloat16", eval_every_epochs=5.0,
                       log_every_steps=100, checkpoint_every_steps=1000)
    elif preset == "test":
        c.model.update(depth=10, widen_factor=1, convs_per_block=1)
        c.data.update(image_size=16, examples_per_class=16)
        c.train.update(batch_size=16, eval_batch_size=64, num_steps=6, num_epochs=0.0,
                       log_every_steps=2, checkpoint_every_steps=4, progress_bar=False)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use one of {', '.join(PRESETS)}.")
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return apply_preset(base_config(), arg or "default")

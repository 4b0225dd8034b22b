"""Transfer learning: pretrained weights on a new task in linear-probe and fine-tune modes,
against training from scratch with the same budget (experiments/transfer.py).

    python launch.py --config configs/transfer.py --workdir runs/transfer        # offline, CPU
    python launch.py --config configs/transfer.py:tfds --config.init.path=resnet18.safetensors \
        --config.init.source=torchvision --config.data.name=oxford_flowers102
    python launch.py --config configs/transfer.py:folder --config.init.path=resnet18.pth \
        --config.data.path=/data/my_images          # <path>/<class>/*.jpg

Presets:
  default  the claim of our notes, measured on 2 CPU cores in under 15 minutes: a WRN-16-1
           pretrained on 5 CIFAR-10 classes (0-4, the embedded subset) transfers to the other 5
           classes (5-9) with 50 examples per class. Stage 1 trains it (pretrain/), exports it
           as a torch-layout .safetensors; stage 2 runs scratch / linear_probe / finetune with
           the same number of steps. Writes transfer.txt (the table) and learning curves.
  tfds     a torchvision/timm checkpoint (`init.path`, required) on a TFDS dataset at 224 px
           with the model's normalisation (its registry record: ImageNet's for resnet18);
           model.name must match the checkpoint (resnet18 here).
  folder   the same on an image folder (`data.path`, `init.path` required).
  test     tiny sizes for the smoke test.
Per-mode learning rates: `transfer.lr.<mode>` (0 keeps train.lr). `init.*` is the shared
part of every trial's init section (source, new_head, and the head/backbone lr multipliers
of the finetune modes); the experiment sets init.mode per trial and clears init.path for
scratch.
"""
import ml_collections

from configs import train
from experiments.grid import default_grid_config
from experiments.sweep import default_sweep_config
from scaling.train.finetune import default_init_config

PRESETS = ("default", "tfds", "folder", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = train.get_config("default")
    c.experiment = "transfer"
    c.grid = default_grid_config()
    c.sweep = default_sweep_config()  # transfer.py sets the axes (modes); seeds here
    c.sweep.seeds = 3 if preset == "default" else 1
    c.init = default_init_config()
    c.init.update(source="auto", new_head=True)
    c.transfer = ml_collections.ConfigDict(dict(
        modes=("scratch", "linear_probe", "finetune"),
        lr=ml_collections.ConfigDict(dict(scratch=0.0, linear_probe=0.0, finetune=0.0,
                                          finetune_bn=0.0)),
        # Stage 1 (optional): train the source model here, then transfer it.
        pretrain=ml_collections.ConfigDict(dict(
            enabled=False, classes=(0, 1, 2, 3, 4), examples_per_class=0, num_epochs=10.0,
            lr=0.1, batch_size=128, eval_every_epochs=0.0)),
    ))
    if preset in ("default", "test"):
        c.model.update(name="wide_resnet", depth=16, widen_factor=1, convs_per_block=2)
        c.data.update(classes=(5, 6, 7, 8, 9), examples_per_class=50)
        c.transfer.pretrain.update(enabled=True, num_epochs=12.0, lr=0.1, batch_size=128,
                                   eval_every_epochs=4.0)
        c.transfer.lr.update(scratch=0.05, linear_probe=0.1, finetune=0.01, finetune_bn=0.01)
        c.init.update(source="torchvision", head_lr_mult=10.0)
        c.train.update(batch_size=50, eval_batch_size=500, num_epochs=40.0, optimizer="sgd",
                       momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                       warmup_epochs=0.0, eval_every_epochs=4.0, log_every_steps=5,
                       checkpoint_every_steps=100, progress_bar=False)
        if preset == "test":
            c.model.update(depth=10, convs_per_block=1)
            c.data.update(image_size=16, examples_per_class=8, classes=(2, 3))
            c.transfer.pretrain.update(classes=(0, 1), examples_per_class=16, num_epochs=2.0,
                                       batch_size=16, eval_every_epochs=0.0)
            c.train.update(batch_size=16, eval_batch_size=64, num_epochs=4.0, eval_every_epochs=2.0,
                           log_every_steps=1, checkpoint_every_steps=4)
    elif preset in ("tfds", "folder"):
        c.model = ml_collections.ConfigDict(dict(name="resnet18"))
        c.init.update(source="torchvision", head_lr_mult=10.0)
        c.transfer.lr.update(scratch=0.1, linear_probe=0.1, finetune=0.01, finetune_bn=0.01)
        c.data.update(image_size=224, crop="random_resized", workers=8)  # mean/std: the model's
        if preset == "tfds":
            c.data.update(source="tfds", name="oxford_flowers102", train_split="train",
                          eval_split="validation")
        else:
            c.data.update(source="folder")
        c.train.update(batch_size=64, eval_batch_size=256, num_epochs=30.0, weight_decay=1e-4,
                       schedule="cosine", warmup_epochs=1.0, eval_every_epochs=2.0,
                       log_every_steps=20, checkpoint_every_steps=200)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use one of {', '.join(PRESETS)}.")
    return c

"""Input-pipeline throughput: train images/s at 224 px random-resized crop (+ flip, normalise),
for each loader (data.loader 'threads', the hand-written thread pipeline, and 'grain', worker
processes) and each data.workers count, from a JPEG folder and from the same images as a TFDS
dataset (array_record). The pipeline runs alone (no train step competes for the cores).

    python benchmarks/input_pipeline.py                          # a JPEG folder built under /tmp
    python benchmarks/input_pipeline.py --folder ~/flowers --workers 1 2 4 --steps 12
    python benchmarks/input_pipeline.py --sources folder --loaders grain --workers 2

Without --folder, ~500 JPEGs of about 400x350 px in 10 class folders are written once to
/tmp/scaling_bench_jpegs: the CIFAR-10 JPEGs of ../shared/data upscaled, with noise and a
gradient so they do not compress like flat upscales (or synthetic textures when that archive is
absent). The TFDS case prepares those files as a small TFDS dataset in array_record format,
offline, under /tmp/scaling_bench_tfds. Each row: images/s over --steps batches after the first
max(workers, 1) (which pay for starting the workers; the first one's wait is the `first batch s`
column), the median of --repeats runs taken in turn so that load from other processes falls on
every loader alike. Figures are printed, never asserted.
"""
import argparse
import io
import os
import statistics
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10-train-jpeg.tar.gz")
FOLDER = "/tmp/scaling_bench_jpegs"
TFDS_DIR = "/tmp/scaling_bench_tfds"
TFDS_NAME = "scaling_bench_jpegs"


def _cifar_images(per_class: int):
    """{class: [32x32 uint8 images]} from the CIFAR-10 JPEG archive, or None without it."""
    path = CIFAR if os.path.exists(CIFAR) else "/tmp/shared/data/cifar10-train-jpeg.tar.gz"
    if not os.path.exists(path):
        return None
    out: dict[str, list] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or not parts[-1].endswith(".jpg"):
                continue
            images = out.setdefault(parts[-2], [])
            if len(images) < per_class:
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read()))
                                         .convert("RGB")))
            if len(out) == 10 and all(len(v) >= per_class for v in out.values()):
                break
    return out


def make_folder(root: str, per_class: int = 50, size=(400, 350)) -> str:
    """Writes 10 x per_class JPEGs of about `size` (width, height) to root/<class>/ once."""
    if os.path.isdir(root) and sum(len(f) for _, _, f in os.walk(root)) >= 10 * per_class:
        return root
    rng = np.random.default_rng(0)
    cifar = _cifar_images(per_class)
    classes = sorted(cifar) if cifar else [f"class{i}" for i in range(10)]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            w, h = size[0] + int(rng.integers(-40, 41)), size[1] + int(rng.integers(-40, 41))
            if cifar:
                base = np.asarray(Image.fromarray(cifar[name][i]).resize((w, h), Image.BICUBIC),
                                  np.float32)
            else:
                yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
                f = rng.uniform(2, 12, 3)
                base = 127 + 100 * np.stack([np.sin(f[k] * (xx + k * yy) * np.pi) for k in range(3)], -1)
            grad = np.linspace(-20, 20, w, dtype=np.float32)[None, :, None]
            noise = rng.normal(0, 8, (h, w, 3)).astype(np.float32)
            img = np.clip(base + grad + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, name, f"{i:04d}.jpg"), quality=90)
    return root


def prepare_tfds(folder: str, data_dir: str):
    """The folder's files as a TFDS dataset `TFDS_NAME` (array_record, JPEG bytes as stored).
    Defining the builder class registers the name, so `data.name` finds it in this process."""
    from scaling.data.tfds_source import import_tfds

    tfds = import_tfds()

    class ScalingBenchJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        name = TFDS_NAME

        def _info(self):
            classes = sorted(os.listdir(folder))
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=classes)}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for c in sorted(os.listdir(folder)):
                for f in sorted(os.listdir(os.path.join(folder, c))):
                    yield f"{c}/{f}", {"image": os.path.join(folder, c, f), "label": c}

    builder = ScalingBenchJpegs(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    return builder


def data_config(source: str, folder: str, loader: str, workers: int):
    from scaling.data import default_data_config

    cfg = default_data_config()
    cfg.update(source=source, path=folder, image_size=224, crop="random_resized", flip=True,
               val_fraction=0.0, loader=loader, workers=workers, mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225), crop_fraction=0.875)
    if source == "tfds":
        cfg.update(name=TFDS_NAME, data_dir=TFDS_DIR)
    return cfg


def measure(source: str, folder: str, loader: str, workers: int, batch: int, steps: int):
    from scaling.data import pipeline

    cfg = data_config(source, folder, loader, workers)
    ds = pipeline.build_dataset(cfg, "train", train=True, seed=0)
    warm = max(workers, 1)   # grain: every worker has started once these have arrived
    t0 = time.perf_counter()
    with pipeline.prefetch(ds, 0, None, batch) as it:   # endless: the end is not timed
        step, b = next(it)
        first = time.perf_counter() - t0
        assert b["image"].shape == (batch, 224, 224, 3), b["image"].shape
        for _ in range(warm - 1):
            next(it)
        t1 = time.perf_counter()
        for _ in range(steps):
            next(it)
        rate = steps * batch / (time.perf_counter() - t1)
    return rate, first


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", help="a JPEG folder <path>/<class>/*.jpg (default: build one)")
    p.add_argument("--sources", nargs="+", default=["folder", "tfds"], choices=["folder", "tfds"])
    p.add_argument("--loaders", nargs="+", default=["threads", "grain"], choices=["threads", "grain"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed batches after the first")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each case, taken in turn (loaders alternate), median shown")
    args = p.parse_args()
    folder = os.path.expanduser(args.folder) if args.folder else make_folder(FOLDER)
    n = sum(len(f) for _, _, f in os.walk(folder))
    if "tfds" in args.sources:
        prepare_tfds(folder, TFDS_DIR)  # defines (registers) the builder in this process
    print(f"{n} JPEGs in {folder}; batch {args.batch}, 224 px random-resized crop + flip; "
          f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}")
    print(f"{'source':8s} {'loader':8s} {'workers':>7s} {'images/s':>9s} {'(min-max)':>13s} "
          f"{'first batch s':>14s}")
    for source in args.sources:
        for workers in args.workers:
            runs = {loader: [] for loader in args.loaders}
            for _ in range(args.repeats):
                for loader in args.loaders:
                    runs[loader].append(measure(source, folder, loader, workers, args.batch,
                                                args.steps))
            for loader, results in runs.items():
                rates = sorted(r for r, _ in results)
                first = statistics.median(f for _, f in results)
                print(f"{source:8s} {loader:8s} {workers:7d} {statistics.median(rates):9.1f} "
                      f"{f'({rates[0]:.0f}-{rates[-1]:.0f})':>13s} {first:14.2f}", flush=True)


if __name__ == "__main__":
    main()

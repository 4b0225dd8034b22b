"""Deterministic batches from a `Source`: order, augmentation, host slicing, prefetch.

Global train batch `step` holds positions [step * B, (step + 1) * B) of the concatenation
of per-epoch permutations (`np.random.default_rng([seed, epoch])`), so batches may span an
epoch boundary and every epoch visits each example exactly once. Augmentation uniforms are
drawn for the whole global batch from (seed, step), and host p of P keeps rows
[p B / P, (p + 1) B / P). A batch is therefore a pure function of (seed, step): resuming at
any step, or running on any number of hosts, reproduces the single-host run exactly.

Two loaders run that function ahead of the consumer (`data.loader`):
- 'threads': a background thread, splitting each batch over `data.workers` threads;
- 'grain': a grain `MapDataset` over step numbers mapped to `train_batch`, decoded in
  `data.workers` worker processes (0: one background thread in this process), each building
  whole batches (worker i takes steps i, i + workers, ...) handed back through shared memory.
Both call the same `train_batch`, so their batches are bitwise equal for any worker count, and
where a run stops and resumes is only the step (see `loader_position`).
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import os
import queue
import threading
from typing import Callable, Iterator

import numpy as np

from scaling.data import augment
from scaling.data.config import LOADERS, validate_data_config
from scaling.data.sources import FolderSource, Source, SubsetSource, embedded_source

_AUGMENT_STREAM = 0x61756720  # separates augmentation draws from the epoch permutations


def _host_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                         f"process count {process_count}")
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class Dataset:
    """One split of a source with its transform; see the module docstring for the order."""

    def __init__(self, source: Source, transform: augment.Transform, *, split: str, train: bool,
                 seed: int, workers: int = 0, loader: str = "threads"):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        if len(source) == 0:
            raise ValueError(f"split {split!r} has no examples")
        if loader not in ("grain", "threads"):
            raise ValueError(f"loader={loader!r} must be 'grain' or 'threads' (resolve 'auto' "
                             "with pipeline.resolve_loader)")
        self.source, self.transform = source, transform
        self.split, self.train, self.seed, self.workers = split, train, int(seed), workers
        self.loader = loader
        self.num_examples = len(source)
        self.num_classes = source.num_classes
        self.class_names = tuple(source.class_names)
        self.image_size = getattr(transform, "image_size", None)   # None: not images
        self._permutation = functools.lru_cache(maxsize=4)(self._make_permutation)

    def __repr__(self) -> str:
        return (f"Dataset(split={self.split!r}, num_examples={self.num_examples}, "
                f"num_classes={self.num_classes}, image_size={self.image_size}, train={self.train})")

    # Sent to grain's worker processes by pickling: the permutation cache is rebuilt there.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_permutation"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._permutation = functools.lru_cache(maxsize=4)(self._make_permutation)

    def __len__(self) -> int:
        return self.num_examples

    def steps_per_epoch(self, global_batch: int) -> int:
        """Steps to visit every example at least once: ceil(num_examples / global_batch)."""
        return math.ceil(self.num_examples / global_batch)

    # ----------------------------------------------------------------- order
    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def indices(self, step: int, global_batch: int) -> np.ndarray:
        """Example indices of global train batch `step`, int64 [global_batch]."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        start, stop = step * global_batch, (step + 1) * global_batch
        n = self.num_examples
        parts = [self._permutation(epoch)[max(start - epoch * n, 0):stop - epoch * n]
                 for epoch in range(start // n, (stop - 1) // n + 1)]
        return np.concatenate(parts)

    def augment_uniforms(self, step: int, global_batch: int) -> np.ndarray:
        """Uniforms [global_batch, NUM_UNIFORMS] driving augmentation of batch `step`."""
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step])
        return rng.random((global_batch, augment.NUM_UNIFORMS))

    # ----------------------------------------------------------------- batches
    def _load(self, indices: np.ndarray, u: np.ndarray | None):
        images, labels = self.source.get(indices)
        x = self.transform.train(images, u) if u is not None else self.transform.eval(images)
        return x, np.asarray(labels, np.int32)

    def _rows(self, indices: np.ndarray, u: np.ndarray | None, pool=None) -> dict:
        """Decodes and transforms `indices`, in `pool` chunks when given."""
        if pool is None or len(indices) < 2 * self.workers:
            image, label = self._load(indices, u)
        else:
            chunks = np.array_split(np.arange(len(indices)), self.workers)
            parts = list(pool.map(
                lambda c: self._load(indices[c], None if u is None else u[c]), chunks))
            image = np.concatenate([p[0] for p in parts])
            label = np.concatenate([p[1] for p in parts])
        return dict(image=image, label=label)

    def train_batch(self, step: int, global_batch: int, process_index: int = 0,
                    process_count: int = 1, *, pool=None) -> dict:
        """This host's rows of global batch `step`: image float32 [b,H,W,3], label int32 [b]."""
        rows = _host_rows(global_batch, process_index, process_count)
        indices = self.indices(step, global_batch)[rows]
        u = self.augment_uniforms(step, global_batch)[rows] if self.train else None
        return self._rows(indices, u, pool)

    def _eval_batch(self, index: int, global_batch: int, rows: slice, pool=None) -> dict:
        """This host's rows of eval batch `index`, padded and masked (see `eval_batches`)."""
        per_host = rows.stop - rows.start
        positions = np.arange(index * global_batch + rows.start, index * global_batch + rows.stop)
        indices = positions[positions < self.num_examples]
        batch = dict(image=self.transform.empty(per_host), label=np.zeros(per_host, np.int32),
                     mask=(positions < self.num_examples).astype(np.float32))
        if len(indices):
            rows_out = self._rows(indices, None, pool)
            batch["image"][:len(indices)] = rows_out["image"]
            batch["label"][:len(indices)] = rows_out["label"]
        return batch

    def _eval_iter(self, global_batch: int, rows: slice, pool=None) -> Iterator[dict]:
        for index in range(self.steps_per_epoch(global_batch)):
            yield self._eval_batch(index, global_batch, rows, pool)

    def eval_batches(self, global_batch: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
        """The whole split in order, ceil(N / B) global batches padded to B rows; this host's
        rows of each, with mask 1 for real examples and 0 for padding (image 0, label 0).
        Decoding runs ahead of the consumer on the dataset's loader (`workers` threads or
        grain processes)."""
        rows = _host_rows(global_batch, process_index, process_count)
        if self.loader == "grain":
            return GrainLoader(_EvalRows(self, global_batch, rows), 0,
                               self.steps_per_epoch(global_batch), self.workers, depth=2)
        return Prefetcher(lambda pool: self._eval_iter(global_batch, rows, pool),
                          depth=2, workers=self.workers)


def build_source(data_cfg, split: str) -> Source:
    """The configured source for `split`, with class / examples-per-class filters applied."""
    from scaling.data import audio

    if audio.is_audio(data_cfg):
        return audio.build_source(data_cfg, split)
    if data_cfg.source == "embedded":
        source = embedded_source(split)
    elif data_cfg.source == "folder":
        source = FolderSource(data_cfg.path, split, data_cfg.val_fraction)
    else:
        from scaling.data.tfds_source import TfdsSource

        source = TfdsSource(data_cfg.name, split, data_cfg.data_dir, data_cfg.download)
    if data_cfg.classes or data_cfg.examples_per_class:
        source = SubsetSource(source, data_cfg.classes or (), data_cfg.examples_per_class)
    return source


def build_dataset(data_cfg, split: str, *, train: bool, seed: int) -> Dataset:
    """Validates `data_cfg` and returns split `split`; `train` turns on augmentation."""
    from scaling.data import audio

    if audio.is_audio(data_cfg):
        return audio.build_dataset(data_cfg, split, train=train, seed=seed)
    validate_data_config(data_cfg)
    source = build_source(data_cfg, split)
    transform = augment.Transform.from_config(data_cfg, native=source.image_size)
    return Dataset(source, transform, split=split, train=train, seed=seed,
                   workers=data_cfg.workers, loader=resolve_loader(data_cfg, source))


def resolve_loader(data_cfg, source: Source | None = None) -> str:
    """'grain' or 'threads': `data.loader`, with 'auto' resolved to the loader measured faster
    for this kind of source (benchmarks/input_pipeline.py; see the README's data section)."""
    loader = data_cfg.get("loader", "threads")
    if loader not in LOADERS:
        raise ValueError(f"data.loader={loader!r} is invalid: allowed values are "
                         f"{', '.join(LOADERS)}")
    if loader != "auto":
        return loader
    return AUTO_LOADER.get(data_cfg.source, "threads")


# data.loader='auto' per data.source: what benchmarks/input_pipeline.py measured faster on the
# 2-core machines here (README, data section). Grain was slower on a JPEG folder at 1, 2 and 4
# workers (e.g. 228 vs 280 images/s at 2) and not faster beyond run-to-run noise on TFDS, and
# its workers take seconds to start; the in-memory embedded set was not worth processes.
AUTO_LOADER = {"embedded": "threads", "folder": "threads", "tfds": "threads"}


def example_spec(data_cfg) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape (without the batch dimension) and dtype of each field of a batch: image and label,
    or for audio data audio, label and next_sample (`scaling.data.audio`)."""
    from scaling.data import audio

    if audio.is_audio(data_cfg):
        return audio.example_spec(data_cfg)
    size = data_cfg.image_size
    return {"image": ((size, size, 3), np.float32), "label": ((), np.int32)}


# --------------------------------------------------------------------------- prefetch
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce(make_iter: Callable, pool, q: queue.Queue, stop: threading.Event) -> None:
    # A plain function, not a method: the thread holds no reference to the Prefetcher, so an
    # abandoned Prefetcher is collected and its __del__ stops the thread.
    try:
        for item in make_iter(pool):
            if not _put(q, stop, item):
                return
        _put(q, stop, _END)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer)
        _put(q, stop, _Failure(e))


class Prefetcher:
    """Runs `make_iter(pool)` in a background thread, `depth` items ahead, with a pool of
    `workers` threads (none when workers <= 1) for the producer to split work over.
    Iterate it; `close()` (or leaving a `with` block) stops the thread. An exception in the
    producer is re-raised by the consumer's next `next()`."""

    def __init__(self, make_iter: Callable, depth: int = 2, workers: int = 0):
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="data")
                      if workers > 1 else None)
        self._thread = threading.Thread(target=_produce, daemon=True, name="data-prefetch",
                                        args=(make_iter, self._pool, self._queue, self._stop))
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stops the producer and its pool; safe to call more than once."""
        self._done = True
        self._stop.set()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        stop, pool = getattr(self, "_stop", None), getattr(self, "_pool", None)
        if stop is not None:
            stop.set()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def prefetch(dataset: Dataset, start_step: int, stop_step: int | None, global_batch: int,
             process_index: int = 0, process_count: int = 1, depth: int = 2):
    """Yields (step, host-local train batch) for steps [start_step, stop_step) (None: forever),
    decoded ahead of the consumer on the dataset's loader: `depth` batches by a background
    thread and `data.workers` threads ('threads'), or `depth` batches per worker process
    ('grain'). Iterate it; `close()` (or leaving a `with` block) stops it."""
    _host_rows(global_batch, process_index, process_count)
    if dataset.loader == "grain":
        return GrainLoader(_TrainRows(dataset, global_batch, process_index, process_count),
                           start_step, stop_step, dataset.workers, depth=depth)

    def batches(pool):
        step = start_step
        while stop_step is None or step < stop_step:
            yield step, dataset.train_batch(step, global_batch, process_index, process_count,
                                            pool=pool)
            step += 1

    return Prefetcher(batches, depth=depth, workers=dataset.workers)


def loader_position(dataset: Dataset, next_step: int, global_batch: int) -> dict:
    """Where the train loader resumes, as saved beside each checkpoint: the next step, and
    what makes that step's batch (seed, global batch, split size). The batch is a pure function
    of these, so this is the whole iterator state for either loader and any worker count;
    grain's own iterator state is not stored, because it records per-worker positions and
    would tie a resume to one `data.workers`."""
    return {"next_step": int(next_step), "seed": dataset.seed, "global_batch": int(global_batch),
            "num_examples": dataset.num_examples}


# --------------------------------------------------------------------------- grain
class _TrainRows:
    """step -> (step, this host's rows of global train batch `step`): the function grain maps
    over step numbers (pickled into each worker process)."""

    def __init__(self, dataset: Dataset, global_batch: int, process_index: int, process_count: int):
        self.dataset, self.global_batch = dataset, global_batch
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, step: int):
        step = int(step)
        return step, self.dataset.train_batch(step, self.global_batch, self.process_index,
                                              self.process_count)


class _EvalRows:
    """index -> this host's rows of eval batch `index` (padded and masked)."""

    def __init__(self, dataset: Dataset, global_batch: int, rows: slice):
        self.dataset, self.global_batch, self.rows = dataset, global_batch, rows

    def __call__(self, index: int) -> dict:
        return self.dataset._eval_batch(int(index), self.global_batch, self.rows)


_FOREVER = 2 ** 62  # stop step of an endless train loader


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs first in each grain worker process: the worker exits as soon as the process that
    started it is gone (a trainer killed with SIGKILL never stops its workers itself)."""
    del worker_index, worker_count
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _import_grain():
    """grain, with absl's flags marked parsed (their defaults) when no absl app parsed them:
    grain 0.2.18 reads one of its flags unguarded when it starts worker processes, which
    fails in a plain script or under pytest."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


class GrainLoader:
    """Maps `fn` over range(start, stop) (None: forever) with grain, in `workers` processes
    (worker i computes elements i, i + workers, ...; they come back in order through shared
    memory), or with `workers=0` in one background thread of this process; `depth` elements
    ahead per process. Iterate it; `close()` (or leaving a `with` block) stops the workers.
    An exception in `fn` is re-raised by the consumer's next `next()`."""

    def __init__(self, fn: Callable, start: int, stop: int | None, workers: int, depth: int = 2):
        grain = _import_grain()
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        ds = grain.MapDataset.range(start, _FOREVER if stop is None else max(stop, start)).map(fn)
        if workers > 0:
            # Each worker computes its elements one at a time; its queue holds `depth` ahead.
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=depth),
                worker_init_fn=_exit_with_parent)
        else:
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=depth))
        self._iter = iter(ds)
        self._left = None if stop is None else max(stop - start, 0)
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        # The end is counted here: asking grain for it waits ~4 s for every worker to report.
        if self._done or self._left == 0:
            self.close()
            raise StopIteration
        try:
            item = next(self._iter)
        except BaseException:
            self.close()
            raise
        if self._left is not None:
            self._left -= 1
        return item

    def get_state(self) -> dict:
        """grain's iterator state (per-worker positions; see `loader_position` for what is
        checkpointed)."""
        return self._iter.get_state()

    def close(self) -> None:
        """Stops the worker processes; safe to call more than once."""
        self._done = True
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not getattr(self, "_done", True):
            self.close()

"""Input pipeline: deterministic, host-sharded image-classification batches as numpy dicts.

    cfg = default_data_config()                      # embedded CIFAR-10 subset, offline
    train = build_dataset(cfg, cfg.train_split, train=True, seed=0)
    for step, batch in prefetch(train, start, stop, global_batch, jax.process_index(),
                                jax.process_count()):
        ...                                          # batch['image'] f32 [b,H,W,3], ['label'] i32 [b]
    for batch in build_dataset(cfg, cfg.eval_split, train=False, seed=0).eval_batches(256):
        ...                                          # plus batch['mask'] f32 [b], 0 on padding

Sources (`data.source`): 'embedded' (10,000 / 2,000 CIFAR-10 JPEGs in the package),
'tfds' (any TFDS image-classification dataset prepared as array_record), 'folder'
(root/<class>/*.jpg). A data section with `modality='audio'` describes waveforms instead
(`scaling.data.audio`: WAV folders, TFDS speech_commands, embedded spoken digits; batches of
'audio', 'label' and 'next_sample'). Batch `step` is a pure function of (seed, step), for any
number of hosts, and for either loader (`data.loader`: 'threads' or 'grain' worker processes)
and any `data.workers`; turning host-local batches into global jax arrays is
`scaling.parallel`'s job.
"""
from scaling.data.audio import default_audio_data_config
from scaling.data.augment import Transform
from scaling.data.config import default_data_config, validate_data_config
from scaling.data.pipeline import (Dataset, GrainLoader, Prefetcher, build_dataset, build_source,
                                   example_spec, loader_position, prefetch, resolve_loader)
from scaling.data.sources import (ArraySource, FolderSource, Source, SubsetSource, decode_image,
                                  embedded_source)

__all__ = [
    "ArraySource", "Dataset", "FolderSource", "GrainLoader", "Prefetcher", "Source",
    "SubsetSource", "Transform", "build_dataset", "build_source", "decode_image",
    "default_audio_data_config", "default_data_config", "embedded_source", "example_spec",
    "loader_position", "prefetch", "resolve_loader", "validate_data_config",
]

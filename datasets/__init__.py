"""cqlsac.datasets: Minari datasets by name, as TorchRL offline replay; writing them atomically."""

from cqlsac.datasets.offline import (
    DatasetInfo,
    check_spaces,
    dataset_fingerprint,
    default_cache_dir,
    discounted_returns,
    load_offline_replay,
    load_transitions,
    normalized_score,
)
from cqlsac.datasets.store import DatasetError, datasets_root, is_local, list_local_datasets, open_dataset
from cqlsac.datasets.writer import (
    Episode,
    check_reference_scores,
    check_writable,
    transitions_to_episodes,
    write_dataset,
)

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "Episode",
    "check_reference_scores",
    "check_spaces",
    "check_writable",
    "dataset_fingerprint",
    "datasets_root",
    "default_cache_dir",
    "discounted_returns",
    "is_local",
    "list_local_datasets",
    "load_offline_replay",
    "load_transitions",
    "normalized_score",
    "open_dataset",
    "transitions_to_episodes",
    "write_dataset",
]

"""cqlsac.datasets: Minari datasets by name, as TorchRL offline replay; creating and writing them.

Names are imported on first use (PEP 562), so `import cqlsac.datasets.presets` or a config load
does not pay for torch, torchrl and minari.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "offline": ("DatasetInfo", "check_dataset_fits", "check_spaces", "dataset_content_digest", "dataset_files_digest",
                "default_cache_dir", "files_digest", "load_offline_replay", "load_transitions", "normalized",
                "normalized_score", "reference_scores_of"),
    "store": ("DatasetError", "datasets_root", "is_local", "list_local_datasets", "open_dataset"),
    "writer": ("Episode", "check_reference_scores", "check_writable", "transitions_to_episodes", "write_dataset"),
    "creation": ("BehaviourPolicy", "DatasetCreationError", "create_dataset", "write_replay_dataset"),
    "presets": ("PRESETS",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cqlsac.datasets' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cqlsac.datasets.{_MODULE_OF[name]}"), name)

"""The local Minari store: where datasets live, how ids are checked, and the errors users see.

Minari's own functions are called through the `minari` module (not imported names) so that its
root (`MINARI_DATASETS_PATH`, or `~/.minari/datasets`) is read at call time and tests can replace
the network call of `minari.download_dataset`.
"""

from __future__ import annotations

from pathlib import Path

import minari
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage.datasets_root_dir import get_dataset_path

from cqlsac.components.errors import UserError

# What minari and h5py raise for a damaged file or metadata (they use all of these).
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, AssertionError)


class DatasetError(UserError):
    """A dataset mistake the user can fix; the message names the problem and the fix."""


def datasets_root() -> Path:
    """The Minari root in use now (created if missing, as Minari does)."""
    return get_dataset_path()


def validate_dataset_id(dataset_id: str) -> None:
    """Reject ids Minari cannot store, before any work is done."""
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise DatasetError(f"malformed dataset id {dataset_id!r}: ids look like 'namespace/name-v0' (namespace "
                           "optional, of two characters or more; letters, digits, -, _ and /; version required)") from None


def list_local_datasets() -> dict[str, dict]:
    """Ids and raw metadata of the datasets in the local store, as `minari list local` sees them."""
    return minari.list_local_datasets()


def is_local(dataset_id: str) -> bool:
    """Whether the local Minari store holds `dataset_id`."""
    validate_dataset_id(dataset_id)
    return (get_dataset_path(dataset_id) / "data").is_dir()


def unknown_dataset_error(dataset_id: str) -> DatasetError:
    local = ", ".join(list_local_datasets()) or "none"
    return DatasetError(
        f"dataset {dataset_id!r} is not in the local Minari store {datasets_root()} (local datasets: {local}); "
        f"create it with `cqlsac datasets create {dataset_id} --env ENV --policy CHECKPOINT|random --steps N` "
        f"or download it with download=True / `minari download {dataset_id}`")


def corrupted_dataset_error(dataset_id: str, path: Path, exc: BaseException) -> DatasetError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DatasetError(f"dataset {dataset_id!r} at {path} is corrupted or truncated ({reason}); "
                        f"delete it (`minari delete {dataset_id}`) and create or download it again")


def open_dataset(dataset_id: str, download: bool = False) -> minari.MinariDataset:
    """The local dataset `dataset_id`, downloaded first if asked to and missing."""
    if not is_local(dataset_id):
        if not download:
            raise unknown_dataset_error(dataset_id)
        try:
            minari.download_dataset(dataset_id)
        except Exception as exc:  # network, remote or version errors: all end the same way for the user
            raise DatasetError(f"could not download dataset {dataset_id!r} ({type(exc).__name__}: {exc}); "
                               "check the id with `minari list remote` and the network, "
                               "or create it locally with `cqlsac datasets create`") from None
        if not is_local(dataset_id):
            raise unknown_dataset_error(dataset_id)
    data_path = get_dataset_path(dataset_id) / "data"
    try:
        dataset = minari.MinariDataset(data_path)
    except READ_ERRORS as exc:
        raise corrupted_dataset_error(dataset_id, data_path, exc) from None
    if dataset.id != dataset_id:
        raise DatasetError(f"the dataset stored under {dataset_id!r} says its id is {dataset.id!r}; "
                           f"move it to {dataset.id!r} or re-create it")
    return dataset

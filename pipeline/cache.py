"""The stage cache: a folder per stage and cache key, locked while a run computes it, finished once
its `outputs.json` exists.

A stage's key is derived from the config fields it declares it reads (`reads`), and the stage is
handed a `ConfigView` that refuses every other field: a stage cannot read a setting that its key
does not cover, so changed settings never silently reuse old outputs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cqlsac.components.checkpoints import atomic_json
from cqlsac.pipeline.config import ConfigError, to_plain
from cqlsac.pipeline.supervision import STATE_SUFFIX, stop_if_requested

OUTPUTS = "outputs.json"  # written last by a stage that finished: its presence marks the stage done
# Fields that change how a run is watched or where it writes, never what a stage computes.
UNKEYED = ("checkpoints", "q_value_bound", "logger", "output_dir", "cache_dir", "stages", "report")


class UndeclaredConfigRead(AttributeError):
    """A stage read a config field that its cache key does not cover: add it to the stage's `reads`."""


def covers(reads: tuple[str, ...], path: str) -> bool:
    """Whether reading `path` is within the dotted paths `reads` (a section covers its fields)."""
    return any(path == r or path.startswith(r + ".") for r in reads)


class ConfigView:
    """Read-only access to the fields of a config that a stage declared (`reads`) and the `UNKEYED` ones.

    A declared section is returned as it is; a section that holds declared fields is returned as a
    view of its own; any other field raises `UndeclaredConfigRead`.
    """

    def __init__(self, config: Any, reads: tuple[str, ...], stage: str, prefix: str = ""):
        object.__setattr__(self, "_view", (config, tuple(reads) + UNKEYED, stage, prefix))

    def __getattr__(self, name: str) -> Any:
        config, reads, stage, prefix = object.__getattribute__(self, "_view")
        path = prefix + name
        value = getattr(config, name)
        if covers(reads, path):
            return value
        if any(r.startswith(path + ".") for r in reads) and dataclasses.is_dataclass(value):
            return ConfigView(value, reads, stage, path + ".")
        raise UndeclaredConfigRead(f"stage {stage!r} reads {path}, which its cache key does not cover; "
                                   f"add it to the stage's reads")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")


def read_values(config: Any, reads: tuple[str, ...]) -> dict[str, Any]:
    """The values at the dotted paths `reads`, as plain data: what a cache key is made of."""
    values = {}
    for path in sorted(reads):
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        values[path] = to_plain(value)
    return values


def ensure_writable(folder: Path, key: str, fix: str | None = None) -> None:
    """Create `folder` and write a probe file in it, so an unusable `key` fails before any training.
    The error names `fix`, by default setting `key` to another folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {folder} ({exc.strerror or exc}); "
                          f"{fix or f'set {key}=DIR to a writable folder'}") from None


def unused_name(folder: Path) -> Path:
    """`folder`, or the first of `folder-2`, `folder-3`, ... that does not exist: the name of a new
    run or sweep, which one started earlier in the same second with the same config already took."""
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate


def claim_new_folder(name: Path) -> Path:
    """Make the folder of a new run or sweep under `output_dir`: `unused_name(name)` when it is made,
    not when it was chosen. Returns the folder made, which no other run or sweep writes."""
    ensure_writable(name.parent, "output_dir")
    while True:
        folder = unused_name(name)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another took it between the two calls
            continue


def ensure_output_writable(folder: Path, resumed: bool, what: str) -> None:
    """The folder a run or sweep (`what`) writes: a new one's is under `output_dir`; a resumed one
    writes into its own, which `--resume` names and no override moves."""
    if resumed:
        ensure_writable(folder, "--resume", f"a resumed {what} writes into its own folder: make it writable")
    else:
        ensure_writable(folder, "output_dir")


@contextmanager
def stage_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold the lock of one stage folder: two runs that need the same stage do not write it at once;
    the second waits, then reuses what the first wrote. The OS drops the lock if the holder dies.

    The lock file is opened read-only, so a user who may only read a shared cache can still lock
    it (or, where the file cannot be made, reuse finished stages unlocked). A stop signal ends the wait.
    """
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except PermissionError:
        yield
        return
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"[{name}] waiting for another run that is computing {folder}")
                    announced = True
                stop_if_requested()
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def finished_outputs(folder: Path) -> dict | None:
    """What the stage in `folder` wrote when it finished; None if it has not."""
    done = folder / OUTPUTS
    if not done.is_file():
        return None
    try:
        return json.loads(done.read_text())
    except ValueError:  # written atomically: damaged outside cqlsac
        raise ConfigError(f"{done} is damaged (not JSON): remove {folder} to compute that stage again") from None


def finish(folder: Path, outputs: dict) -> None:
    """Mark the stage in `folder` finished with `outputs`; its in-stage checkpoints are no longer needed."""
    atomic_json(folder / OUTPUTS, outputs)
    for state in folder.glob(f"*{STATE_SUFFIX}"):
        state.unlink()


def remove_if_unused(folder: Path) -> None:
    """Remove a stage folder that a failed run made and left with nothing but its lock file."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
        (folder / ".lock").unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:  # another run put something there meanwhile
            pass

"""Offline replay from a local Minari dataset, through a memory-mapped cache.

The first load reads the dataset episode by episode straight into memory-mapped tensors (so it
never sits in RAM twice), in TorchRL's transition layout plus the discounted Monte-Carlo
return-to-go that Cal-QL needs. Later loads map the cache. The cache key holds the dataset id, a
digest of its files (names, sizes, mtimes) and gamma, so it is rebuilt when the source changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec
from minari.dataset.minari_storage import MinariStorage
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, RandomSampler, ReplayBuffer, TensorStorage
from torchrl.envs import EnvBase
from tqdm import tqdm

from cqlsac.components.replay import discounted_returns
from cqlsac.datasets.store import READ_ERRORS, DatasetError, corrupted_dataset_error, open_dataset

CACHE_FORMAT = 2  # bump when the cached layout changes (2: a manifest of file sizes)
STATS_FILE = "cqlsac_stats.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about a dataset without reading its transitions."""

    dataset_id: str
    observation_space: gym.spaces.Box
    action_space: gym.spaces.Box | gym.spaces.Discrete
    env_spec: EnvSpec | None
    num_episodes: int
    num_transitions: int
    mean_return: float
    ref_min_score: float | None
    ref_max_score: float | None
    path: Path
    metadata: dict[str, Any]  # Minari's raw metadata, including the "cqlsac" block of datasets made here

    @property
    def env_id(self) -> str | None:
        return None if self.env_spec is None else self.env_spec.id


def default_cache_dir() -> Path:
    return Path(os.environ.get("CQLSAC_CACHE") or Path.home() / ".cache" / "cqlsac")


def files_digest(data_path: Path) -> str:
    """A digest of the names, sizes and mtimes of the files under `data_path`."""
    entries = sorted((str(p.relative_to(data_path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in data_path.rglob("*") if p.is_file())
    return hashlib.sha256(repr(entries).encode()).hexdigest()


def dataset_files_digest(dataset_id: str) -> str:
    """Changes whenever the local dataset's files do: the same id re-created is other data."""
    return files_digest(Path(open_dataset(dataset_id).spec.data_path))


def dataset_content_digest(dataset_id: str) -> str:
    """A sha256 of what the dataset holds, its data files' bytes and its reference scores, not of
    where or when they were written: the same id re-created on another machine, whose float rounding
    trains another behaviour policy, digests differently, the same files copied over do not."""
    dataset = open_dataset(dataset_id)
    data_path, digest = Path(dataset.spec.data_path), hashlib.sha256()
    for path in sorted(p for p in data_path.rglob("*") if p.is_file() and p.name != "metadata.json"):
        digest.update(str(path.relative_to(data_path)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    metadata = dataset.storage.metadata
    digest.update(json.dumps([metadata.get("ref_min_score"), metadata.get("ref_max_score")]).encode())
    return digest.hexdigest()


def _spaces(dataset: minari.MinariDataset) -> tuple[gym.spaces.Box, gym.spaces.Box | gym.spaces.Discrete]:
    """The dataset's observation space (a Box) and action space (a Box or Discrete)."""
    obs_space, act_space = dataset.observation_space, dataset.action_space
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise DatasetError(f"dataset {dataset.id!r} has {type(obs_space).__name__} observations and "
                           f"{type(act_space).__name__} actions; CQL-SAC needs Box observations and Box or "
                           "Discrete actions")
    return obs_space, act_space


def _action_dtype(space: gym.Space) -> tuple[torch.dtype, np.dtype]:
    """Discrete actions are integers, continuous ones float32."""
    return (torch.int64, np.int64) if isinstance(space, gym.spaces.Discrete) else (torch.float32, np.float32)


def _episodes(dataset: minari.MinariDataset) -> Iterator[minari.EpisodeData]:
    """Minari's episodes, with read failures of a damaged file turned into a `DatasetError`."""
    episodes = dataset.iterate_episodes()
    while True:
        try:
            episode = next(episodes)
        except StopIteration:
            return
        except READ_ERRORS as exc:
            raise corrupted_dataset_error(dataset.id, Path(dataset.spec.data_path), exc) from None
        yield episode


def _empty_layout(n: int, obs_shape: tuple[int, ...], act_space: gym.Space) -> TensorDict:
    """The transition layout on the meta device: shapes and dtypes only, no memory."""
    def empty(*shape, dtype=torch.float32):
        return torch.empty(n, *shape, dtype=dtype, device="meta")

    return TensorDict({
        "observation": empty(*obs_shape), "action": empty(*act_space.shape, dtype=_action_dtype(act_space)[0]),
        "episode": empty(dtype=torch.int64), "mc_return": empty(1),
        "next": {"observation": empty(*obs_shape), "reward": empty(1), "terminated": empty(1, dtype=torch.bool),
                 "truncated": empty(1, dtype=torch.bool), "done": empty(1, dtype=torch.bool)},
    }, batch_size=[n])


def _build_cache(dataset: minari.MinariDataset, gamma: float, final: Path) -> None:
    """Write the transitions of `dataset` to `final`, atomically (built in a hidden folder, then renamed)."""
    obs_space, act_space = _spaces(dataset)
    n = dataset.total_steps
    data_path = Path(dataset.spec.data_path)
    if n == 0:
        raise DatasetError(f"dataset {dataset.id!r} has no transitions; re-create it with some steps")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        out = _empty_layout(n, obs_space.shape, act_space).memmap_like(prefix=tmp)
        start, returns = 0, []
        for episode in tqdm(_episodes(dataset), total=dataset.total_episodes, desc=f"caching {dataset.id}",
                            unit="episode", disable=None):
            t = len(episode.rewards)
            obs = np.asarray(episode.observations, dtype=np.float32)
            if obs.shape != (t + 1, *obs_space.shape) or start + t > n:
                raise corrupted_dataset_error(dataset.id, data_path, ValueError(
                    f"episode {episode.id} has {len(obs)} observations for {t} steps"))
            terminated = torch.as_tensor(np.asarray(episode.terminations, dtype=bool)).unsqueeze(-1)
            truncated = torch.as_tensor(np.asarray(episode.truncations, dtype=bool)).unsqueeze(-1)
            out[start:start + t] = TensorDict({
                "observation": torch.as_tensor(obs[:-1]),
                "action": torch.as_tensor(np.asarray(episode.actions, dtype=_action_dtype(act_space)[1])),
                "episode": torch.full((t,), int(episode.id), dtype=torch.int64),
                "mc_return": torch.as_tensor(discounted_returns(episode.rewards, gamma),
                                             dtype=torch.float32).unsqueeze(-1),
                "next": {"observation": torch.as_tensor(obs[1:]),
                         "reward": torch.as_tensor(np.asarray(episode.rewards, dtype=np.float32)).unsqueeze(-1),
                         "terminated": terminated, "truncated": truncated, "done": terminated | truncated},
            }, batch_size=[t])
            start += t
            returns.append(math.fsum(episode.rewards.tolist()))
        if start != n:
            raise corrupted_dataset_error(dataset.id, data_path, ValueError(
                f"metadata says {n} steps, episodes hold {start}"))
        (tmp / STATS_FILE).write_text(json.dumps({"mean_return": math.fsum(returns) / len(returns),
                                                  "num_episodes": len(returns), "file_sizes": _file_sizes(tmp)}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process built the same cache meanwhile: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in final.parent.iterdir():  # one cache per dataset: older contents or another gamma
        if stale != final and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATS_FILE}


def _intact_stats(folder: Path) -> dict | None:
    """The stats of a cache folder that holds every file it was built with, at its size; else None.

    The cache is derived data, so a damaged one (a truncated memmap reads as zeros, silently) is
    rebuilt from the dataset rather than reported.
    """
    try:
        stats = json.loads((folder / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stats if stats.get("file_sizes") == _file_sizes(folder) else None


def load_transitions(dataset_id: str, gamma: float = 0.99, download: bool = False,
                     cache_dir: str | os.PathLike | None = None) -> tuple[TensorDict, DatasetInfo]:
    """All transitions of a local Minari dataset as a memory-mapped TensorDict, and its `DatasetInfo`.

    Keys: `observation`, `action`, `("next", k)` for observation, reward [N, 1], terminated,
    truncated, done [N, 1] (bool), `mc_return` [N, 1] (discounted return-to-go with `gamma`),
    `episode` [N] (Minari's episode id). Observations, rewards and continuous actions are float32;
    discrete actions are int64 `[N]`.
    """
    dataset = open_dataset(dataset_id, download=download)
    obs_space, act_space = _spaces(dataset)
    data_path = Path(dataset.spec.data_path)
    key = hashlib.sha256(f"{CACHE_FORMAT}|{files_digest(data_path)}|{float(gamma)!r}".encode()).hexdigest()[:20]
    final = Path(cache_dir or default_cache_dir()) / "offline" / dataset_id / key
    stats = _intact_stats(final)
    if stats is None:
        shutil.rmtree(final, ignore_errors=True)
        _build_cache(dataset, gamma, final)
        stats = json.loads((final / STATS_FILE).read_text())
    transitions = TensorDict.load_memmap(final)
    metadata = MinariStorage.read_raw_metadata(data_path)
    info = DatasetInfo(
        dataset_id=dataset_id, observation_space=obs_space, action_space=act_space, env_spec=dataset.env_spec,
        num_episodes=stats["num_episodes"], num_transitions=transitions.shape[0], mean_return=stats["mean_return"],
        ref_min_score=metadata.get("ref_min_score"), ref_max_score=metadata.get("ref_max_score"),
        path=data_path.parent, metadata=metadata)
    return transitions, info


def load_offline_replay(dataset_id: str, batch_size: int | None, gamma: float = 0.99, download: bool = False,
                        cache_dir: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu") -> tuple[ReplayBuffer, DatasetInfo]:
    """A uniform-sampling TorchRL replay buffer over a dataset's transitions (see `load_transitions`).

    The storage stays memory-mapped on the host; sampled batches are moved to `device`.
    """
    transitions, info = load_transitions(dataset_id, gamma=gamma, download=download, cache_dir=cache_dir)
    device = torch.device(device)
    transform = None if device.type == "cpu" else (lambda batch: batch.to(device))
    replay = ReplayBuffer(storage=TensorStorage(transitions), sampler=RandomSampler(), batch_size=batch_size,
                          transform=transform)
    return replay, info


def _describe(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Discrete):
        return f"Discrete({space.n})"
    def fmt(values):
        return np.array2string(np.asarray(values).ravel(), precision=3, threshold=8, max_line_width=10**6)
    return f"shape {tuple(space.shape)}, low {fmt(space.low)}, high {fmt(space.high)}"


def _space_of(spec, batch_dims: int) -> gym.Space:
    """The gymnasium space of one env's TorchRL spec (the first env of a batch)."""
    if isinstance(spec, Categorical):
        return gym.spaces.Discrete(int(spec.space.n))
    shape = tuple(spec.shape[batch_dims:])
    if isinstance(spec, Bounded):
        low, high = (bound[(0,) * batch_dims].float().numpy() for bound in (spec.space.low, spec.space.high))
    else:
        low, high = np.full(shape, -np.inf, np.float32), np.full(shape, np.inf, np.float32)
    return gym.spaces.Box(low, high, shape, np.float32)


def _same_space(dataset_space: gym.Space, env_space: gym.Space) -> bool:
    if isinstance(dataset_space, gym.spaces.Discrete) or isinstance(env_space, gym.spaces.Discrete):
        return (isinstance(dataset_space, gym.spaces.Discrete) and isinstance(env_space, gym.spaces.Discrete)
                and dataset_space.n == env_space.n)
    return dataset_space.shape == env_space.shape and all(
        torch.equal(torch.as_tensor(ref, dtype=torch.float32), torch.as_tensor(got, dtype=torch.float32))
        for ref, got in ((dataset_space.low, env_space.low), (dataset_space.high, env_space.high)))


def check_spaces(info: DatasetInfo, env: EnvBase) -> None:
    """Raise `DatasetError` unless the dataset's observation and action spaces match the env's specs."""
    _check_fit(info.dataset_id, info.observation_space, info.action_space, info.env_id, env)


def check_dataset_fits(dataset_id: str, env: EnvBase) -> None:
    """`check_spaces` from the dataset's metadata, and one episode read to find a truncated file, before
    anything is written."""
    dataset = open_dataset(dataset_id)
    _check_fit(dataset_id, *_spaces(dataset), None if dataset.env_spec is None else dataset.env_spec.id, env)
    try:  # reading an episode opens the data file, which fails here if it is truncated
        if dataset.total_episodes:
            next(iter(dataset.storage.get_episodes([dataset.total_episodes - 1])))
    except READ_ERRORS as exc:
        raise corrupted_dataset_error(dataset_id, Path(dataset.spec.data_path), exc) from None


def _check_fit(dataset_id: str, observation_space: gym.Space, action_space: gym.Space, env_id: str | None,
               env: EnvBase) -> None:
    batch_dims = len(env.batch_size)
    for name, space, spec in (("observation", observation_space, env.observation_spec["observation"]),
                              ("action", action_space, env.action_spec)):
        env_space = _space_of(spec, batch_dims)
        if not _same_space(space, env_space):
            raise DatasetError(
                f"dataset {dataset_id!r} does not fit the env: its {name} space is {_describe(space)} but the "
                f"env's is {_describe(env_space)}; use the env the dataset was recorded on ({env_id}) or a "
                "dataset of this env")


def normalized(raw_return: float, ref_min_score: float, ref_max_score: float) -> float:
    """D4RL-style score: 0 = the random policy's return, 100 = the expert's."""
    return 100.0 * (raw_return - ref_min_score) / (ref_max_score - ref_min_score)


def normalized_score(raw_return, info: DatasetInfo):
    """`normalized` with the dataset's reference scores; a dataset without them is a `DatasetError`."""
    if info.ref_min_score is None or info.ref_max_score is None:
        raise DatasetError(f"dataset {info.dataset_id!r} has no reference scores; re-create it with an expert "
                           "(--expert CHECKPOINT or --ref-max-score VALUE) to normalise returns")
    return normalized(raw_return, info.ref_min_score, info.ref_max_score)


def reference_scores_of(dataset_id: str) -> dict:
    """A local dataset's normalisation bounds and where its expert score came from, from its metadata alone."""
    metadata = MinariStorage.read_raw_metadata(Path(open_dataset(dataset_id).spec.data_path))
    extra = metadata.get("cqlsac") or {}
    origin = extra.get("ref_max_score_from") or ("unknown" if metadata.get("ref_max_score") is not None else None)
    return {"ref_min_score": metadata.get("ref_min_score"), "ref_max_score": metadata.get("ref_max_score"),
            "ref_max_score_from": origin, "ref_score_episodes": extra.get("ref_score_episodes")}

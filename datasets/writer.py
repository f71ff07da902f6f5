"""Writing Minari datasets atomically, and turning TorchRL transitions into Minari episodes.

Minari writes straight under the final id, so an interrupted write would leave a half dataset
that `minari list local` shows. Here the dataset is written by `minari.create_dataset_from_buffers`
(which needs no jax) into a hidden folder of the same Minari root, then renamed into place.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage.datasets_root_dir import get_dataset_path
from tensordict import TensorDictBase

from cqlsac.datasets.store import DatasetError, datasets_root, validate_dataset_id

TMP_PREFIX = ".cqlsac-tmp-"  # hidden: Minari's listing skips dot folders


@dataclass(frozen=True)
class Episode:
    """One episode in Minari's layout: T+1 observations (the last one after the final step), T of the rest."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray

    def __len__(self) -> int:
        return len(self.rewards)


def transitions_to_episodes(transitions: TensorDictBase) -> list[Episode]:
    """Split transitions in TorchRL's layout, in time order, into episodes.

    An episode ends at a terminated or truncated step, where `("collector", "traj_ids")` changes,
    or where a step's next observation is not the following step's observation (e.g. the wrap point
    of a circular replay buffer). An episode cut without either flag (the end of collection, a
    discontinuity) is marked truncated: its last next-observation is still valid to bootstrap from.
    Leading batch dims (one row per env of a batched collector) are split row by row; in a flat
    buffer that interleaves several envs, the rows of each trajectory id are taken together first.
    """
    if transitions.ndim > 1:
        rows = transitions.reshape(-1, transitions.shape[-1]).unbind(0)
        return [episode for row in rows for episode in transitions_to_episodes(row)]
    n = transitions.shape[0]
    if n == 0:
        return []
    traj_ids = transitions.get(("collector", "traj_ids"), None)
    if traj_ids is not None:  # a replay buffer of several envs: each trajectory's steps together, in time order
        order = torch.as_tensor(np.argsort(traj_ids.reshape(n).cpu().numpy(), kind="stable"))
        transitions = transitions[order]
    obs = transitions["observation"].cpu().numpy()
    next_obs = transitions["next", "observation"].cpu().numpy()
    actions = transitions["action"].cpu().numpy()
    rewards = transitions["next", "reward"].reshape(n).cpu().numpy()
    terminated = transitions["next", "terminated"].reshape(n).cpu().numpy()
    truncated = transitions.get(("next", "truncated"), None)
    truncated = np.zeros(n, bool) if truncated is None else truncated.reshape(n).cpu().numpy().copy()
    flagged = terminated | truncated
    cut = np.zeros(n, bool)
    cut[-1] = True
    cut[:-1] = (next_obs[:-1] != obs[1:]).reshape(n - 1, -1).any(axis=1)
    traj_ids = transitions.get(("collector", "traj_ids"), None)
    if traj_ids is not None:
        traj_ids = traj_ids.reshape(n).cpu().numpy()
        cut[:-1] |= traj_ids[1:] != traj_ids[:-1]
    truncated |= cut & ~flagged
    ends = np.flatnonzero(flagged | cut) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return [Episode(observations=np.concatenate([obs[s:e], next_obs[e - 1:e]]), actions=actions[s:e],
                    rewards=rewards[s:e], terminations=terminated[s:e], truncations=truncated[s:e])
            for s, e in zip(starts, ends)]


@contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    """Point Minari at another root for a while (Minari reads `MINARI_DATASETS_PATH` on every call)."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def _episode_buffer(episode: Episode, observation_space: gym.spaces.Box, action_space: gym.Space) -> EpisodeBuffer:
    """Minari's episode record, with arrays cast to the dtypes the spaces declare."""
    t = len(episode)
    shapes = {"observations": ((t + 1, *observation_space.shape), episode.observations.shape),
              "actions": ((t, *action_space.shape), episode.actions.shape),
              "terminations": ((t,), episode.terminations.shape), "truncations": ((t,), episode.truncations.shape)}
    for name, (expected, got) in shapes.items():
        if tuple(got) != expected:
            raise DatasetError(f"episode {name} have shape {tuple(got)}, expected {expected} for {t} steps "
                               "and the env's spaces; build episodes with transitions_to_episodes")
    return EpisodeBuffer(observations=episode.observations.astype(observation_space.dtype),
                         actions=episode.actions.astype(action_space.dtype),
                         rewards=episode.rewards.astype(np.float64),
                         terminations=episode.terminations.astype(bool),
                         truncations=episode.truncations.astype(bool), infos={})


def check_writable(dataset_id: str, overwrite: bool = False) -> Path:
    """The folder `dataset_id` will be written to; raises if the id is malformed or taken (unless `overwrite`).

    Callers that collect data first check this before collecting, not after.
    """
    validate_dataset_id(dataset_id)
    final = get_dataset_path(dataset_id)
    if final.exists() and not overwrite:
        raise DatasetError(f"dataset {dataset_id!r} already exists at {final}; pass overwrite=True (--overwrite) "
                           "to replace it, or choose another id or version")
    return final


def check_reference_scores(ref_min_score: float | None, ref_max_score: float | None) -> None:
    """Both or neither (Minari would estimate a missing ref_min_score with 100 random episodes), in order."""
    if (ref_min_score is None) != (ref_max_score is None):
        raise DatasetError("give both reference scores or neither")
    if ref_min_score is not None and not (math.isfinite(ref_min_score) and math.isfinite(ref_max_score)):
        raise DatasetError(f"reference scores must be finite numbers, got ref_min_score {ref_min_score} and "
                           f"ref_max_score {ref_max_score}")
    if ref_min_score is not None and not ref_max_score > ref_min_score:
        raise DatasetError(f"ref_max_score ({ref_max_score}) must exceed ref_min_score ({ref_min_score}), the random "
                           "policy's return, for normalised scores to mean anything; pass a better expert or score")


def write_dataset(dataset_id: str, episodes: Sequence[Episode], env: str | EnvSpec, *, algorithm_name: str,
                  description: str, ref_min_score: float | None = None, ref_max_score: float | None = None,
                  num_episodes_average_score: int = 100, author: str = "cqlsac",
                  extra_metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `episodes` as the Minari dataset `dataset_id`; returns its folder.

    `env` (an id or a spec with its kwargs) is stored as the dataset's env spec and gives the
    spaces. Reference scores go where Minari keeps them (`ref_min_score`/`ref_max_score`), both or
    neither, with the number of episodes they were averaged over. `extra_metadata` is stored under
    the metadata key "cqlsac". Nothing appears under the id unless the whole write succeeds; an
    existing id is replaced only with `overwrite=True`.
    """
    final = check_writable(dataset_id, overwrite)
    if not episodes:
        raise DatasetError(f"no episodes to write for {dataset_id!r}; collect at least one step")
    check_reference_scores(ref_min_score, ref_max_score)
    spec = gym.spec(env) if isinstance(env, str) else env
    probe = gym.make(spec)
    if not isinstance(probe.observation_space, gym.spaces.Box) or not isinstance(
            probe.action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise DatasetError(f"{spec.id} has {type(probe.observation_space).__name__} observations and "
                           f"{type(probe.action_space).__name__} actions; CQL-SAC datasets need Box observations "
                           "and Box or Discrete actions")
    buffers = [_episode_buffer(e, probe.observation_space, probe.action_space) for e in episodes]
    probe.close()
    tmp_root = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=datasets_root()))
    try:
        with _minari_root(tmp_root), warnings.catch_warnings():
            # Minari warns for every optional field left empty (email, permalink, eval env).
            warnings.filterwarnings("ignore", message=r".*is set to None", category=UserWarning)
            dataset = minari.create_dataset_from_buffers(
                dataset_id, buffers, env=spec, algorithm_name=algorithm_name, author=author,
                description=description, ref_min_score=ref_min_score, ref_max_score=ref_max_score,
                num_episodes_average_score=num_episodes_average_score)
            if extra_metadata:
                dataset.storage.update_metadata({"cqlsac": extra_metadata})
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if not overwrite:  # another writer put it there while this one collected
                raise DatasetError(f"dataset {dataset_id!r} appeared at {final} while this one was written; "
                                   "nothing was replaced: choose another id")
            os.rename(final, tmp_root / ".replaced")  # ids never start with a dot
        os.rename(tmp_root / dataset_id, final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)
    return final

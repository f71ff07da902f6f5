"""Online data for the training loops: SAC's own buffer, and offline/online mixing (docs/loss.md, "Offline-to-online").

Both kinds answer the loop's three questions: `add(frames)` (store what the collector delivered,
`[T]` steps of one env or `[num_envs, T]`), `ready(frames_collected)` (may the updates start?) and
`sample(progress)` (the next batch, for training progress in [0, 1]). Each holds its growing
online buffer as `buffer` and its unfinished episodes as `pending` (per env), which is what a
checkpoint saves.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer


def make_online_buffer(capacity: int) -> ReplayBuffer:
    """A uniform replay buffer for the transitions collected online."""
    return ReplayBuffer(storage=LazyTensorStorage(capacity))


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1} within one episode, G = 0 after its last step (no bootstrap at truncation)."""
    out = np.empty(len(rewards), np.float64)
    g = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = float(rewards[t]) + gamma * g
        out[t] = g
    return out


class OnlineReplay:
    """SAC's data: every collected frame in one buffer; updates wait for `warmup_frames` frames."""

    def __init__(self, capacity: int, batch_size: int, warmup_frames: int = 0):
        self.buffer = make_online_buffer(capacity)
        self.batch_size, self.warmup_frames = batch_size, warmup_frames
        self.pending: dict[int, list[TensorDictBase]] = {}  # steps are stored as they come, never held back

    def add(self, frames: TensorDictBase) -> None:
        self.buffer.extend(frames.reshape(-1))

    def ready(self, frames_collected: int) -> bool:
        """Once `warmup_frames` are in; the batch that completes them owes its updates too (SAC's warm-up
        of random frames as the pipeline has always counted it)."""
        return frames_collected >= self.warmup_frames

    def sample(self, progress: float = 0.0) -> TensorDictBase:
        return self.buffer.sample(self.batch_size)


class EpisodeAccumulator:
    """Holds online steps until their episode ends, then releases them with `mc_return` (Cal-QL's bound).

    The return-to-go of an online episode is only known once it has ended, so its transitions join
    the online buffer then, as in Cal-QL. The steps of each env are held apart (`pending[env]`).
    """

    def __init__(self, gamma: float, keys: list):
        self.gamma, self.keys = gamma, keys
        self.pending: dict[int, list[TensorDictBase]] = {}

    def add(self, data: TensorDictBase) -> TensorDictBase | None:
        """Store `[T]` consecutive steps (or `[num_envs, T]`); return the completed episodes' transitions, if any."""
        data = data.select(*self.keys, strict=False)
        rows = data.unsqueeze(0) if data.ndim == 1 else data.reshape(-1, data.shape[-1])
        completed = [episode for env, steps in enumerate(rows.unbind(0)) for episode in self._add(env, steps)]
        return torch.cat(completed) if completed else None

    def _add(self, env: int, data: TensorDictBase) -> list[TensorDictBase]:
        pending = self.pending.setdefault(env, [])
        ends = torch.nonzero(data["next", "done"].reshape(-1)).reshape(-1).tolist()
        completed, start = [], 0
        for end in ends:
            episode = torch.cat([*pending, data[start:end + 1]])
            pending.clear()
            start = end + 1
            rewards = episode["next", "reward"].reshape(-1).double().numpy()
            episode["mc_return"] = torch.as_tensor(
                discounted_returns(rewards, self.gamma), dtype=torch.float32).unsqueeze(-1)
            completed.append(episode)
        if start < data.shape[0]:
            pending.append(data[start:])
        return completed


class MixedReplay:
    """Batches that mix offline and online transitions, without copying the offline data.

    `offline_fraction(progress)` gives the share of offline rows for training progress in [0, 1]: a
    constant for the fixed mode, a linear ramp for the annealed mode, both exact per batch. With
    `merged=True` the two buffers act as one ("merged" mode): each row of a batch comes from the
    offline data with probability N_offline / (N_offline + N_online), so the batch is a uniform
    draw from their union, while the offline rows stay in their memory-mapped storage.
    While the online buffer is empty every batch is offline. Only `keys` are kept, so that the
    two sources concatenate. With `episodes`, online steps join the buffer when their episode ends,
    with their return-to-go. No update is made before `warmup_frames` are collected (WSRL's warm-up).
    """

    def __init__(self, offline: ReplayBuffer, online: ReplayBuffer, batch_size: int, keys: list,
                 start_fraction: float = 0.0, end_fraction: float | None = None, merged: bool = False,
                 episodes: EpisodeAccumulator | None = None, warmup_frames: int = 0):
        self.offline, self.buffer = offline, online
        self.warmup_frames = warmup_frames
        self.batch_size, self.keys, self.merged = batch_size, keys, merged
        self.start_fraction = start_fraction
        self.end_fraction = start_fraction if end_fraction is None else end_fraction
        self.episodes = episodes

    @property
    def pending(self) -> dict[int, list[TensorDictBase]]:
        return self.episodes.pending if self.episodes is not None else {}

    @pending.setter
    def pending(self, steps: dict[int, list[TensorDictBase]]) -> None:
        self.episodes.pending = steps

    def add(self, frames: TensorDictBase) -> None:
        completed = frames.reshape(-1) if self.episodes is None else self.episodes.add(frames)
        if completed is not None:
            self.buffer.extend(completed)

    def ready(self, frames_collected: int) -> bool:
        """Once frames beyond the warm-up come in (none by default: offline rows fill every batch until
        online ones arrive); the frames of the warm-up owe no update."""
        return frames_collected > self.warmup_frames

    def offline_fraction(self, progress: float) -> float:
        if self.merged:
            return len(self.offline) / (len(self.offline) + len(self.buffer))
        progress = min(max(progress, 0.0), 1.0)
        return self.start_fraction + (self.end_fraction - self.start_fraction) * progress

    def offline_rows(self, progress: float) -> int:
        """How many rows of the next batch come from the offline data."""
        if len(self.buffer) == 0:
            return self.batch_size
        fraction = self.offline_fraction(progress)
        if self.merged:
            return int(torch.binomial(torch.tensor(float(self.batch_size)), torch.tensor(fraction)))
        return round(fraction * self.batch_size)

    def sample(self, progress: float = 0.0) -> TensorDictBase:
        n_offline = self.offline_rows(progress)
        parts = []
        if n_offline > 0:
            parts.append(self.offline.sample(n_offline).select(*self.keys))
        if n_offline < self.batch_size:
            parts.append(self.buffer.sample(self.batch_size - n_offline).select(*self.keys))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

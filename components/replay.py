"""Offline/online replay mixing for offline-to-online training (spec section 5)."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer


def make_online_buffer(capacity: int) -> ReplayBuffer:
    """A uniform replay buffer for the transitions collected online."""
    return ReplayBuffer(storage=LazyTensorStorage(capacity))


class MixedReplay:
    """Batches that mix offline and online transitions, without copying the offline data.

    `offline_fraction(progress)` gives the share of offline rows for training progress in [0, 1]: a
    constant for the fixed mode, a linear ramp for the annealed mode, both exact per batch. With
    `merged=True` the two buffers act as one ("merged" mode): each row of a batch comes from the
    offline data with probability N_offline / (N_offline + N_online), so the batch is a uniform
    draw from their union, while the offline rows stay in their memory-mapped storage.
    While the online buffer is empty every batch is offline. Only `keys` are kept, so that the
    two sources concatenate.
    """

    def __init__(self, offline: ReplayBuffer, online: ReplayBuffer, batch_size: int, keys: list,
                 start_fraction: float = 0.0, end_fraction: float | None = None, merged: bool = False):
        self.offline, self.online = offline, online
        self.batch_size, self.keys, self.merged = batch_size, keys, merged
        self.start_fraction = start_fraction
        self.end_fraction = start_fraction if end_fraction is None else end_fraction

    def offline_fraction(self, progress: float) -> float:
        if self.merged:
            return len(self.offline) / (len(self.offline) + len(self.online))
        progress = min(max(progress, 0.0), 1.0)
        return self.start_fraction + (self.end_fraction - self.start_fraction) * progress

    def offline_rows(self, progress: float) -> int:
        """How many rows of the next batch come from the offline data."""
        if len(self.online) == 0:
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
            parts.append(self.online.sample(self.batch_size - n_offline).select(*self.keys))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

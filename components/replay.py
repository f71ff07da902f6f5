"""Offline/online replay mixing for offline-to-online training (spec section 5)."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer


def make_online_buffer(capacity: int, initial: TensorDictBase | None = None) -> ReplayBuffer:
    """A uniform replay buffer; `initial` pre-fills it (the "merged" mode holds the offline data too)."""
    buffer = ReplayBuffer(storage=LazyTensorStorage(capacity + (0 if initial is None else initial.shape[0])))
    if initial is not None:
        buffer.extend(initial)
    return buffer


class MixedReplay:
    """Batches with an exact share of offline transitions, the rest from the online buffer.

    `offline_fraction(progress)` gives the share for training progress in [0, 1]: a constant for the
    fixed mode, a linear ramp for the annealed mode. While the online buffer is empty every batch is
    offline. Only `keys` are kept, so that the two sources concatenate.
    """

    def __init__(self, offline: ReplayBuffer, online: ReplayBuffer, batch_size: int, keys: list,
                 start_fraction: float, end_fraction: float | None = None):
        self.offline, self.online = offline, online
        self.batch_size, self.keys = batch_size, keys
        self.start_fraction = start_fraction
        self.end_fraction = start_fraction if end_fraction is None else end_fraction

    def offline_fraction(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        return self.start_fraction + (self.end_fraction - self.start_fraction) * progress

    def sample(self, progress: float = 0.0) -> TensorDictBase:
        n_offline = self.batch_size if len(self.online) == 0 else round(self.offline_fraction(progress) * self.batch_size)
        parts = []
        if n_offline > 0:
            parts.append(self.offline.sample(n_offline).select(*self.keys))
        if n_offline < self.batch_size:
            parts.append(self.online.sample(self.batch_size - n_offline).select(*self.keys))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

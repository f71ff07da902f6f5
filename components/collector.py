"""The experience collector shared by dataset creation and online training, and the returns of its episodes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase, ExplorationType


def make_collector(env_factory: Callable[[], EnvBase], policy: TensorDictModuleBase | None = None, *,
                   frames_per_batch: int, total_frames: int = -1, init_random_frames: int = 0, seed: int = 0,
                   exploration_type: ExplorationType = ExplorationType.RANDOM, device=None) -> Collector:
    """A TorchRL `Collector` over the env the factory makes (one env or a batch of them); `policy=None`
    acts uniformly at random.

    The env is seeded inside its factory because the collector resets it on construction, before
    `Collector.set_seed` could act. Actions are drawn from torch's global RNG: seed it too for
    reproducible data. `total_frames=-1` collects until the caller stops iterating.
    """
    def seeded_env() -> EnvBase:
        env = env_factory()
        env.set_seed(seed)
        return env

    return Collector(seeded_env, policy, frames_per_batch=frames_per_batch, total_frames=total_frames,
                     init_random_frames=init_random_frames or None, exploration_type=exploration_type,
                     device=device, auto_register_policy_transforms=False)  # the env stays as the factory built it


class EpisodeReturns:
    """The returns of the training episodes a collector completes: `(frames collected when it ended,
    return, length)` per episode, in the order they ended (per env of a batched env)."""

    def __init__(self):
        self.completed: list[tuple[int, float, int]] = []
        self.running: dict[int, tuple[float, int]] = {}  # env -> (return so far, steps so far)

    def add(self, batch: TensorDictBase, frames: int) -> None:
        """Account for a collector batch (`[T]` or `[num_envs, T]`); `frames` is the total collected after it."""
        rewards = batch["next", "reward"].reshape(-1, batch.shape[-1]).double()
        done = batch["next", "done"].reshape(-1, batch.shape[-1])
        steps = batch.shape[-1]
        for env in range(rewards.shape[0]):
            total, length = self.running.get(env, (0.0, 0))
            ends = torch.nonzero(done[env]).reshape(-1).tolist()
            start = 0
            for end in ends:
                total += rewards[env, start:end + 1].sum().item()
                length += end + 1 - start
                # Frames at the end of this step: batches fill env by env along time, all envs alike.
                self.completed.append((frames - (steps - end - 1) * rewards.shape[0], total, length))
                total, length, start = 0.0, 0, end + 1
            self.running[env] = (total + rewards[env, start:].sum().item(), length + steps - start)

    def state_dict(self) -> dict:
        return {"completed": list(self.completed), "running": {str(k): v for k, v in self.running.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.completed[:] = [tuple(e) for e in state["completed"]]
        self.running = {int(k): tuple(v) for k, v in state["running"].items()}

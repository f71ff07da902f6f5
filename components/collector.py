"""The experience collector shared by dataset creation and online training."""

from __future__ import annotations

from collections.abc import Callable

from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase, ExplorationType


def make_collector(env_factory: Callable[[], EnvBase], policy: TensorDictModuleBase | None = None, *,
                   frames_per_batch: int, total_frames: int = -1, init_random_frames: int = 0, seed: int = 0,
                   exploration_type: ExplorationType = ExplorationType.RANDOM, device=None) -> Collector:
    """A single-env TorchRL `Collector`; `policy=None` acts uniformly at random in the action box.

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

"""Evaluation of a policy: the one protocol every return in this project is measured with.

Episode `i` starts from env seed `seed + i` (the env is reset with that seed, then reset again,
as TorchRL's `set_seed` followed by a rollout does), and the episodes run side by side in one
gymnasium vector env, so that one policy call serves a step of every episode. An episode's
return is the sum of its rewards, as float32, up to its first end (as TorchRL's rollouts sum
them); the vector env's automatic resets after it are ignored.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, set_exploration_type


def evaluate_policy(actor: TensorDictModuleBase | None, env_id: str, env_kwargs: dict, episodes: int,
                    seed: int, exploration: ExplorationType = ExplorationType.DETERMINISTIC) -> list[float]:
    """Returns of `episodes` episodes of `actor` (its deterministic action unless `exploration` says
    otherwise); `actor=None` acts uniformly at random, from a generator seeded with `seed`."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **env_kwargs) for _ in range(episodes)])
    try:
        envs.reset(seed=[seed + i for i in range(episodes)])
        observation, _ = envs.reset()
        rewards, lengths = [], np.zeros(episodes, dtype=int)
        running = np.ones(episodes, dtype=bool)
        random = torch.Generator().manual_seed(seed)
        while running.any():
            action = _actions(actor, observation, envs.single_action_space, episodes, random, exploration)
            observation, reward, terminated, truncated, _ = envs.step(action)
            rewards.append(reward.astype(np.float32))
            lengths += running
            running &= ~(terminated | truncated)
    finally:
        envs.close()
    steps = torch.as_tensor(np.stack(rewards))  # [T, episodes]
    return [steps[:length, i].contiguous().sum().item() for i, length in enumerate(lengths)]


def _actions(actor, observation: np.ndarray, space: gym.Space, n: int, random: torch.Generator,
             exploration: ExplorationType) -> np.ndarray:
    if actor is None:
        if isinstance(space, gym.spaces.Discrete):
            return (space.start + torch.randint(int(space.n), (n,), generator=random)).numpy()
        low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
        return (low + (high - low) * torch.rand(n, *space.shape, generator=random, dtype=low.dtype)).numpy()
    batch = TensorDict({"observation": torch.as_tensor(observation, dtype=torch.float32)}, [n])
    with torch.no_grad(), set_exploration_type(exploration):
        action = actor(batch)["action"]
    return action.numpy().astype(space.dtype, copy=False)

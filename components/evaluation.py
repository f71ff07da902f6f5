"""Evaluation of a policy: the one protocol every return in this project is measured with."""

from __future__ import annotations

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from cqlsac.components.envs import make_env


def evaluate_policy(actor: TensorDictModuleBase | None, env_id: str, env_kwargs: dict, episodes: int,
                    seed: int) -> list[float]:
    """Returns of `episodes` episodes of the deterministic policy (the squashed mean), the episode
    `i` started from env seed `seed + i`; `actor=None` acts uniformly at random (torch's RNG)."""
    env = make_env(env_id, env_kwargs=env_kwargs)
    returns = []
    for episode in range(episodes):
        env.set_seed(seed + episode)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            rollout = env.rollout(max_steps=1_000_000, policy=actor)
        returns.append(rollout["next", "reward"].sum().item())
    env.close()
    return returns

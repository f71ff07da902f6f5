"""Environment factory: a gymnasium env (or several stepped together) as a TorchRL env with float32 observations."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from torchrl.envs import DoubleToFloat, GymEnv, GymWrapper, TransformedEnv

from cqlsac.components.errors import UserError


class UnknownEnvError(UserError):
    """The env id is not registered with gymnasium."""


def make_env(env_id: str, seed: int | None = None, env_kwargs: dict[str, Any] | None = None,
             num_envs: int = 1) -> TransformedEnv:
    """TorchRL env for a gymnasium id; observations and actions are cast to float32, discrete
    actions are integers (not one-hot).

    With `num_envs > 1`, that many copies step together in one gymnasium `SyncVectorEnv` (batch
    size `[num_envs]`, env `i` seeded with `seed + i`), so that one policy call serves a step of
    each; an env that ends resets in the same step.
    """
    if env_id not in gym.registry:
        close = [name for name in gym.registry if env_id.split("-")[0].lower() in name.lower()][:5]
        hint = f" Similar ids: {', '.join(close)}." if close else ""
        raise UnknownEnvError(f"gymnasium does not know the env id {env_id!r}.{hint}")
    kwargs = env_kwargs or {}
    if num_envs == 1:
        base = GymEnv(env_id, categorical_action_encoding=True, **kwargs)
    else:
        vector = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **kwargs) for _ in range(num_envs)],
                                          autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        base = GymWrapper(vector, categorical_action_encoding=True)
    env = TransformedEnv(base, DoubleToFloat())
    if seed is not None:
        env.set_seed(seed)
    return env

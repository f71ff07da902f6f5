"""Environment factory: a gymnasium env as a TorchRL env with float32 observations."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from torchrl.envs import DoubleToFloat, GymEnv, TransformedEnv

from cqlsac.components.errors import UserError


class UnknownEnvError(UserError):
    """The env id is not registered with gymnasium."""


def make_env(env_id: str, seed: int | None = None, env_kwargs: dict[str, Any] | None = None) -> TransformedEnv:
    """TorchRL env for a gymnasium id; observations and actions are cast to float32."""
    if env_id not in gym.registry:
        close = [name for name in gym.registry if env_id.split("-")[0].lower() in name.lower()][:5]
        hint = f" Similar ids: {', '.join(close)}." if close else ""
        raise UnknownEnvError(f"gymnasium does not know the env id {env_id!r}.{hint}")
    env = TransformedEnv(GymEnv(env_id, **(env_kwargs or {})), DoubleToFloat())
    if seed is not None:
        env.set_seed(seed)
    return env

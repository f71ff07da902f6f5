"""Environment factory: a gymnasium env (or several stepped together) as a TorchRL env with float32 observations."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from torchrl.envs import DoubleToFloat, GymEnv, GymWrapper, TransformedEnv

from cqlsac.components.errors import UserError


class UnknownEnvError(UserError):
    """The env id is not registered with gymnasium."""


class EnvError(UserError):
    """An env the pipeline cannot run: kwargs it refuses, spaces the networks do not take, no time limit."""


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type where it has none."""
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_known(env_id: str) -> None:
    if env_id not in gym.registry:
        close = [name for name in gym.registry if env_id.split("-")[0].lower() in name.lower()][:5]
        hint = f" Similar ids: {', '.join(close)}." if close else ""
        raise UnknownEnvError(f"gymnasium does not know the env id {env_id!r}.{hint}")


def check_env(env_id: str, env_kwargs: dict[str, Any] | None = None, kwargs_name: str = "env.kwargs") -> None:
    """Fail in one line before any work, not deep inside a stage: an unknown id, kwargs the env
    refuses, observations that are not a vector, actions neither Box nor Discrete, or no time limit
    (an evaluation episode would never end). `kwargs_name` is what the user sets the kwargs with."""
    check_known(env_id)
    kwargs = env_kwargs or {}
    try:
        env = gym.make(env_id, **kwargs)
    except (TypeError, ValueError, gym.error.Error) as exc:
        if not kwargs:
            raise EnvError(f"cannot make {env_id} ({reason(exc)})") from None
        raise EnvError(f"{kwargs_name} {kwargs} do not work with {env_id} ({reason(exc)}); fix or "
                       f"remove {kwargs_name}") from None
    try:
        observations, actions = env.observation_space, env.action_space
        if not (isinstance(observations, gym.spaces.Box) and len(observations.shape) == 1):
            raise EnvError(f"{env_id} observes {observations}; the networks take a vector of numbers (a 1-D Box)")
        if not (isinstance(actions, gym.spaces.Discrete)
                or isinstance(actions, gym.spaces.Box) and len(actions.shape) == 1):
            raise EnvError(f"{env_id} acts in {actions}; the agents act in a 1-D Box (continuous) or a Discrete space")
        if env.spec is None or env.spec.max_episode_steps is None:
            raise EnvError(f"{env_id} with {kwargs_name} {kwargs} has no time limit, so an episode may never end; "
                           f"give it one in {kwargs_name}, e.g. {{max_episode_steps: 1000}}")
        if kwargs:  # a value of the wrong type may only fail once the env steps (Pendulum's g: abc)
            try:
                env.reset(seed=0)
                env.step(actions.sample())
            except (TypeError, ValueError, ArithmeticError) as exc:
                raise EnvError(f"{kwargs_name} {kwargs} do not work with {env_id}: its first step fails "
                               f"({reason(exc)}); fix or remove {kwargs_name}") from None
    finally:
        env.close()


def make_env(env_id: str, seed: int | None = None, env_kwargs: dict[str, Any] | None = None,
             num_envs: int = 1) -> TransformedEnv:
    """TorchRL env for a gymnasium id; observations and actions are cast to float32, discrete
    actions are integers (not one-hot).

    With `num_envs > 1`, that many copies step together in one gymnasium `SyncVectorEnv` (batch
    size `[num_envs]`, env `i` seeded with `seed + i`), so that one policy call serves a step of
    each; an env that ends resets in the same step.
    """
    check_known(env_id)
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

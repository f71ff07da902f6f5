"""Creating offline datasets the D4RL way: collect with a behaviour policy, write a Minari dataset.

Presets (D4RL's recipe): `random` (uniform random actions), `medium` / `expert` (one SAC checkpoint
at that return level), `medium-expert` (half the steps from a medium, half from an expert
checkpoint), `medium-replay` (a training run's replay buffer, see `write_replay_dataset`).

Reference scores, for D4RL-style normalisation (0 = random, 100 = expert), are mean returns over
`ref_episodes` episodes of `evaluate_policy` (deterministic action), as agents are evaluated:
`ref_min_score` is the uniform random policy's; `ref_max_score` is the expert's (a checkpoint or a
value the user gives), otherwise that of the behaviour policy (the expert of `medium-expert`) when it
beats random play. Without either (random data, a replay buffer, a policy no better than random)
the dataset gets no reference scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from gymnasium.envs.registration import EnvSpec
from tensordict import TensorDict, TensorDictBase
from torchrl.modules import ProbabilisticActor
from tqdm import tqdm

from cqlsac.components.checkpoints import load_policy
from cqlsac.components.collector import make_collector
from cqlsac.components.envs import check_env, make_env
from cqlsac.components.errors import UserError
from cqlsac.components.evaluation import evaluate_policy
from cqlsac.datasets.presets import NUM_POLICIES, PRESETS, RANDOM
from cqlsac.datasets.writer import (
    Episode,
    check_reference_scores,
    check_writable,
    transitions_to_episodes,
    write_dataset,
)


class DatasetCreationError(UserError):
    """The requested dataset cannot be made from these arguments; the message says what to change."""


@dataclass(frozen=True)
class BehaviourPolicy:
    """A policy that generates data: a checkpoint's actor, or uniform random actions (`actor=None`)."""

    actor: ProbabilisticActor | None
    source: str  # checkpoint path, or "random"
    sha256: str | None = None
    env_id: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, source: str | Path) -> BehaviourPolicy:
        """`"random"` or the path of a policy checkpoint."""
        if str(source) == RANDOM:
            return cls(actor=None, source=RANDOM)
        actor, meta = load_policy(source)
        return cls(actor=actor, source=str(source), sha256=meta["sha256"], env_id=meta["env_id"],
                   env_kwargs=dict(meta["env_kwargs"]))


def _as_policy(policy: str | Path | BehaviourPolicy) -> BehaviourPolicy:
    return policy if isinstance(policy, BehaviourPolicy) else BehaviourPolicy.load(policy)


def collect_transitions(env_id: str, env_kwargs: dict, policy: BehaviourPolicy, steps: int, seed: int) -> TensorDict:
    """`steps` transitions in TorchRL's layout, acting as D4RL did: sampling the stochastic policy."""
    frames_per_batch = min(steps, 1000)
    num_batches = -(-steps // frames_per_batch)
    batches = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        collector = make_collector(partial(make_env, env_id, None, env_kwargs), policy.actor,
                                   frames_per_batch=frames_per_batch, total_frames=num_batches * frames_per_batch,
                                   seed=seed)
        with tqdm(total=num_batches * frames_per_batch, desc=f"collecting ({policy.source})", unit="step",
                  disable=None) as bar:
            for batch in collector:
                batches.append(batch)
                bar.update(batch.numel())
        collector.shutdown()
    return torch.cat(batches)[:steps]


def mean_eval_return(env_id: str, env_kwargs: dict, policy: BehaviourPolicy, episodes: int, seed: int) -> float:
    """Mean return under the pipeline's evaluation protocol, so that reference scores normalise agents' returns."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the random policy's actions
        returns = evaluate_policy(policy.actor, env_id, env_kwargs, episodes, seed)
    return math.fsum(returns) / len(returns)


def _env_spec(env_id: str, env_kwargs: dict) -> EnvSpec:
    """The gymnasium spec with the env's kwargs (time limit included), as Minari stores it."""
    check_env(env_id, env_kwargs, "--env-kwargs")  # spaces the agents take, a time limit, kwargs that work
    env = gym.make(env_id, **env_kwargs)
    spec = env.spec
    env.close()
    return spec


def _resolve_env(env_id: str | None, env_kwargs: dict | None,
                 policies: Sequence[BehaviourPolicy]) -> tuple[str, dict]:
    """The env given, else the checkpoints' one; a checkpoint from another env is an error."""
    trained_on = {p.env_id for p in policies if p.actor is not None}
    env_id = env_id or next(iter(trained_on), None)
    if env_id is None:
        raise DatasetCreationError("no env to collect in: pass --env ENV (a gymnasium id) with a random policy")
    if trained_on - {env_id}:
        raise DatasetCreationError(f"checkpoint(s) trained on {sorted(trained_on)} cannot act in {env_id!r}; "
                                   "pass the checkpoints' env with --env, or checkpoints of this env")
    if env_kwargs is None:
        env_kwargs = next((p.env_kwargs for p in policies if p.actor is not None), {})
    return env_id, dict(env_kwargs)


def _complete(episodes: list[Episode], transitions: TensorDictBase) -> list[Episode]:
    """The episodes the env ended: the last one may have been cut by the step budget."""
    return episodes if bool(transitions["next", "done"][-1]) else episodes[:-1]


def _mean_return(episodes: list[Episode]) -> float | None:
    if not episodes:
        return None
    return math.fsum(math.fsum(e.rewards.tolist()) for e in episodes) / len(episodes)


def _as_expert(expert: str | Path | BehaviourPolicy | float | None) -> BehaviourPolicy | float | None:
    return expert if expert is None or isinstance(expert, (int, float)) else _as_policy(expert)


def reference_scores(env_id: str, env_kwargs: dict, expert: BehaviourPolicy | float | None,
                     fallback: BehaviourPolicy | None, episodes: int, seed: int,
                     allow_weak_expert: bool = False) -> tuple[float | None, float | None, str]:
    """(ref_min_score, ref_max_score, where ref_max_score came from), before any data is collected.

    An expert the user names must beat the random policy (else `DatasetError`), unless
    `allow_weak_expert` (a pipeline whose pretraining was too short), which stores no scores then;
    the `fallback` (the data's best behaviour policy) is only a default, so when it does not beat
    random play, no scores are stored either.
    """
    if isinstance(expert, BehaviourPolicy):
        scored = [BehaviourPolicy.load(RANDOM), expert]
    elif expert is None and fallback is not None and fallback.actor is not None:
        scored = [BehaviourPolicy.load(RANDOM), fallback]
    else:
        scored = [BehaviourPolicy.load(RANDOM)]
    returns = [mean_eval_return(env_id, env_kwargs, policy, episodes, seed)
               for policy in tqdm(scored, desc=f"reference scores ({episodes} episodes each)", unit="policy",
                                  disable=None)]
    ref_min = returns[0]
    if isinstance(expert, (int, float)):
        ref_max, origin = float(expert), "value given by the user"
    elif expert is not None:
        ref_max, origin = returns[1], f"expert {expert.source} (sha256 {expert.sha256})"
        if allow_weak_expert and not ref_max > ref_min:
            return None, None, (f"none (expert {expert.source} returns {ref_max:.3f}, random {ref_min:.3f}: "
                                "it does not beat random play)")
    elif fallback is not None and fallback.actor is not None:
        ref_max = returns[1]
        if not ref_max > ref_min:
            return None, None, (f"none (behaviour policy {fallback.source} returns {ref_max:.3f}, random "
                                f"{ref_min:.3f}; give an expert)")
        origin = f"behaviour policy {fallback.source} (sha256 {fallback.sha256})"
    else:
        return None, None, "none (no expert policy or score given)"
    check_reference_scores(ref_min, ref_max)
    return ref_min, ref_max, origin


def _write(dataset_id: str, spec: EnvSpec, env_kwargs: dict, episodes: list[Episode], *, preset: str | None,
           algorithm: str, sources: list[dict], behaviour_mean_return: float | None,
           refs: tuple[float | None, float | None, str], seed: int | None, ref_episodes: int, overwrite: bool) -> Path:
    ref_min, ref_max, ref_origin = refs
    steps = sum(len(e) for e in episodes)
    extra = {"preset": preset, "env_id": spec.id, "env_kwargs": env_kwargs, "seed": seed, "steps": steps,
             "sources": sources, "behaviour_mean_return": behaviour_mean_return,
             "ref_max_score_from": ref_origin, "ref_score_episodes": ref_episodes}
    description = (f"{preset or 'custom'} dataset of {spec.id}: {steps} steps from "
                   f"{', '.join(s['policy'] for s in sources)}")
    return write_dataset(dataset_id, episodes, spec, algorithm_name=algorithm, description=description,
                         ref_min_score=ref_min, ref_max_score=ref_max, num_episodes_average_score=ref_episodes,
                         extra_metadata=extra, overwrite=overwrite)


def create_dataset(dataset_id: str, policies: Sequence[str | Path | BehaviourPolicy], steps: int, *,
                   env_id: str | None = None, env_kwargs: dict | None = None, preset: str | None = None,
                   expert: str | Path | BehaviourPolicy | float | None = None, seed: int = 0,
                   ref_episodes: int = 10, overwrite: bool = False, allow_weak_expert: bool = False) -> Path:
    """Collect `steps` steps with the behaviour policies and write them as the Minari dataset `dataset_id`.

    `policies`: checkpoint paths / `BehaviourPolicy`s, or "random"; two (medium, expert) for
    `medium-expert`, which takes half of the steps from each. The env defaults to the checkpoints'.
    """
    if preset is not None and preset not in PRESETS:
        raise DatasetCreationError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "medium-replay":
        raise DatasetCreationError("medium-replay datasets come from a training run's replay buffer: "
                                   "use `--replay DIR` (or write_replay_dataset), not a policy")
    if steps < 1:
        raise DatasetCreationError(f"--steps must be positive, got {steps}")
    check_writable(dataset_id, overwrite)
    policies = [_as_policy(p) for p in policies]
    if preset is None and len(policies) == 1 and policies[0].actor is None:
        preset = RANDOM
    wanted = NUM_POLICIES.get(preset, 1)
    if len(policies) != wanted:
        raise DatasetCreationError(f"preset {preset or '(none)'} takes {wanted} --policy, got {len(policies)}"
                                   + ("; use --preset medium-expert for two" if len(policies) == 2 else ""))
    if preset is not None and any((p.actor is None) != (preset == RANDOM) for p in policies):
        raise DatasetCreationError(f"preset {preset} and --policy {' '.join(p.source for p in policies)} do not go "
                                   "together: `random` takes `--policy random`, the others take checkpoints")
    env_id, env_kwargs = _resolve_env(env_id, env_kwargs, policies)
    spec = _env_spec(env_id, env_kwargs)
    refs = reference_scores(env_id, env_kwargs, _as_expert(expert), policies[-1], ref_episodes, seed,
                            allow_weak_expert)
    shares = [steps // len(policies) + (i < steps % len(policies)) for i in range(len(policies))]
    episodes, sources, complete = [], [], []
    for i, (policy, share) in enumerate(zip(policies, shares)):
        transitions = collect_transitions(env_id, env_kwargs, policy, share, seed + i)
        part = transitions_to_episodes(transitions)
        ended = _complete(part, transitions)
        episodes += part
        complete += ended
        sources.append({"policy": policy.source, "sha256": policy.sha256, "steps": share,
                        "episodes": len(part), "mean_return": _mean_return(ended)})
    return _write(dataset_id, spec, env_kwargs, episodes, preset=preset,
                  algorithm="uniform random" if preset == RANDOM else "SAC", sources=sources,
                  behaviour_mean_return=_mean_return(complete), refs=refs, seed=seed, ref_episodes=ref_episodes,
                  overwrite=overwrite)


def write_replay_dataset(dataset_id: str, transitions: TensorDictBase, env_id: str, env_kwargs: dict | None = None,
                         *, expert: str | Path | BehaviourPolicy | float | None = None, seed: int | None = None,
                         ref_episodes: int = 10, overwrite: bool = False, allow_weak_expert: bool = False) -> Path:
    """Write a training run's replay buffer (transitions in TorchRL's layout, in time order) as `medium-replay`.

    Its behaviour mean return is over all the episodes in the buffer. Without an `expert` (a checkpoint
    or its mean return) the dataset has no reference scores.
    """
    check_writable(dataset_id, overwrite)
    env_kwargs = dict(env_kwargs or {})
    spec = _env_spec(env_id, env_kwargs)
    refs = reference_scores(env_id, env_kwargs, _as_expert(expert), None, ref_episodes, 0 if seed is None else seed,
                            allow_weak_expert)
    episodes = transitions_to_episodes(transitions)
    if not episodes:
        raise DatasetCreationError("the replay buffer holds no transitions")
    mean_return = _mean_return(episodes)
    sources = [{"policy": "replay buffer of a SAC run", "sha256": None, "steps": transitions.numel(),
                "episodes": len(episodes), "mean_return": mean_return}]
    return _write(dataset_id, spec, env_kwargs, episodes, preset="medium-replay",
                  algorithm="SAC (replay buffer)", sources=sources, behaviour_mean_return=mean_return,
                  refs=refs, seed=seed, ref_episodes=ref_episodes, overwrite=overwrite)

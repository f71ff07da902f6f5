"""Speed of experience collection and evaluation: raw gymnasium against our collector and `evaluate_policy`.

Run from the repository root:
    python benchmarks/collection.py [--quick] [--env Pendulum-v1] [--num-envs 4 16 64]
    python benchmarks/collection.py --env LunarLander-v3 --env-kwargs '{"continuous": true}'

Online training spends its env time in a TorchRL `Collector` (`components.collector.make_collector`
over `components.envs.make_env`) and its evaluation time in `components.evaluation.evaluate_policy`.
What the env itself costs is the floor under both, so everything is set against it:

- raw `env.step`: one gymnasium env, uniform random actions drawn up front in numpy, reset at the
  end of an episode: the frames/s of the simulator and gymnasium's wrappers alone;
- raw `SyncVectorEnv` with N envs (same-step autoreset, as `make_env` builds it), random actions;
- our collector: `make_collector` with the pipeline's actor (`make_actor`, 64x64, sampled actions)
  over one env and over `make_env(..., num_envs=N)`; frames_per_batch 1000, rounded down to a
  multiple of N as the pipeline requires; the first batch (start-up) is not timed;
- the actor's own path against torchrl's: the collector over one env and `evaluate_policy` again with
  a copy of the actor that builds its `TanhNormal` on every call (what `SquashedGaussianActor`
  skips), the same actions;
- evaluation of the deterministic actor: `evaluate_policy` (the episodes side by side in one vector
  env, one policy call per step of all of them) against the same episodes one after another, as
  the project's evaluation ran before: a TorchRL env, `env.set_seed(seed + i)`, then
  `env.rollout(max_steps=10**6, policy=actor)` under `ExplorationType.DETERMINISTIC`. Both build
  their envs on every call, as an evaluation does. Their steps/s (episodes/s x the mean episode
  length) are set against raw `env.step` too.

All are timed in interleaved rounds in one process, so that a slow spell of a shared machine hits
all of them alike. The actor is untrained (its episodes on LunarLander end early or time out).

The last lines are for scripts:
    collection_vs_raw_env_step: X    (frames/s of the fastest collector / frames/s of raw env.step)
    collection_vs_raw_env_step_1_env: X1   (the same for one env, the pipeline's default)
    evaluation_speedup: Y            (episodes/s of evaluate_policy / episodes/s one after another)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import types
from functools import partial

import gymnasium as gym
import numpy as np
import torch
from cql_update import cpu_model, interleaved_rates, load_note, usable_cores
from tensordict.nn import ProbabilisticTensorDictSequential
from torchrl.envs.utils import ExplorationType, set_exploration_type

from cqlsac.components.collector import make_collector
from cqlsac.components.config import NetworkConfig
from cqlsac.components.envs import make_env
from cqlsac.components.evaluation import evaluate_policy
from cqlsac.components.networks import make_actor

STEPS_PER_CALL = 100  # raw env steps per timed call, so that the timer's own cost stays out of the figure


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Pendulum-v1",
                   help="gymnasium env id, e.g. LunarLander-v3 with --env-kwargs '{\"continuous\": true}'")
    p.add_argument("--env-kwargs", type=json.loads, default={},
                   help='keyword arguments of gym.make as JSON, e.g. \'{"continuous": true}\' for LunarLander-v3')
    p.add_argument("--num-envs", type=int, nargs="+", default=[4, 16, 64], help="sizes N of the vector envs")
    p.add_argument("--frames-per-batch", type=int, default=1000, help="collector batch (rounded down to a multiple of N)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per call")
    p.add_argument("--hidden", type=int, default=64, help="width of the actor's two hidden layers (the pipeline: 64)")
    p.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each measurement (a call: 100 raw steps, "
                                                          "one collector batch or one evaluation)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the cores this process may use")
    p.add_argument("--quick", action="store_true", help="short measurements (at most 1 s each)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 1.0), min(args.warmup, 1)
    return args


def random_actions(space: gym.Space, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Uniform random actions of a single env's space, `shape` of them."""
    if isinstance(space, gym.spaces.Discrete):
        return rng.integers(space.start, space.start + space.n, size=shape).astype(space.dtype)
    return rng.uniform(space.low, space.high, size=(*shape, *space.shape)).astype(space.dtype)


# --- what is timed: fn(k) does one call; each returns (fn, units per call, close) -------------------
def raw_env(args):
    env = gym.make(args.env, **args.env_kwargs)
    env.reset(seed=0)
    actions = random_actions(env.action_space, (STEPS_PER_CALL,), np.random.default_rng(0))

    def steps(k):
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()

    return steps, STEPS_PER_CALL, env.close


def raw_vector_env(args, n):
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.env, **args.env_kwargs) for _ in range(n)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=list(range(n)))
    actions = random_actions(envs.single_action_space, (STEPS_PER_CALL, n), np.random.default_rng(0))

    def steps(k):
        for action in actions:
            envs.step(action)

    return steps, STEPS_PER_CALL * n, envs.close


def collector(args, actor, n):
    frames_per_batch = args.frames_per_batch - args.frames_per_batch % n
    c = make_collector(partial(make_env, args.env, env_kwargs=args.env_kwargs, num_envs=n), actor,
                       frames_per_batch=frames_per_batch)
    batches = iter(c)
    frames = next(batches).numel()  # start-up: the env and the collector's first reset
    return (lambda k: next(batches)), frames, c.shutdown


def sequential_evaluation(actor, args, seed=0) -> list[int]:
    """The episodes one after another in a TorchRL env; their lengths."""
    env = make_env(args.env, env_kwargs=args.env_kwargs)
    lengths = []
    for i in range(args.episodes):
        env.set_seed(seed + i)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            lengths.append(env.rollout(max_steps=10**6, policy=actor).numel())
    env.close()
    return lengths


def pipeline_actor(args):
    env = make_env(args.env, env_kwargs=args.env_kwargs)
    net = NetworkConfig(actor_hidden=(args.hidden,) * 2, critic_hidden=(args.hidden,) * 2)
    actor = make_actor(env.observation_spec["observation"], env.action_spec, net)
    env.close()
    return actor


def through_the_distribution(actor):
    """A copy of the actor whose every call builds its distribution and samples from it (torchrl's
    path, which `SquashedGaussianActor` skips in collection and evaluation): the same actions, slower."""
    plain = copy.deepcopy(actor)
    plain.forward = types.MethodType(ProbabilisticTensorDictSequential.forward, plain)
    return plain


# --- the run -----------------------------------------------------------------------------------
def row(name, value, unit, ratio=""):
    print(f"| {name:<60} | {value:>9} | {unit:<10} | {ratio:>15} |")


def main(argv=None):
    args = parse_args(argv)
    cores = usable_cores()
    torch.set_num_threads(args.threads or cores)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | gymnasium {gym.__version__} | threads {torch.get_num_threads()} of {cores} cores "
          f"| CPU {cpu_model()}")
    print(f"env {args.env} {json.dumps(args.env_kwargs)}, actor {args.hidden}x{args.hidden}, N {args.num_envs}, "
          f"frames_per_batch {args.frames_per_batch}, {args.episodes} evaluation episodes, {args.seconds:g} s per "
          f"measurement, warmup {args.warmup}" + (" (quick)" if args.quick else ""))
    print(load_note(cores))

    actor = pipeline_actor(args)
    episode_lengths = sequential_evaluation(actor, args)  # the same episodes as evaluate_policy's
    measured = {"raw env.step, 1 env": raw_env(args)}
    measured.update({f"raw SyncVectorEnv, {n} envs": raw_vector_env(args, n) for n in args.num_envs})
    measured.update({"collector, 1 env" if n == 1 else f"collector, make_env num_envs={n}": collector(args, actor, n)
                     for n in [1, *args.num_envs]})
    plain = through_the_distribution(actor)
    measured["collector, 1 env, actor through its distribution"] = collector(args, plain, 1)
    measured["evaluate_policy, side by side"] = (
        lambda k: evaluate_policy(actor, args.env, args.env_kwargs, args.episodes, seed=0), args.episodes, None)
    measured["evaluate_policy, actor through its distribution"] = (
        lambda k: evaluate_policy(plain, args.env, args.env_kwargs, args.episodes, seed=0), args.episodes, None)
    measured["evaluation one after another (env.rollout)"] = (
        lambda k: sequential_evaluation(actor, args), args.episodes, None)
    t_run = time.perf_counter()
    rates = interleaved_rates({name: fn for name, (fn, _, _) in measured.items()}, args.seconds * len(measured),
                              args.warmup, lambda: None, rounds=3)
    for _, _, close in measured.values():
        if close is not None:
            close()
    per_s = {name: rates[name].per_s * units for name, (_, units, _) in measured.items()}

    raw = per_s["raw env.step, 1 env"]
    mean_length = sum(episode_lengths) / len(episode_lengths)
    print()
    print(f"| {'measurement':<60} | {'value':>9} | {'unit':<10} | {'vs raw env.step':>15} |")
    print(f"|{'-' * 62}|{'-' * 11}|{'-' * 12}|{'-' * 17}|")
    for name, value in per_s.items():
        if name.startswith("evaluat"):
            row(name, f"{value:.2f}", "episodes/s", f"{value * mean_length / raw:.3g}x steps/s")
        else:
            batch = f" ({measured[name][1]} frames/batch)" if name.startswith("collector") else ""
            row(name + batch, f"{value:.0f}", "frames/s", f"{value / raw:.3g}x")
    collectors = {name: value for name, value in per_s.items()
                  if name.startswith("collector") and "distribution" not in name}
    best = max(collectors, key=collectors.get)
    speedup = per_s["evaluate_policy, side by side"] / per_s["evaluation one after another (env.rollout)"]
    print(f"\nfastest collector: {best}; evaluation episodes {mean_length:.0f} steps on average; "
          f"evaluate_policy / one after another: {speedup:.2f}x")
    print("skipping the distribution: collector, 1 env "
          f"{per_s['collector, 1 env'] / per_s['collector, 1 env, actor through its distribution']:.2f}x, evaluate_policy "
          f"{per_s['evaluate_policy, side by side'] / per_s['evaluate_policy, actor through its distribution']:.2f}x")
    print(f"(total run time {time.perf_counter() - t_run:.0f} s; {load_note(cores)})")
    print(f"collection_vs_raw_env_step: {collectors[best] / raw:.3f}")
    print(f"collection_vs_raw_env_step_1_env: {collectors['collector, 1 env'] / raw:.3f}")
    print(f"evaluation_speedup: {speedup:.3f}")


if __name__ == "__main__":
    main()

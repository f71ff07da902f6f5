"""Dataset creation (collector, presets, reference scores, metadata) and the `cqlsac datasets` commands."""

import argparse
import hashlib
import math
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import ExplorationType, set_exploration_type

from cqlsac.components.checkpoints import save_policy
from cqlsac.components.collector import make_collector
from cqlsac.components.config import NetworkConfig
from cqlsac.components.envs import EnvError, UnknownEnvError, make_env
from cqlsac.components.networks import make_actor
from cqlsac.datasets import DatasetError, dataset_content_digest, load_transitions
from cqlsac.datasets import creation as dataset_creation
from cqlsac.datasets.creation import DatasetCreationError, create_dataset, write_replay_dataset
from cqlsac.pipeline.datasets_cli import add_datasets_parser

PENDULUM = "Pendulum-v1"
SHORT = {"max_episode_steps": 20}
LANDER = {"continuous": True, "max_episode_steps": 100}  # random play crashes (terminates) or times out


def collect(env_id, env_kwargs, actor, steps, seed):
    """Independent reference collection: the collector alone, seeded as dataset creation promises."""
    torch.manual_seed(seed)
    collector = make_collector(lambda: make_env(env_id, env_kwargs=env_kwargs), actor, frames_per_batch=steps,
                               total_frames=steps, seed=seed)
    data = next(iter(collector))
    collector.shutdown()
    return data


def assert_same_transitions(loaded, collected):
    """The dataset holds the collected steps; the budget-cut last episode is marked truncated."""
    for key in ["observation", "action", ("next", "observation"), ("next", "reward"), ("next", "terminated")]:
        torch.testing.assert_close(loaded[key], collected[key], rtol=0, atol=0)
    truncated = collected["next", "truncated"].clone()
    truncated[-1] |= ~collected["next", "done"][-1]
    assert torch.equal(loaded["next", "truncated"], truncated)


def gym_mean_return(actor, env_id, env_kwargs, episodes, seed):
    """Mean return with plain gymnasium, as evaluation defines it: episode i starts at the reset after
    reset(seed + i), and the episodes step together. `actor` acts deterministically; with None, each
    step draws the actions of all episodes uniformly from one generator seeded with `seed`."""
    envs = [gym.make(env_id, **env_kwargs) for _ in range(episodes)]
    observations = []
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
        observations.append(env.reset()[0])
    low, high = (torch.as_tensor(b) for b in (envs[0].action_space.low, envs[0].action_space.high))
    random = torch.Generator().manual_seed(seed)
    rewards = [[] for _ in envs]
    running = [True] * episodes
    while any(running):
        if actor is None:
            draws = low + (high - low) * torch.rand(episodes, *low.shape, generator=random, dtype=low.dtype)
        for i, env in enumerate(envs):
            if not running[i]:
                continue
            if actor is None:
                action = draws[i]
            else:
                with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
                    action = actor(TensorDict(observation=torch.as_tensor(observations[i], dtype=torch.float32)))["action"]
            observations[i], reward, terminated, truncated, _ = env.step(action.numpy())
            rewards[i].append(np.float32(reward))
            running[i] = not (terminated or truncated)
    return math.fsum(torch.tensor(r).sum().item() for r in rewards) / episodes


def episode_returns(data):
    """Returns of the episodes the env ended, by a plain loop over the steps."""
    returns, current = [], 0.0
    for reward, done in zip(data["next", "reward"].flatten().tolist(), data["next", "done"].flatten().tolist()):
        current += reward
        if done:
            returns.append(current)
            current = 0.0
    return returns


@pytest.fixture
def checkpoints(tmp_path):
    """Two untrained Pendulum policies saved as checkpoints: (medium path, expert path, actors)."""
    env = make_env(PENDULUM, env_kwargs=SHORT)
    paths, actors = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        actor = make_actor(env.observation_spec["observation"], env.action_spec, NetworkConfig(actor_hidden=(16,)))
        path = tmp_path / f"policy_{seed}.pt"
        save_policy(path, actor, PENDULUM, NetworkConfig(actor_hidden=(16,)), SHORT, mean_return=0.0)
        paths.append(path)
        actors.append(actor)
    return paths[0], paths[1], actors


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="cqlsac")
    add_datasets_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_make_collector_is_seeded():
    first = collect(PENDULUM, SHORT, None, 30, seed=4)
    again = collect(PENDULUM, SHORT, None, 30, seed=4)
    other = collect(PENDULUM, SHORT, None, 30, seed=5)
    assert (first == again).all()
    assert not torch.equal(first["observation"][0], other["observation"][0])
    assert first["action"].abs().max() <= 2.0
    assert first["next", "truncated"].flatten().tolist() == ([False] * 19 + [True] + [False] * 10)


def test_random_dataset_holds_the_collected_steps_with_terminations(dataset_store):
    create_dataset("lander/random-v0", ["random"], 300, env_id="LunarLander-v3", env_kwargs=LANDER, seed=0,
                   ref_episodes=1)
    transitions, info = load_transitions("lander/random-v0")
    collected = collect("LunarLander-v3", LANDER, None, 300, seed=0)
    assert_same_transitions(transitions, collected)
    assert transitions["next", "terminated"].sum() >= 1 and collected["next", "truncated"].sum() >= 1
    extra = info.metadata["cqlsac"]
    returns = episode_returns(collected)
    assert extra["behaviour_mean_return"] == pytest.approx(sum(returns) / len(returns), rel=1e-6)
    assert (extra["preset"], extra["seed"], extra["steps"]) == ("random", 0, 300)
    assert extra["env_kwargs"] == LANDER and info.env_spec.kwargs == {"continuous": True}
    assert info.env_spec.max_episode_steps == 100
    assert info.metadata["algorithm_name"] == "uniform random"
    assert info.ref_min_score is None and info.ref_max_score is None  # random data, no expert given


def test_medium_dataset_from_a_checkpoint_with_reference_scores(dataset_store, checkpoints):
    medium, _, (actor, _) = checkpoints
    create_dataset("pendulum/medium-v0", [medium], 50, preset="medium", seed=3, ref_episodes=2)
    transitions, info = load_transitions("pendulum/medium-v0")
    assert_same_transitions(transitions, collect(PENDULUM, SHORT, actor, 50, seed=3))
    assert info.ref_max_score == gym_mean_return(actor, PENDULUM, SHORT, 2, seed=3)  # the behaviour policy's
    assert info.ref_min_score == pytest.approx(gym_mean_return(None, PENDULUM, SHORT, 2, seed=3), rel=1e-6)
    source = info.metadata["cqlsac"]["sources"][0]
    assert source["sha256"] == hashlib.sha256(medium.read_bytes()).hexdigest()
    assert (source["policy"], source["steps"], source["episodes"]) == (str(medium), 50, 3)
    assert info.metadata["cqlsac"]["ref_max_score_from"].startswith(f"behaviour policy {medium}")
    assert minari.load_dataset("pendulum/medium-v0").storage.metadata["ref_max_score"] == info.ref_max_score


def test_medium_expert_takes_half_from_each_and_scores_the_expert(dataset_store, checkpoints):
    medium, expert, (medium_actor, expert_actor) = checkpoints
    create_dataset("pendulum/medium-expert-v0", [medium, expert], 41, preset="medium-expert", seed=3,
                   ref_episodes=2)
    transitions, info = load_transitions("pendulum/medium-expert-v0")
    assert_same_transitions(transitions[:21], collect(PENDULUM, SHORT, medium_actor, 21, seed=3))
    assert_same_transitions(transitions[21:], collect(PENDULUM, SHORT, expert_actor, 20, seed=4))
    assert info.ref_max_score == gym_mean_return(expert_actor, PENDULUM, SHORT, 2, seed=3)
    shas = [s["sha256"] for s in info.metadata["cqlsac"]["sources"]]
    assert shas == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (medium, expert)]


def test_no_reference_scores_when_the_behaviour_policy_does_not_beat_random(dataset_store, checkpoints):
    _, worse, (_, worse_actor) = checkpoints
    create_dataset("pendulum/poor-v0", [worse], 10, preset="medium", seed=7, ref_episodes=1)
    _, info = load_transitions("pendulum/poor-v0")
    assert info.ref_min_score is None and info.ref_max_score is None
    policy_return = gym_mean_return(worse_actor, PENDULUM, SHORT, 1, seed=7)
    assert info.metadata["cqlsac"]["ref_max_score_from"].startswith(
        f"none (behaviour policy {worse} returns {policy_return:.3f}, random -")


def test_medium_replay_from_a_runs_transitions(dataset_store):
    replay = collect(PENDULUM, SHORT, None, 50, seed=9).exclude("collector")  # as a training run stores it
    write_replay_dataset("pendulum/medium-replay-v0", replay, PENDULUM, SHORT, expert=-50.0, seed=9,
                         ref_episodes=1)
    transitions, info = load_transitions("pendulum/medium-replay-v0")
    assert_same_transitions(transitions, replay)
    assert info.ref_max_score == -50.0
    assert info.ref_min_score == pytest.approx(gym_mean_return(None, PENDULUM, SHORT, 1, seed=9), rel=1e-6)
    assert info.metadata["cqlsac"]["preset"] == "medium-replay"
    assert info.metadata["cqlsac"]["ref_max_score_from"] == "value given by the user"


def test_creation_mistakes_are_caught_before_collecting(dataset_store, checkpoints, monkeypatch):
    medium, expert, _ = checkpoints
    create_dataset("pendulum/taken-v0", ["random"], 5, env_id=PENDULUM)
    monkeypatch.setattr(dataset_creation, "collect_transitions", lambda *a: pytest.fail("collected anyway"))
    create_cases = [
        (dict(policies=["random"], env_id=PENDULUM, preset="expert"), DatasetCreationError,
         "preset expert and --policy random do not go together"),
        (dict(policies=[medium, expert]), DatasetCreationError,
         "preset (none) takes 1 --policy, got 2; use --preset medium-expert for two"),
        (dict(policies=[medium], preset="medium-expert"), DatasetCreationError, "takes 2 --policy, got 1"),
        (dict(policies=[medium], env_id="MountainCarContinuous-v0"), DatasetCreationError,
         "checkpoint(s) trained on ['Pendulum-v1'] cannot act in 'MountainCarContinuous-v0'"),
        (dict(policies=["random"]), DatasetCreationError, "no env to collect in: pass --env ENV"),
        (dict(policies=["random"], env_id="Nope-v0"), UnknownEnvError, "gymnasium does not know the env id 'Nope-v0'"),
        (dict(policies=["random"], env_id=PENDULUM, preset="medium-replay"), DatasetCreationError,
         "medium-replay datasets come from a training run's replay buffer"),
        (dict(policies=["random"], env_id=PENDULUM, env_kwargs={"bogus": 1}), EnvError,
         "--env-kwargs {'bogus': 1} do not work with Pendulum-v1"),
        # Its reference episodes would never end.
        (dict(policies=["random"], env_id=PENDULUM, env_kwargs={"max_episode_steps": -1}), EnvError,
         "Pendulum-v1 with --env-kwargs {'max_episode_steps': -1} has no time limit"),
        (dict(policies=["random"], env_id="FrozenLake-v1"), EnvError, "FrozenLake-v1 observes Discrete(16)"),
        (dict(policies=["random"], env_id=PENDULUM, env_kwargs={"max_episode_steps": -5}), EnvError,
         "--env-kwargs {'max_episode_steps': -5} do not work with Pendulum-v1"),
    ]
    for kwargs, error, message in create_cases:
        with pytest.raises(error) as err:
            create_dataset("pendulum/x-v0", steps=10, **kwargs)
        assert message in str(err.value), kwargs
    with pytest.raises(DatasetError, match=r"ref_max_score \(-1000000.0\) must exceed ref_min_score \(-"):
        create_dataset("pendulum/x-v0", ["random"], 10, env_id=PENDULUM, env_kwargs=SHORT, expert=-1e6,
                       ref_episodes=1)
    with pytest.raises(DatasetError, match="malformed dataset id"):
        create_dataset("bad id", ["random"], 10, env_id=PENDULUM)
    with pytest.raises(DatasetError, match="'pendulum/taken-v0' already exists"):
        create_dataset("pendulum/taken-v0", ["random"], 5, env_id=PENDULUM)


def test_cli_create_list_show_and_minari_list(dataset_store, capsys):
    assert run_cli("datasets", "list") == 0
    assert "no datasets in" in capsys.readouterr().out
    assert run_cli("datasets", "create", "pendulum/cli-v0", "--env", PENDULUM, "--env-kwargs",
                   '{"max_episode_steps": 20}', "--policy", "random", "--steps", "45", "--ref-max-score", "-10",
                   "--ref-episodes", "1") == 0
    assert "wrote pendulum/cli-v0" in capsys.readouterr().out
    assert run_cli("datasets", "list") == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split() == ["ID", "ENV", "EPISODES", "STEPS", "KIND"]
    assert listed[2].split() == ["pendulum/cli-v0", PENDULUM, "3", "45", "random"]
    assert run_cli("datasets", "show", "pendulum/cli-v0") == 0
    shown = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    _, info = load_transitions("pendulum/cli-v0")
    normalised = 100 * (info.mean_return - info.ref_min_score) / (-10 - info.ref_min_score)
    assert shown["episodes"].strip() == "3" and shown["transitions"].strip() == "45"
    assert shown["mean return"].strip() == f"{info.mean_return:.3f} (normalised {normalised:.1f})"
    assert shown["normalised 0 / 100"].strip().startswith(f"{info.ref_min_score:.3f} (random) / -10.000 (expert)")
    assert shown["observation space"].strip() == "Box([-1. -1. -8.], [1. 1. 8.], (3,), float32)"
    assert shown["env"].strip() == "Pendulum-v1 kwargs={} max_episode_steps=20"
    assert shown["content sha256"].strip() == dataset_content_digest("pendulum/cli-v0")  # what sweeps compare
    out = subprocess.run([sys.executable, "-m", "minari.cli", "list", "local"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, check=True).stdout
    assert "pendulum/cli-v0" in out


def test_cli_medium_replay_from_a_saved_buffer(dataset_store, tmp_path, capsys):
    replay = collect(PENDULUM, SHORT, None, 25, seed=1).exclude("collector")
    replay.memmap(tmp_path / "replay")
    assert run_cli("datasets", "create", "pendulum/replay-v0", "--replay", str(tmp_path / "replay"), "--env",
                   PENDULUM, "--env-kwargs", '{"max_episode_steps": 20}') == 0
    transitions, info = load_transitions("pendulum/replay-v0")
    assert_same_transitions(transitions, replay)
    assert info.ref_min_score is None


def test_cli_errors_are_one_line_with_status_2(dataset_store, tmp_path, capsys):
    cases = [
        (["show", "pendulum/none-v0"], "cqlsac datasets show: error: dataset 'pendulum/none-v0' is not in the local "
                                       "Minari store"),
        (["create", "pp/x-v0", "--policy", str(tmp_path / "missing.pt"), "--steps", "5"],
         f"cqlsac datasets create: error: no checkpoint at {tmp_path / 'missing.pt'}"),
        (["create", "pp/x-v0", "--env", PENDULUM, "--policy", "random"],
         "cqlsac datasets create: error: create needs --policy CHECKPOINT|random and --steps N"),
        (["create", "pp/x-v0", "--replay", str(tmp_path), "--env", PENDULUM],
         f"cqlsac datasets create: error: --replay {tmp_path} is not a memory-mapped TensorDict"),
        (["create", "pp/x-v0", "--replay", str(tmp_path), "--policy", "random", "--env", PENDULUM],
         "cqlsac datasets create: error: medium-replay takes --replay DIR and --env ENV"),
    ]
    for argv, message in cases:
        assert run_cli("datasets", *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message), (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err

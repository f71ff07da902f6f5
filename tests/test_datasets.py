"""cqlsac.datasets: atomic Minari writes, and offline replay that matches Minari transition for transition."""

import dataclasses
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

from cqlsac.components.envs import make_env
from cqlsac.datasets import (
    DatasetError,
    Episode,
    check_spaces,
    list_local_datasets,
    load_offline_replay,
    load_transitions,
    normalized_score,
    transitions_to_episodes,
    write_dataset,
)

ENV = "Pendulum-v1"  # obs Box(3) in [-1,1]x[-1,1]x[-8,8], action Box(1) in [-2, 2]


def make_episode(rng, steps, end):
    """Random Pendulum-shaped episode ending in 'terminated', 'truncated' or neither ('cut')."""
    flags = np.zeros((2, steps), bool)
    if end != "cut":
        flags[0 if end == "terminated" else 1, -1] = True
    return Episode(observations=rng.uniform(-1, 1, (steps + 1, 3)).astype(np.float32),
                   actions=rng.uniform(-2, 2, (steps, 1)).astype(np.float32),
                   rewards=rng.normal(size=steps), terminations=flags[0], truncations=flags[1])


def write(dataset_id, episodes, **kwargs):
    kwargs.setdefault("ref_min_score", -10.0)
    kwargs.setdefault("ref_max_score", 30.0)
    return write_dataset(dataset_id, episodes, ENV, algorithm_name="test", description="test data", **kwargs)


def expected_returns_to_go(rewards, gamma):
    out, g = [], 0.0
    for r in reversed([float(r) for r in rewards]):
        g = r + gamma * g
        out.append(g)
    return np.array(out[::-1], dtype=np.float32)


def assert_matches_minari(dataset_id, transitions, gamma):
    """Every loaded transition is the one `minari.load_dataset` iterates, in order."""
    row = 0
    for ep in minari.load_dataset(dataset_id).iterate_episodes():
        t = len(ep.rewards)
        got = transitions[row:row + t]
        np.testing.assert_array_equal(got["observation"].numpy(), ep.observations[:-1].astype(np.float32))
        np.testing.assert_array_equal(got["next", "observation"].numpy(), ep.observations[1:].astype(np.float32))
        np.testing.assert_array_equal(got["action"].numpy(), ep.actions.astype(np.float32))
        np.testing.assert_array_equal(got["next", "reward"].numpy(), ep.rewards.astype(np.float32)[:, None])
        np.testing.assert_array_equal(got["next", "terminated"].numpy(), ep.terminations[:, None])
        np.testing.assert_array_equal(got["next", "truncated"].numpy(), ep.truncations[:, None])
        np.testing.assert_array_equal(got["next", "done"].numpy(), (ep.terminations | ep.truncations)[:, None])
        np.testing.assert_array_equal(got["mc_return"].numpy(), expected_returns_to_go(ep.rewards, gamma)[:, None])
        assert got["episode"].tolist() == [ep.id] * t
        row += t
    assert row == transitions.shape[0]


def test_load_matches_minari_and_source_with_terminations_and_truncations(dataset_store):
    rng = np.random.default_rng(0)
    episodes = [make_episode(rng, 7, "terminated"), make_episode(rng, 5, "truncated"), make_episode(rng, 4, "cut")]
    write("pendulum/mixed-v0", episodes)
    transitions, info = load_transitions("pendulum/mixed-v0", gamma=0.9)
    assert_matches_minari("pendulum/mixed-v0", transitions, gamma=0.9)
    # ... and Minari holds what was written.
    np.testing.assert_array_equal(transitions["observation"][:7].numpy(), episodes[0].observations[:-1])
    np.testing.assert_array_equal(transitions["next", "observation"][6].numpy(), episodes[0].observations[-1])
    assert transitions["next", "terminated"].flatten().tolist() == [False] * 6 + [True] + [False] * 9
    assert transitions["next", "truncated"].flatten().tolist() == [False] * 11 + [True] + [False] * 4
    assert transitions["episode"].tolist() == [0] * 7 + [1] * 5 + [2] * 4
    assert transitions["observation"].dtype == transitions["next", "reward"].dtype == torch.float32
    returns = [math.fsum(e.rewards.tolist()) for e in episodes]
    assert (info.num_episodes, info.num_transitions) == (3, 16)
    assert info.mean_return == math.fsum(returns) / 3
    assert (info.ref_min_score, info.ref_max_score) == (-10.0, 30.0)
    assert info.env_id == ENV and info.observation_space == gym.make(ENV).observation_space
    assert normalized_score(info.mean_return, info) == 100 * (info.mean_return + 10) / 40


def test_single_episode_dataset(dataset_store):
    episode = make_episode(np.random.default_rng(1), 6, "truncated")
    write("single-v0", [episode])
    transitions, info = load_transitions("single-v0")
    assert_matches_minari("single-v0", transitions, gamma=0.99)
    assert (info.num_episodes, info.num_transitions) == (1, 6)


def test_replay_buffer_samples_transitions_of_the_dataset(dataset_store):
    write("pendulum/rb-v0", [make_episode(np.random.default_rng(2), 9, "terminated")])
    replay, info = load_offline_replay("pendulum/rb-v0", batch_size=5)
    transitions, _ = load_transitions("pendulum/rb-v0")
    assert len(replay) == 9
    batch = replay.sample()
    assert batch.batch_size == torch.Size([5])
    assert batch["mc_return"].shape == batch["next", "reward"].shape == batch["next", "done"].shape == (5, 1)
    for row in batch.unbind(0):  # each sampled row is one dataset transition, all keys together
        index = int((transitions["observation"] == row["observation"]).all(-1).nonzero()[0, 0])
        assert (transitions[index] == row).all()
    on_device, _ = load_offline_replay("pendulum/rb-v0", batch_size=5, device="meta")  # "meta" stands in for a GPU
    assert on_device.sample()["observation"].device == torch.device("meta")


def test_cache_is_reused_then_rebuilt_when_the_dataset_changes(dataset_store):
    _, cache = dataset_store
    rng = np.random.default_rng(3)
    write("pendulum/cached-v0", [make_episode(rng, 5, "terminated")])
    first, _ = load_transitions("pendulum/cached-v0")
    folders = list((cache / "offline" / "pendulum" / "cached-v0").iterdir())
    assert len(folders) == 1
    again, _ = load_transitions("pendulum/cached-v0")
    assert list((cache / "offline" / "pendulum" / "cached-v0").iterdir()) == folders
    assert (again == first).all()
    replacement = make_episode(rng, 8, "truncated")
    write("pendulum/cached-v0", [replacement], overwrite=True)
    rebuilt, _ = load_transitions("pendulum/cached-v0")
    np.testing.assert_array_equal(rebuilt["action"].numpy(), replacement.actions)
    assert [p.name for p in (cache / "offline" / "pendulum" / "cached-v0").iterdir()] != [f.name for f in folders]
    assert len(list((cache / "offline" / "pendulum" / "cached-v0").iterdir())) == 1


def test_unknown_id_lists_local_ids_and_how_to_get_one(dataset_store):
    write("pendulum/known-v0", [make_episode(np.random.default_rng(4), 3, "terminated")])
    with pytest.raises(DatasetError) as err:
        load_offline_replay("pendulum/missing-v0", batch_size=4)
    message = str(err.value)
    assert "'pendulum/missing-v0' is not in the local Minari store" in message
    assert "local datasets: pendulum/known-v0" in message
    assert "cqlsac datasets create pendulum/missing-v0" in message
    assert "download=True" in message and "minari download pendulum/missing-v0" in message
    assert "\n" not in message


def test_malformed_id_is_rejected(dataset_store):
    with pytest.raises(DatasetError, match="malformed dataset id 'no version'.*'namespace/name-v0'"):
        load_transitions("no version")


def test_download_true_calls_minari_download(dataset_store, monkeypatch):
    episode = make_episode(np.random.default_rng(5), 4, "terminated")
    calls = []

    def fake_download(dataset_id, force_download=False):  # stands in for the network
        calls.append(dataset_id)
        write(dataset_id, [episode])

    monkeypatch.setattr(minari, "download_dataset", fake_download)
    with pytest.raises(DatasetError, match="not in the local Minari store"):
        load_transitions("remote/data-v0")  # download=False never calls it
    assert calls == []
    transitions, info = load_transitions("remote/data-v0", download=True)
    assert calls == ["remote/data-v0"]
    np.testing.assert_array_equal(transitions["action"].numpy(), episode.actions)
    load_transitions("remote/data-v0", download=True)  # already local: no second download
    assert calls == ["remote/data-v0"]

    def failing_download(dataset_id, force_download=False):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(minari, "download_dataset", failing_download)
    with pytest.raises(DatasetError, match=r"could not download dataset 'remote/other-v0' \(ConnectionError: no route"):
        load_transitions("remote/other-v0", download=True)


def test_truncated_hdf5_file_is_a_clear_error(dataset_store):
    _, cache = dataset_store
    path = write("pendulum/broken-v0", [make_episode(np.random.default_rng(6), 50, "terminated")])
    data_file = path / "data" / "main_data.hdf5"
    with open(data_file, "r+b") as f:
        f.truncate(data_file.stat().st_size // 2)
    with pytest.raises(DatasetError) as err:
        load_transitions("pendulum/broken-v0")
    assert str(err.value).startswith("dataset 'pendulum/broken-v0' at ")
    assert "is corrupted or truncated" in str(err.value) and "minari delete pendulum/broken-v0" in str(err.value)
    assert os.listdir(cache / "offline" / "pendulum" / "broken-v0") == []  # no half-built cache left


def test_file_damaged_after_a_good_load_is_detected(dataset_store):
    path = write("pendulum/later-v0", [make_episode(np.random.default_rng(7), 50, "terminated")])
    load_transitions("pendulum/later-v0")
    (path / "data" / "main_data.hdf5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DatasetError, match="is corrupted or truncated"):
        load_transitions("pendulum/later-v0")


def test_spaces_are_checked_against_the_env(dataset_store):
    write("pendulum/spaces-v0", [make_episode(np.random.default_rng(8), 3, "terminated")])
    _, info = load_transitions("pendulum/spaces-v0")
    check_spaces(info, make_env(ENV))  # the recording env fits
    with pytest.raises(DatasetError) as err:
        check_spaces(info, make_env("MountainCarContinuous-v0"))
    assert str(err.value) == (
        "dataset 'pendulum/spaces-v0' does not fit the env: its observation space is shape (3,), "
        "low [-1. -1. -8.], high [1. 1. 8.] but the env's is shape (2,), low [-1.2  -0.07], high [0.6  0.07]; "
        "use the env the dataset was recorded on (Pendulum-v1) or a dataset of this env")
    narrower = dataclasses.replace(info, action_space=gym.spaces.Box(-1.0, 1.0, (1,), np.float32))
    with pytest.raises(DatasetError, match=r"its action space is shape \(1,\), low \[-1.\], high \[1.\] "
                                           r"but the env's is shape \(1,\), low \[-2.\], high \[2.\]"):
        check_spaces(narrower, make_env(ENV))


def test_interrupted_write_leaves_nothing_under_the_id(dataset_store, monkeypatch):
    root, _ = dataset_store
    real = minari.create_dataset_from_buffers

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)  # the whole dataset is on disk, in the temporary root
        raise KeyboardInterrupt

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write("pendulum/interrupted-v0", [make_episode(np.random.default_rng(9), 3, "terminated")])
    assert not (root / "pendulum" / "interrupted-v0").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # temp root removed
    assert minari.list_local_datasets() == {} and list_local_datasets() == {}


def test_existing_id_needs_overwrite(dataset_store):
    root, _ = dataset_store
    rng = np.random.default_rng(10)
    write("pendulum/taken-v0", [make_episode(rng, 3, "terminated")])
    with pytest.raises(DatasetError, match=r"'pendulum/taken-v0' already exists .*--overwrite"):
        write("pendulum/taken-v0", [make_episode(rng, 3, "terminated")])
    newer = make_episode(rng, 6, "truncated")
    write("pendulum/taken-v0", [newer], overwrite=True)
    assert minari.load_dataset("pendulum/taken-v0").total_steps == 6
    np.testing.assert_array_equal(next(minari.load_dataset("pendulum/taken-v0").iterate_episodes()).actions,
                                  newer.actions)
    assert list(list_local_datasets()) == ["pendulum/taken-v0"]
    assert [p.name for p in root.iterdir()] == ["pendulum"]


def test_reference_scores_must_be_a_pair_in_order(dataset_store):
    episodes = [make_episode(np.random.default_rng(11), 3, "terminated")]
    with pytest.raises(DatasetError, match="give both reference scores or neither"):
        write("pendulum/refs-v0", episodes, ref_min_score=None)
    with pytest.raises(DatasetError, match=r"ref_max_score \(1.0\) must exceed ref_min_score \(2.0\)"):
        write("pendulum/refs-v0", episodes, ref_min_score=2.0, ref_max_score=1.0)
    for low, high in [(-1.0, float("inf")), (float("-inf"), 1.0), (float("nan"), 1.0)]:  # a score of 0 or NaN always
        with pytest.raises(DatasetError, match="reference scores must be finite numbers"):
            write("pendulum/refs-v0", episodes, ref_min_score=low, ref_max_score=high)
    write("pendulum/refs-v0", episodes, ref_min_score=None, ref_max_score=None)
    _, info = load_transitions("pendulum/refs-v0")
    assert "ref_min_score" not in info.metadata
    with pytest.raises(DatasetError, match="has no reference scores; re-create it with an expert"):
        normalized_score(0.0, info)


def test_written_without_jax(dataset_store, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # any `import jax` now fails
    write("pendulum/nojax-v0", [make_episode(np.random.default_rng(12), 3, "terminated")])
    assert minari.load_dataset("pendulum/nojax-v0").total_steps == 3


def test_minari_metadata_and_minari_cli_see_the_dataset(dataset_store):
    write("pendulum/visible-v0", [make_episode(np.random.default_rng(13), 3, "terminated")],
          extra_metadata={"seed": 7})
    dataset = minari.load_dataset("pendulum/visible-v0")
    assert dataset.storage.metadata["ref_min_score"] == -10.0
    assert dataset.storage.metadata["ref_max_score"] == 30.0
    assert dataset.storage.metadata["cqlsac"] == {"seed": 7}
    assert minari.get_normalized_score(dataset, np.array(10.0)) == 0.5
    out = subprocess.run([sys.executable, "-m", "minari.cli", "list", "local"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, check=True).stdout
    assert "pendulum/visible-v0" in out


def test_transitions_split_into_episodes_at_every_boundary():
    obs = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)
    next_obs = obs + 1
    next_obs[6] = 100.0  # discontinuity: step 7 does not start where step 6 ended
    terminated = torch.zeros(10, 1, dtype=torch.bool)
    terminated[2] = True
    truncated = torch.zeros(10, 1, dtype=torch.bool)
    truncated[4] = True
    traj_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 4, 4])  # new trajectory at 8 without a flag
    td = TensorDict({"observation": obs, "action": -obs[:, :1], "collector": {"traj_ids": traj_ids},
                     "next": {"observation": next_obs, "reward": obs[:, :1] / 10, "terminated": terminated,
                              "truncated": truncated, "done": terminated | truncated}}, batch_size=[10])
    episodes = transitions_to_episodes(td)
    assert [len(e) for e in episodes] == [3, 2, 2, 1, 2]
    assert [e.terminations.tolist() for e in episodes] == [[0, 0, 1], [0, 0], [0, 0], [0], [0, 0]]
    assert [e.truncations.tolist() for e in episodes] == [[0, 0, 0], [0, 1], [0, 1], [1], [0, 1]]
    np.testing.assert_array_equal(episodes[2].observations[:, 0], [5.0, 6.0, 100.0])
    np.testing.assert_array_equal(episodes[4].observations[:, 0], [8.0, 9.0, 10.0])
    np.testing.assert_array_equal(np.concatenate([e.actions for e in episodes]), td["action"].numpy())
    np.testing.assert_array_equal(np.concatenate([e.rewards for e in episodes]), td["next", "reward"].flatten().numpy())
    # Rows of a batched collector are split one by one.
    assert [len(e) for e in transitions_to_episodes(torch.stack([td, td]))] == [3, 2, 2, 1, 2] * 2

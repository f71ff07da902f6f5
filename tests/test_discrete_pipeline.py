"""Discrete actions through every stage and command: datasets by name, the seed's fine-tuning from
scratch, `cqlsac eval`, and the options of one action family refused for the other."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrl.data import Categorical, OneHot, Unbounded
from torchrl.envs.utils import ExplorationType

from cqlsac.components.config import NetworkConfig
from cqlsac.components.evaluation import evaluate_policy
from cqlsac.components.networks import make_actor
from cqlsac.datasets import Episode, create_dataset, load_transitions, write_dataset
from cqlsac.pipeline import ConfigError, Pipeline, PipelineConfig
from cqlsac.pipeline.cli import main
from cqlsac.pipeline.pipeline import check_action_family
from cqlsac.pipeline.stages import lowest_window_mean

TINY = [
    "env.id=CartPole-v1", "network.actor_hidden=[16,16]", "network.critic_hidden=[16,16]",
    "pretrain.frames=400", "pretrain.init_random_frames=200", "pretrain.frames_per_batch=100",
    "pretrain.eval_every=200", "pretrain.eval_episodes=1", "pretrain.batch_size=32",
    "dataset.steps=300", "dataset.preset=final", "offline.updates=20", "offline.batch_size=32", "offline.log_every=10",
    "offline.loss.cql_weight=1.0", "offline.loss.target_entropy=-2.0", "offline.optim.critic_grad_clip=1.0",
    "finetune.frames=200", "finetune.eval_every=100", "finetune.eval_episodes=2", "finetune.batch_size=32",
    "baseline.frames=200", "baseline.init_random_frames=100", "baseline.eval_every=100", "baseline.eval_episodes=2",
    "baseline.batch_size=32", "evaluate.episodes=3",
]


def run(workdir: Path, capsys, *extra) -> dict:
    assert main(["run", *TINY, f"output_dir={workdir / 'runs'}", f"cache_dir={workdir / 'cache'}", *extra]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    return json.loads((run_dir / "summary.json").read_text())


def test_a_discrete_env_runs_every_stage_and_command(tmp_path, dataset_store, capsys):
    summary = run(tmp_path, capsys)
    assert set(summary["stage_seconds"]) == {"pretrain", "dataset", "offline", "finetune", "baseline", "evaluate"}
    # CartPole-v1 pays 1 per step, for 1 to 500 steps.
    assert 1 <= summary["final_eval_return"] <= 500 and summary["finetune_evals"][0][0] == 0
    dataset_id = summary["dataset_id"]
    transitions, info = load_transitions(dataset_id)
    assert transitions["action"].dtype == torch.int64 and transitions["action"].shape == (300,)
    assert set(transitions["action"].unique().tolist()) <= {0, 1} and info.action_space.n == 2

    assert main(["eval", summary["run_dir"], "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["env"] == "CartPole-v1"
    modes = []
    with pytest.MonkeyPatch.context() as patch:  # the flag reaches the evaluation as its exploration type
        patch.setattr("cqlsac.components.evaluation.evaluate_policy",
                      lambda actor, env_id, kwargs, episodes, seed, exploration: modes.append(exploration) or [1.0])
        for flags in ([], ["--sample-actions"]):
            assert main(["eval", summary["run_dir"], "--episodes", "1", *flags]) == 0
            assert json.loads(capsys.readouterr().out)["sampled_actions"] == bool(flags)
    assert modes == [ExplorationType.DETERMINISTIC, ExplorationType.RANDOM]
    assert main(["datasets", "show", dataset_id]) == 0
    assert "Discrete(2)" in capsys.readouterr().out

    # The seed's recipe: a fresh agent on the named dataset, CQL throughout, one merged buffer.
    scratch = run(tmp_path, capsys, f"dataset.name={dataset_id}", "finetune.start=scratch", "finetune.mixing=merged",
                  "finetune.cql_weight=null", "finetune.init_random_frames=100", "stages=[finetune]")
    assert set(scratch["stage_seconds"]) == {"dataset", "finetune"}  # no offline stage is read
    finetune = json.loads((Path(scratch["stage_outputs"]["finetune"]) / "outputs.json").read_text())
    ends = [end for end, _, _ in finetune["episodes"]]
    assert ends and ends == sorted(set(ends)) and ends[-1] <= 200  # frames at each episode's end, within the budget
    assert all(ret == length for _, ret, length in finetune["episodes"])  # 1 per step
    assert sum(length for _, _, length in finetune["episodes"]) == ends[-1]  # one env: the episodes fill the frames


def test_discrete_datasets_round_trip_exactly(dataset_store):
    rng = np.random.default_rng(0)
    episodes = [Episode(observations=rng.standard_normal((t + 1, 4)).astype(np.float32),
                        actions=rng.integers(0, 2, t), rewards=rng.standard_normal(t),
                        terminations=np.eye(1, t, t - 1, dtype=bool)[0], truncations=np.zeros(t, bool))
                for t in (5, 3)]
    write_dataset("test/cartpole-v0", episodes, "CartPole-v1", algorithm_name="test", description="test")
    transitions, _ = load_transitions("test/cartpole-v0")
    assert transitions["action"].tolist() == [int(a) for e in episodes for a in e.actions]
    assert torch.equal(transitions["observation"][:5], torch.as_tensor(episodes[0].observations[:-1]))


def test_a_random_discrete_dataset_and_its_reference_scores(dataset_store):
    create_dataset("test/cartpole-random-v0", ["random"], 100, env_id="CartPole-v1", expert=500.0)
    _, info = load_transitions("test/cartpole-random-v0")
    assert info.ref_max_score == 500.0 and 0 < info.ref_min_score < 100


def test_evaluation_with_sampled_actions_and_the_lowest_window():
    returns = evaluate_policy(None, "CartPole-v1", {}, 4, seed=3)
    assert returns == evaluate_policy(None, "CartPole-v1", {}, 4, seed=3)  # its own seeded generator

    torch.manual_seed(0)
    actor = make_actor(Unbounded(shape=(4,)), Categorical(2), NetworkConfig(actor_hidden=(8,)))
    deterministic = evaluate_policy(actor, "CartPole-v1", {}, 4, seed=3)
    sampled = []
    for _ in range(2):
        torch.manual_seed(1)  # sampling draws from torch's generator
        sampled.append(evaluate_policy(actor, "CartPole-v1", {}, 4, seed=3, exploration=ExplorationType.RANDOM))
    assert sampled[0] == sampled[1] != deterministic
    assert deterministic == evaluate_policy(actor, "CartPole-v1", {}, 4, seed=3)
    assert lowest_window_mean([1.0, 5.0, 2.0, 0.0, 9.0], 2) == 1.0 and lowest_window_mean([1.0], 2) is None


@pytest.mark.parametrize("override, message", [
    ("offline.loss.num_actions=4", "offline.loss.num_actions samples continuous actions; CartPole-v1 has discrete"),
    ("network.scale_lb=0.01", "network.scale_lb bounds a Gaussian's scale; CartPole-v1 has discrete actions"),
])
def test_continuous_only_options_with_a_discrete_env_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        Pipeline(PipelineConfig.from_yaml(None, ["env.id=CartPole-v1", override])).check([])


def test_discrete_only_options_with_a_continuous_env_are_config_errors():
    cfg = PipelineConfig.from_yaml(None, ["offline.loss.cql_subtracted=mean_over_actions"])
    with pytest.raises(ConfigError, match="offline.loss.cql_subtracted='mean_over_actions' is for discrete actions"):
        Pipeline(cfg).check([])


def test_an_action_space_of_neither_family_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a bounded \\(Box\\) or a discrete action space, got OneHot"):
        check_action_family(PipelineConfig(), OneHot(3))

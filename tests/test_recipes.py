"""The fine-tuning recipes: how a recipe's settings layer under a config, and the building blocks they
use (a frozen warm-up, online data only, the offline optimiser kept) in a tiny pipeline."""

import csv
import json
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from cqlsac.components.checkpoints import load_agent, save_agent
from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.envs import make_env
from cqlsac.components.replay import MixedReplay
from cqlsac.components.update import make_agent
from cqlsac.pipeline.cli import main
from cqlsac.pipeline.config import ConfigError, PipelineConfig, bundled_configs

RECIPES = ("cql", "calql", "seed", "wsrl", "rlpd")


def test_every_recipe_is_bundled_and_lies_under_the_config_and_overrides(tmp_path):
    assert set(bundled_configs("cqlsac.configs.recipes")) == set(RECIPES)
    rlpd = PipelineConfig.from_yaml(None, ["recipe=rlpd"])
    assert (rlpd.network.num_critics, rlpd.offline.loss.target_subset, rlpd.finetune.start) == (10, 2, "scratch")
    assert rlpd.network.actor_hidden == (64, 64)  # what the recipe leaves alone keeps the pipeline's default
    assert PipelineConfig.from_yaml(None, ["recipe=rlpd", "network.num_critics=5"]).network.num_critics == 5
    path = tmp_path / "c.yaml"
    path.write_text("recipe: wsrl\nfinetune:\n  warmup_frames: 1000\n")
    wsrl = PipelineConfig.from_yaml(path)
    assert (wsrl.finetune.warmup_frames, wsrl.finetune.keep_optimizer, wsrl.finetune.optim.actor_every) == (1000, True, 4)
    assert PipelineConfig.from_yaml(wsrl.to_yaml(tmp_path / "again.yaml") and tmp_path / "again.yaml") == wsrl
    # Named on the command line, a recipe lies over the config file: lunarlander.yaml's half an update
    # per frame does not replace RLPD's four; the command line's own keys still win.
    assert PipelineConfig.from_yaml("lunarlander").finetune.utd_ratio == 0.5
    assert PipelineConfig.from_yaml("lunarlander", ["recipe=rlpd"]).finetune.utd_ratio == 4.0
    assert PipelineConfig.from_yaml("lunarlander", ["recipe=rlpd", "finetune.utd_ratio=2"]).finetune.utd_ratio == 2.0
    path.write_text("recipe: rlpd\nfinetune:\n  utd_ratio: 0.5\n")  # in the file, under the file's keys
    assert PipelineConfig.from_yaml(path).finetune.utd_ratio == 0.5
    with pytest.raises(ConfigError, match="recipe must be one of \\['calql', 'cql', 'rlpd', 'seed', 'wsrl'\\]"):
        PipelineConfig.from_yaml(None, ["recipe=td3"])
    with pytest.raises(ConfigError, match="offline.loss.target_subset \\(2\\) is more than network.num_critics \\(1\\)"):
        PipelineConfig.from_yaml(None, ["recipe=rlpd", "network.num_critics=1"])


def rows(value, n=8):
    return TensorDict({"x": torch.full((n, 1), float(value)), "next": {"done": torch.zeros(n, 1, dtype=torch.bool)}}, [n])


def test_no_update_before_the_warm_up_and_online_rows_only_after_it():
    offline = ReplayBuffer(storage=LazyTensorStorage(8))
    offline.extend(rows(1))
    online = ReplayBuffer(storage=LazyTensorStorage(16))
    data = MixedReplay(offline, online, batch_size=4, keys=["x"], start_fraction=0.0, warmup_frames=200)
    assert not data.ready(100) and not data.ready(200) and data.ready(300)
    data.add(rows(0))
    assert data.sample()["x"].sum().item() == 0  # the offline data is dropped once online rows exist


def test_the_offline_optimiser_state_is_kept_with_the_fine_tuning_learning_rates(tmp_path):
    env = make_env("Pendulum-v1")
    network = NetworkConfig(actor_hidden=(8,), critic_hidden=(8,))
    offline = make_agent(env, network, LossConfig(), OptimConfig())
    batch = TensorDict({"observation": torch.randn(16, 3), "action": torch.rand(16, 1) * 4 - 2,
                        "next": {"observation": torch.randn(16, 3), "reward": torch.randn(16, 1),
                                 "done": torch.zeros(16, 1, dtype=torch.bool),
                                 "terminated": torch.zeros(16, 1, dtype=torch.bool)}}, [16])
    for _ in range(3):
        offline.update(batch)
    save_agent(tmp_path / "agent.pt", offline.loss, offline.optimizer)
    online = make_agent(env, network, LossConfig(cql_weight=0.0), OptimConfig(actor_lr=1e-5, critic_lr=2e-5))
    load_agent(tmp_path / "agent.pt", online.loss, online.optimizer)
    kept, saved = online.optimizer.state_dict(), offline.optimizer.state_dict()
    for key, state in saved["state"].items():
        assert all(torch.equal(state[name], kept["state"][key][name]) for name in ("exp_avg", "exp_avg_sq", "step"))
    assert [g["lr"] for g in online.optimizer.param_groups] == [1e-5, 2e-5, 3e-4]


def test_the_warm_start_recipe_in_a_tiny_pipeline(tmp_path, dataset_store, capsys):
    tiny = ["recipe=wsrl", "network.actor_hidden=[16,16]", "network.critic_hidden=[16,16]", "network.num_critics=4",
            "pretrain.frames=400", "pretrain.init_random_frames=200", "pretrain.frames_per_batch=100",
            "pretrain.eval_every=200", "pretrain.eval_episodes=1", "pretrain.batch_size=32", "dataset.steps=400",
            "offline.updates=20", "offline.batch_size=32", "offline.log_every=10", "offline.loss.num_actions=2",
            "finetune.frames=400", "finetune.warmup_frames=200", "finetune.eval_every=100", "finetune.eval_episodes=1",
            "finetune.batch_size=32", "finetune.utd_ratio=2", "finetune.optim.actor_every=2", "evaluate.episodes=1",
            "stages=[evaluate]", f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["run", *tiny]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    with open(run_dir / "logs" / "scalars" / "finetune" / "loss_qvalue.csv") as f:
        logged = [int(float(row[0])) for row in csv.reader(f)]
    assert logged == [300, 400]  # the first 200 frames (two batches) were collected with no update
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [frames for frames, _ in summary["finetune_evals"]] == [0, 100, 200, 300, 400]


def test_sac_from_scratch_is_the_same_stage_under_every_recipe():
    from cqlsac.pipeline import Pipeline

    keys = {Pipeline(PipelineConfig.from_yaml(None, [f"recipe={name}"])).stage_key("baseline") for name in RECIPES}
    assert keys == {Pipeline(PipelineConfig()).stage_key("baseline")}

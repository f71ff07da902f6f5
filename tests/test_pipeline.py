"""The declarative pipeline: config loading, stage planning and caching, a tiny end-to-end run."""

import dataclasses
import json
import signal
import threading
import typing
import warnings
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from cqlsac.components.collector import EpisodeReturns
from cqlsac.components.replay import EpisodeAccumulator, MixedReplay
from cqlsac.datasets import dataset_content_digest
from cqlsac.datasets.creation import create_dataset
from cqlsac.pipeline import stages, supervision
from cqlsac.pipeline.cache import ConfigView, UndeclaredConfigRead, stage_lock
from cqlsac.pipeline.cli import main
from cqlsac.pipeline.config import ConfigError, PipelineConfig, StageName
from cqlsac.pipeline.pipeline import Pipeline
from cqlsac.pipeline.stages import STAGES, pick_medium

TINY = [
    "network.actor_hidden=[32,32]", "network.critic_hidden=[32,32]",
    "pretrain.frames=400", "pretrain.init_random_frames=200", "pretrain.frames_per_batch=100",
    "pretrain.eval_every=200", "pretrain.eval_episodes=1", "pretrain.batch_size=64",
    "dataset.steps=400", "dataset.preset=random", "dataset.reference_scores=false",
    "offline.updates=40", "offline.batch_size=64", "offline.log_every=10", "offline.loss.num_actions=4",
    "finetune.frames=400", "finetune.frames_per_batch=100", "finetune.eval_every=200",
    "finetune.eval_episodes=1", "finetune.batch_size=64", "evaluate.episodes=2",
    "baseline.frames=400", "baseline.init_random_frames=200", "baseline.frames_per_batch=100",
    "baseline.eval_every=200", "baseline.eval_episodes=1", "baseline.batch_size=64",
]


@pytest.fixture
def workdir(tmp_path, dataset_store):
    return tmp_path


def tiny(workdir, *extra, cache="cache"):
    return TINY + [f"output_dir={workdir / 'runs'}", f"cache_dir={workdir / cache}", *extra]


def random_dataset(dataset_id, **options):
    """A 200-step Pendulum dataset of random actions in the test's Minari store."""
    create_dataset(dataset_id, ["random"], 200, env_id="Pendulum-v1", **options)


# ---- config ------------------------------------------------------------------------------
def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = PipelineConfig.from_yaml(None, ["finetune.mixing=annealed", "offline.loss.lagrange=true",
                                          "network.critic_hidden=[16,8]", "seed=7", "finetune.cql_weight=null"])
    assert cfg.finetune.mixing == "annealed" and cfg.offline.loss.lagrange is True
    assert cfg.network.critic_hidden == (16, 8) and cfg.network.actor_hidden == (64, 64)  # section defaults kept
    assert cfg.seed == 7 and cfg.finetune.cql_weight is None
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert PipelineConfig.from_yaml(path) == cfg
    assert PipelineConfig.from_yaml(path, ["seed=8"]).seed == 8


@pytest.mark.parametrize("override, message", [
    ("finetune.mixng=fixed", "unknown config key(s) finetune.mixng"),
    ("offline.updates=many", "offline.updates must be an integer"),
    ("offline.loss.lagrange=3", "offline.loss.lagrange must be true or false"),
    ("finetune.mixing=sometimes", "finetune.mixing must be one of"),
    ("offline.loss.cql_weight=-1", "cql_weight=-1.0"),
    ("seed", "must look like key=value"),
    ("finetune.calibrated=true", "finetune.calibrated: Cal-QL changes the CQL penalty"),
    ("finetune.eval_every=250", "finetune.eval_every (250) must be a multiple of finetune.frames_per_batch (100)"),
    ("pretrain.frames_per_batch=300", "pretrain.eval_every (200) must be a multiple of pretrain.frames_per_batch (300)"),
    ("finetune.frames_per_batch=0", "finetune.frames_per_batch must be a positive number of frames, got 0"),
    ("pretrain.frames=450", "pretrain.frames (450) must be a multiple of pretrain.frames_per_batch (200)"),
    ("pretrain.batch_size=-1", "pretrain.batch_size must be positive, got -1"),
    ("pretrain.init_random_frames=-1", "pretrain.init_random_frames must be zero or more, got -1"),
    ("offline.log_every=0", "offline.log_every must be positive, got 0"),
    ("offline.updates=-1", "offline.updates must be zero or more, got -1"),
    ("finetune.utd_ratio=0", "finetune.utd_ratio must be positive, got 0"),
    ("evaluate.episodes=0", "evaluate.episodes must be positive, got 0"),
    ("dataset.medium_level=5", "dataset.medium_level must be in [0, 1], got 5.0"),
    ("dataset.steps=0", "dataset.steps must be positive, got 0"),
    ("network.critic_hidden=[0]", "critic_hidden sizes must be positive"),
    ("stages=offline", "stages must be a list"),
    ("stages=[]", "stages: the list is empty"),
    ("stages=[offline,train]", "stages[1] must be one of 'pretrain', 'dataset', 'offline', 'finetune', 'evaluate' or "
                               "'baseline', got 'train'"),
    ("pretrain.utd_ratio=.inf", "pretrain.utd_ratio must be a finite number, got inf"),  # would update for ever
    ("offline.loss.gamma=.nan", "offline.loss.gamma must be a finite number, got nan"),
    ("offline.updates=true", "offline.updates must be a number, got true"),  # not silently 1
    ("finetune.cql_weight=false", "finetune.cql_weight must be a number, got false"),
    ("network.actor_hidden=[true,64]", "network.actor_hidden must be a list of numbers, got [true, 64]"),
    ("seed=-1", "seed must be in [0, 2**31), got -1"),
    ("seed=2147483648", "seed must be in [0, 2**31), got 2147483648"),
    ("evaluate.seed=-1", "evaluate.seed must be in [0, 2**31), got -1"),
    ("baseline.seed_offset=-5", "seed + baseline.seed_offset must be in [0, 2**31), got -5"),
    ("baseline.num_critics=0", "baseline.num_critics must be positive, got 0"),
    ("recipe=[cql,rlpd]", "recipe must be one of ['calql', 'cql', 'rlpd', 'seed', 'wsrl'], got ['cql', 'rlpd']"),
    ("offline={updates: 1, updates: 2}",
     "override 'offline={updates: 1, updates: 2}': key updates given twice (again on line 1)"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_yaml(None, [override])
    assert message in str(err.value)


def test_cli_reports_config_errors_with_exit_status_2(capsys):
    assert main(["run", "offline.updatez=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key(s) offline.updatez" in err


def test_unknown_stages_are_a_config_error():
    with pytest.raises(ConfigError, match=r"stages: unknown stage\(s\) \['train'\]"):
        Pipeline(PipelineConfig(stages=["pretrain", "train"]))  # built in Python, past the config's validation
    assert typing.get_args(StageName) == stages.STAGE_NAMES  # the names a config takes are the stages there are


def test_pretraining_with_a_named_dataset_is_a_config_error_not_a_run_of_nothing():
    with pytest.raises(ConfigError, match="stages: pretrain trains the policies that record a dataset, and "
                                          "dataset.name=ab/cd-v0 names the dataset to use instead"):
        PipelineConfig.from_yaml(None, ["dataset.name=ab/cd-v0", "stages=[pretrain]"])


def test_named_dataset_replaces_pretrain_and_dataset_stages():
    pipe = Pipeline(PipelineConfig.from_yaml(None, ["dataset.name=pendulum/sac-medium-v0"]))
    assert pipe.plan() == ["dataset", "offline", "finetune", "baseline", "evaluate"]
    assert pipe.table["dataset"].run is stages.use_named_dataset and "pretrain" not in pipe.table
    assert Pipeline(PipelineConfig()).plan(["offline"]) == ["pretrain", "dataset", "offline"]


def test_stage_key_depends_only_on_what_the_stage_reads():
    base = Pipeline(PipelineConfig())
    changed = Pipeline(PipelineConfig.from_yaml(None, ["finetune.offline_fraction=0.25"]))
    for stage in ("pretrain", "dataset", "offline", "baseline"):
        assert base.stage_key(stage) == changed.stage_key(stage)
    for stage in ("finetune", "evaluate"):
        assert base.stage_key(stage) != changed.stage_key(stage)
    baseline_changed = Pipeline(PipelineConfig.from_yaml(None, ["baseline.optim.critic_lr=0.003"]))
    assert [name for name in base.plan() if base.stage_key(name) != baseline_changed.stage_key(name)] == ["baseline"]


@pytest.mark.parametrize("override", ["offline.loss.gamma=0.9", "evaluate.seed=5"])
def test_pretraining_reruns_when_its_discount_or_evaluation_episodes_change(override):
    assert Pipeline(PipelineConfig.from_yaml(None, [override])).stage_key("pretrain") != \
        Pipeline(PipelineConfig()).stage_key("pretrain")


def test_with_a_named_dataset_its_files_key_the_stages_after_it(dataset_store):
    after = ("dataset", "offline", "finetune", "evaluate")

    def keys(*overrides):
        pipe = Pipeline(PipelineConfig.from_yaml(None, ["dataset.name=test/named-v0", *overrides]))
        return {name: pipe.stage_key(name) for name in pipe.plan()}

    random_dataset("test/named-v0")
    before = keys()
    assert keys() == before
    random_dataset("test/named-v0", seed=1, overwrite=True)  # other data under the same name
    changed = keys()
    assert all(changed[name] != before[name] for name in after) and changed["baseline"] == before["baseline"]


def test_a_dataset_recorded_with_other_env_kwargs_is_warned_about(workdir):
    def replay(*overrides):
        pipe = Pipeline.from_yaml(None, tiny(workdir, "stages=[dataset]", *overrides))
        pipe.run()
        return pipe.context("offline").offline_replay(4)

    random_dataset("test/light-v0", env_kwargs={"g": 5.0})
    with pytest.warns(UserWarning, match="recorded on Pendulum-v1 with kwargs {'g': 5.0} and a time limit of 200 "
                                         "steps, but the pipeline runs Pendulum-v1 with kwargs {} and 200"):
        replay("dataset.name=test/light-v0")
    random_dataset("test/short-v0", env_kwargs={"max_episode_steps": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay("dataset.name=test/light-v0", "env.kwargs={g: 5.0}")
        replay("dataset.name=test/short-v0", "env.kwargs={max_episode_steps: 100}")


def test_a_dataset_stage_whose_dataset_is_gone_runs_again(workdir):
    pipe = Pipeline(PipelineConfig.from_yaml(None, tiny(workdir)))
    stage_dir = pipe.stage_dir("dataset")
    stage_dir.mkdir(parents=True)
    (stage_dir / "outputs.json").write_text(json.dumps({"dataset_id": "test/gone-v0"}))
    assert pipe.finished_outputs("dataset") is None
    random_dataset("test/gone-v0")
    assert pipe.finished_outputs("dataset") == {"dataset_id": "test/gone-v0"}


def test_a_stage_locked_by_another_run_is_waited_for(tmp_path, capsys):
    events = []
    held, release = threading.Event(), threading.Event()

    def other_run():
        with stage_lock(tmp_path, "offline"):
            held.set()
            release.wait()
            events.append("other run done")

    other = threading.Thread(target=other_run)
    other.start()
    held.wait()
    threading.Timer(0.2, release.set).start()
    with stage_lock(tmp_path, "offline"):  # blocks until the other run lets go
        events.append("this run")
    other.join()
    assert events == ["other run done", "this run"]
    assert f"[offline] waiting for another run that is computing {tmp_path}" in capsys.readouterr().out


def test_a_stop_signal_ends_the_wait_for_a_locked_stage(tmp_path, monkeypatch):
    held, release = threading.Event(), threading.Event()

    def other_run():
        with stage_lock(tmp_path, "offline"):
            held.set()
            release.wait()

    other = threading.Thread(target=other_run)
    other.start()
    held.wait()
    monkeypatch.setattr(supervision, "_stop_signal", signal.SIGINT)  # what the first SIGINT of a run sets
    try:
        with pytest.raises(supervision.Interrupted):
            with stage_lock(tmp_path, "offline"):
                pass
    finally:
        release.set()
        other.join()


def test_stage_outputs_are_found_from_any_working_directory(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    pipe = Pipeline(PipelineConfig.from_yaml(None, ["cache_dir=relative/cache"]))
    assert pipe.stage_dir("offline").parent == workdir / "relative" / "cache"


def test_tensorboard_logger_without_tensorboard_is_a_config_error(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="tensorboard is not installed"):
        PipelineConfig.from_yaml(None, ["logger=tensorboard"])


def test_a_new_stage_version_invalidates_that_stage_and_the_ones_after_it(monkeypatch):
    base = Pipeline(PipelineConfig())
    before = {name: base.stage_key(name) for name in base.table}
    monkeypatch.setattr(stages, "STAGES", tuple(dataclasses.replace(s, version=s.version + 1) if s.name == "offline"
                                                else s for s in STAGES))
    after = Pipeline(PipelineConfig())
    assert [name for name in after.table if after.stage_key(name) != before[name]] == ["offline", "finetune", "evaluate"]


# ---- cache-key safety: a stage reads only what its key covers ----------------------------------
def test_a_stage_cannot_read_a_config_field_its_key_does_not_cover():
    view = ConfigView(PipelineConfig(), ("offline.loss.gamma", "env"), "pretrain")
    assert view.offline.loss.gamma == 0.99 and view.env.id == "Pendulum-v1"
    assert view.checkpoints.online_every == 1000  # how often a stage saves: no key covers it
    for read in (lambda: view.offline.updates, lambda: view.offline.loss.cql_weight, lambda: view.finetune):
        with pytest.raises(UndeclaredConfigRead, match="stage 'pretrain' reads offline|stage 'pretrain' reads finetune"):
            read()


def test_every_declared_read_is_a_config_field():
    config = PipelineConfig()
    for stage in (*STAGES, stages.NAMED_DATASET):
        for path in stage.reads:
            value = config
            for part in path.split("."):
                assert dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}, \
                    f"{stage.name} reads {path}"
                value = getattr(value, part)


# ---- replay mixing and online episodes ----------------------------------------------------
def test_episode_returns_of_one_env_and_of_envs_stepped_together():
    def batch(rewards, done_at):
        rewards = torch.tensor(rewards, dtype=torch.float32)
        done = torch.zeros(rewards.shape, dtype=torch.bool)
        for index in done_at:
            done[index] = True
        return TensorDict({"next": {"reward": rewards.unsqueeze(-1), "done": done.unsqueeze(-1)}}, rewards.shape)

    one = EpisodeReturns()
    one.add(batch([1.0, 2.0, 3.0, 4.0, 5.0], [(1,), (4,)]), frames=5)
    one.add(batch([10.0, 20.0, 30.0], [(1,)]), frames=8)
    # (frames when the episode ended, return, length): 1+2 over 2 steps, 3+4+5, then 10+20 over 2.
    assert one.completed == [(2, 3.0, 2), (5, 12.0, 3), (7, 30.0, 2)]
    assert one.running == {0: (30.0, 1)}

    # Two envs, 3 steps each: step t of both is collected by frames 2 * (t + 1) of the batch.
    two = EpisodeReturns()
    two.add(batch([[1.0, 2.0, 4.0], [10.0, 20.0, 40.0]], [(0, 0), (1, 2)]), frames=6)
    two.add(batch([[8.0, 16.0, 32.0], [80.0, 160.0, 320.0]], [(0, 1)]), frames=12)
    assert two.completed == [(2, 1.0, 1), (6, 70.0, 3), (10, 30.0, 4)]
    assert two.running == {0: (32.0, 1), 1: (560.0, 3)}


def constant_buffer(value, n=50):
    buffer = ReplayBuffer(storage=LazyTensorStorage(n))
    buffer.extend(TensorDict({"x": torch.full((n, 1), float(value)), "extra": torch.zeros(n)}, [n]))
    return buffer


def checkpoint_curve(*returns):
    return [{"frames": 1000 * (i + 1), "return": r} for i, r in enumerate(returns)]


def test_medium_is_the_policy_stopped_early_at_the_level_not_a_later_collapse():
    # random -1000, expert -100, level 1/3: target return -700; no warm-up
    curve = checkpoint_curve(-1300, -900, -650, -100, -120, -700)
    assert pick_medium(curve, -1000.0, -100.0, 1 / 3, 0)["frames"] == 3000  # -650 is nearer than -900
    curve = checkpoint_curve(-1300, -760, -100, -700)  # the jump overshoots: -760 is nearer than -100
    assert pick_medium(curve, -1000.0, -100.0, 1 / 3, 0)["frames"] == 2000
    curve = checkpoint_curve(-1300, -1100, -1000)  # never reached: the nearest of all
    assert pick_medium(curve, -1000.0, -100.0, 1 / 3, 0)["frames"] == 3000


def test_medium_is_never_an_untrained_checkpoint_of_the_random_warm_up():
    curve = checkpoint_curve(-800, -1200, -500, -100)  # the first two: warm-up, no update yet
    assert pick_medium(curve, -1000.0, -100.0, 1 / 3, 2000)["frames"] == 3000
    assert pick_medium(curve, -1000.0, -100.0, 1 / 3, 0)["frames"] == 1000
    assert pick_medium(curve[:2], -1000.0, -100.0, 1 / 3, 2000)["frames"] == 1000  # only warm-up ones: all count


def test_mixed_replay_takes_an_exact_offline_share():
    offline, online = constant_buffer(1), constant_buffer(0)
    fixed = MixedReplay(offline, online, batch_size=40, keys=["x"], start_fraction=0.25)
    batch = fixed.sample()
    assert batch.shape == (40,) and list(batch.keys()) == ["x"]
    assert batch["x"].sum().item() == 10
    annealed = MixedReplay(offline, online, batch_size=40, keys=["x"], start_fraction=1.0, end_fraction=0.0)
    assert [annealed.sample(p)["x"].sum().item() for p in (0.0, 0.5, 1.0)] == [40, 20, 0]
    empty_online = MixedReplay(offline, ReplayBuffer(storage=LazyTensorStorage(5)), 8, ["x"], start_fraction=0.0)
    assert empty_online.sample()["x"].sum().item() == 8


def test_merged_mixing_samples_the_union_uniformly_without_copying_the_offline_data():
    offline, online = constant_buffer(1, n=30), constant_buffer(0, n=10)
    merged = MixedReplay(offline, online, batch_size=40, keys=["x"], merged=True)
    assert merged.offline_fraction(0.0) == 0.75 and len(online) == 10  # 30 of the 40 rows of the union
    torch.manual_seed(0)
    offline_rows = sum(merged.sample()["x"].sum().item() for _ in range(400))
    # 16,000 rows, each offline with p = 0.75: mean 12,000, standard deviation 55.
    assert abs(offline_rows - 12_000) < 5 * 55


def test_episode_accumulator_releases_whole_episodes_with_return_to_go():
    gamma = 0.5
    acc = EpisodeAccumulator(gamma, ["observation", ("next", "reward"), ("next", "done")])

    def steps(rewards, done_at):
        n = len(rewards)
        done = torch.zeros(n, 1, dtype=torch.bool)
        for i in done_at:
            done[i] = True
        return TensorDict({"observation": torch.arange(n, dtype=torch.float32).unsqueeze(-1),
                           "next": {"reward": torch.tensor(rewards).unsqueeze(-1), "done": done}}, [n])

    assert acc.add(steps([1.0, 2.0], [])) is None
    released = acc.add(steps([4.0, 8.0, 16.0], [0]))
    # Episode rewards 1, 2, 4: returns-to-go 1 + 0.5*2 + 0.25*4 = 3, 2 + 0.5*4 = 4, 4.
    assert released["mc_return"].squeeze(-1).tolist() == [3.0, 4.0, 4.0]
    released = acc.add(steps([32.0], [0]))
    assert released["mc_return"].squeeze(-1).tolist() == [8 + 0.5 * 16 + 0.25 * 32, 16 + 0.5 * 32, 32.0]

    # Two envs stepped together (`[num_envs, T]`): each env's unfinished steps are held apart.
    together = EpisodeAccumulator(gamma, ["observation", ("next", "reward"), ("next", "done")])
    released = together.add(torch.stack([steps([1.0, 2.0], [0]), steps([10.0, 20.0], [])]))
    assert released["mc_return"].squeeze(-1).tolist() == [1.0]  # env 0's one-step episode
    released = together.add(torch.stack([steps([4.0, 8.0], [1]), steps([40.0, 80.0], [0])]))
    # Env 0: 2, 4, 8 after its first episode; env 1: 10, 20, 40; in env order.
    assert released["mc_return"].squeeze(-1).tolist() == [2 + 0.5 * 4 + 0.25 * 8, 4 + 0.5 * 8, 8.0,
                                                           10 + 0.5 * 20 + 0.25 * 40, 20 + 0.5 * 40, 40.0]
    assert released["next", "reward"].squeeze(-1).tolist() == [2.0, 4.0, 8.0, 10.0, 20.0, 40.0]


# ---- end to end ----------------------------------------------------------------------------
def test_tiny_pipeline_runs_all_stages_and_reuses_finished_ones(workdir, capsys):
    assert main(["run", *tiny(workdir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    run_dir = workdir / "runs" / lines[-1].rsplit("/", 1)[-1]
    assert lines[-1] == str(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"pretrain", "dataset", "offline", "finetune", "baseline", "evaluate"}
    evaluate = json.loads((Path(summary["stage_outputs"]["evaluate"]) / "outputs.json").read_text())
    # Pendulum-v1: 200 steps of reward in [-16.27, 0] each.
    assert summary["final_eval_return"] == evaluate["mean_return"] and -3300 < evaluate["mean_return"] <= 0
    assert summary["final_normalized_score"] is None  # a random dataset without reference scores
    for name in ("config.yaml", "report.md", "curves.png"):
        assert (run_dir / name).is_file()
    assert (run_dir / "logs" / "scalars" / "offline" / "cql_gap.csv").is_file()
    offline = json.loads((Path(summary["stage_outputs"]["offline"]) / "outputs.json").read_text())
    assert [update for update, _, _ in offline["curve"]] == [10, 20, 30, 40]  # the report's Q panel, kept when reused
    assert PipelineConfig.from_yaml(run_dir / "config.yaml") == PipelineConfig.from_yaml(None, tiny(workdir))

    # Only fine-tuning settings change (merged mode, the offline CQL weight kept): pretrain, dataset,
    # offline and SAC from scratch (the baseline stage), which they do not concern, are reused.
    assert main(["run", *tiny(workdir, "finetune.mixing=merged", "finetune.cql_weight=null")]) == 0
    out = capsys.readouterr().out
    second = json.loads((workdir / "runs" / out.strip().splitlines()[-1].rsplit("/", 1)[-1] / "summary.json").read_text())
    assert set(second["stage_seconds"]) == {"finetune", "evaluate"}
    assert "[offline] reusing" in out and "[baseline] reusing" in out
    assert second["offline_eval_return"] == summary["offline_eval_return"]
    assert second["stage_outputs"]["baseline"] == summary["stage_outputs"]["baseline"]
    assert second["baseline_evals"] == summary["baseline_evals"] and len(summary["baseline_evals"]) == 3


def test_sac_baseline_critics_come_from_their_own_setting(workdir):
    """SAC from scratch ignores the agent's `network.critic_layer_norm` and follows its own key."""
    def baseline(cache, *overrides):
        pipe = Pipeline.from_yaml(None, tiny(workdir, "stages=[baseline]", *overrides, cache=cache))
        pipe.run()
        return pipe.stage_key("baseline"), pipe.outputs["baseline"]["evals"]

    plain_key, plain_agent = baseline("plain", "network.critic_layer_norm=false")
    normalised_key, normalised_agent = baseline("normalised", "network.critic_layer_norm=true")  # computed, not reused
    assert plain_key == normalised_key and plain_agent == normalised_agent  # default: plain critics for both
    _, own = baseline("normalised", "network.critic_layer_norm=true", "baseline.critic_layer_norm=true")
    assert own != plain_agent


def test_same_seed_reproduces_the_same_numbers(workdir):
    first = Pipeline.from_yaml(None, tiny(workdir, "stages=[evaluate]", cache="a")).run()
    before = dataset_content_digest(first["dataset_id"])
    second = Pipeline.from_yaml(None, tiny(workdir, "stages=[evaluate]", cache="b")).run()
    # A fresh cache makes the dataset again, under the next version: the first run's is not written over.
    assert second["dataset_id"] == first["dataset_id"].replace("-v0", "-v1")
    assert dataset_content_digest(first["dataset_id"]) == before == dataset_content_digest(second["dataset_id"])
    assert first["final_eval_return"] == second["final_eval_return"]
    assert first["offline_eval_return"] == second["offline_eval_return"]


def test_a_new_run_never_writes_into_the_folder_of_a_run_started_in_the_same_second(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20261203-120000")  # every run in one second
    cfg = PipelineConfig.from_yaml("smoke", [f"output_dir={tmp_path}"])
    first, raced = Pipeline(cfg), Pipeline(cfg)  # named before either made its folder
    name = first.run_dir
    first.claim_run_dir()  # what `run` does before it writes
    (first.run_dir / "summary.json").write_text("first")
    later = Pipeline(cfg)
    assert raced.run_dir == name and later.run_dir == name.with_name(f"{name.name}-2")
    raced.claim_run_dir()
    assert raced.run_dir == later.run_dir and raced.log.run_dir == raced.run_dir and raced.run_dir.is_dir()
    later.claim_run_dir()
    assert later.run_dir == name.with_name(f"{name.name}-3")
    first.claim_run_dir()  # its own folder, again
    assert first.run_dir == name and (name / "summary.json").read_text() == "first"


def test_a_damaged_stage_output_or_an_empty_run_config_is_one_line(tmp_path, capsys):
    from cqlsac.pipeline.cache import finished_outputs

    stage = tmp_path / "cache" / "evaluate-0123"
    stage.mkdir(parents=True)
    (stage / "outputs.json").write_text('{"policy": "po')
    with pytest.raises(ConfigError, match=f"outputs.json is damaged \\(not JSON\\): remove {stage} to compute"):
        finished_outputs(stage)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("")
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err == (f"cqlsac run: error: {run_dir / 'config.yaml'} is empty, not the config a run wrote: "
                   f"{run_dir} cannot be resumed\n")
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"] and (run_dir / "config.yaml").read_text() == ""

"""Issue 6: interrupted runs resume from their checkpoints, divergence stops cleanly, bad input is one line."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from minari.storage.datasets_root_dir import get_dataset_path
from tensordict import TensorDict

from cqlsac.components import update as update_module
from cqlsac.components.checkpoints import atomic_torch_save, default_file_mode, save_training_state
from cqlsac.components.envs import make_env
from cqlsac.components.replay import OnlineReplay
from cqlsac.components.update import make_agent
from cqlsac.datasets import DatasetError, Episode, dataset_content_digest, load_transitions, write_dataset, writer
from cqlsac.datasets.creation import create_dataset
from cqlsac.pipeline import stages, supervision
from cqlsac.pipeline.cli import main
from cqlsac.pipeline.config import ConfigError, PipelineConfig
from cqlsac.pipeline.pipeline import MetricsLog, Pipeline

DATASET = "test/pendulum-random-v0"
RUN = [
    "network.actor_hidden=[32,32]", "network.critic_hidden=[32,32]", f"dataset.name={DATASET}",
    "offline.updates=300", "offline.batch_size=64", "offline.log_every=10", "offline.loss.num_actions=4",
    "finetune.frames=400", "finetune.frames_per_batch=100", "finetune.eval_every=200", "finetune.eval_episodes=1",
    "finetune.batch_size=64", "evaluate.episodes=1", "checkpoints.offline_every=20", "checkpoints.online_every=100",
    "baseline.frames=400", "baseline.init_random_frames=200", "baseline.frames_per_batch=100",
    "baseline.eval_every=200", "baseline.eval_episodes=1", "baseline.batch_size=64",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A Minari root with a small random Pendulum dataset, for every test of this module."""
    root = tmp_path_factory.mktemp("reliability")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
        patch.setenv("CQLSAC_CACHE", str(root / "dataset-cache"))
        create_dataset(DATASET, ["random"], 400, env_id="Pendulum-v1", seed=0)
        yield root


def run_args(root, name, *extra):
    """`RUN` with the run's folders, and `extra` in place of any of its keys (a key given twice is an error)."""
    base = RUN + [f"output_dir={root / name / 'runs'}", f"cache_dir={root / name / 'cache'}"]
    replaced = {arg.split("=", 1)[0] for arg in extra}
    return [arg for arg in base if arg.split("=", 1)[0] not in replaced] + list(extra)


def run_dir_of(root, name):
    (run_dir,) = (root / name / "runs").iterdir()
    return run_dir


def stage_outputs(root, name, stage):
    (done,) = (root / name / "cache").glob(f"{stage}-*/outputs.json")
    return json.loads(done.read_text())


def agent_weights(root, name):
    return torch.load(stage_outputs(root, name, "offline")["agent"], weights_only=True)["loss"]


def assert_same_offline_log(root, name):
    """The offline Q-values logged by run `name` are those of the reference run, with no step twice."""
    first, second = (run_dir_of(root, n) / "logs" / "scalars" / "offline" / "q_data.csv" for n in (name, "reference"))
    assert first.read_text() == second.read_text()


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def reference(store):
    """An uninterrupted run of `RUN`: the outputs the interrupted runs are compared with."""
    assert main(["run", *run_args(store, "reference")]) == 0
    return store


def signal_at_log(monkeypatch, signum, prefix, step):
    """Send `signum` to this process when the loop `prefix` logs `step` (after a batch's updates)."""
    log = MetricsLog.log

    def log_then_signal(metrics_log, name, metrics, at):
        log(metrics_log, name, metrics, at)
        if name == prefix and at == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLog, "log", log_then_signal)


def after_update(monkeypatch, update, action):
    """Call `action(loss)` right after the loss module's `update`-th update (counted across stages)."""
    update_step = update_module.update_step

    def update_then_act(loss, optimizer, batch, *args):
        metrics = update_step(loss, optimizer, batch, *args)
        if int(loss.update_count) == update:
            action(loss)
        return metrics

    monkeypatch.setattr(update_module, "update_step", update_then_act)


# ---- interruption and resume ----------------------------------------------------------------
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_the_resumed_offline_stage_is_bit_identical(
        reference, monkeypatch, capsys, signum, status):
    name = f"stopped-{signum}"
    handler = signal.getsignal(signum)
    after_update(monkeypatch, 150, lambda loss: os.kill(os.getpid(), signum))
    assert main(["run", *run_args(reference, name)]) == status
    err = capsys.readouterr().err
    run_dir = run_dir_of(reference, name)
    assert f"stopped by {signal.Signals(signum).name}; checkpoint saved to " in err
    assert f"resume with `cqlsac run --resume {run_dir}`" in err
    assert signal.getsignal(signum) == handler  # the run puts the handlers back
    (state,) = (reference / name / "cache").glob("offline-*/offline.state.pt")
    progress = torch.load(state, weights_only=True)["progress"]
    assert progress["step"] == 150 and progress["seconds"] > 0

    monkeypatch.undo()
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "[offline] resuming from" in capsys.readouterr().out
    assert_same_weights(agent_weights(reference, name), agent_weights(reference, "reference"))
    resumed, uninterrupted = (stage_outputs(reference, run, "offline") for run in (name, "reference"))
    # The resumed stage's compute time counts the interrupted run's part up to its checkpoint too.
    assert resumed.pop("seconds") > progress["seconds"] and uninterrupted.pop("seconds") > 0
    assert resumed == {key: value.replace("reference", name) if isinstance(value, str) else value
                       for key, value in uninterrupted.items()}
    assert not state.exists()  # removed once the stage finished
    assert_same_offline_log(reference, name)


@pytest.mark.parametrize("where", ["after a batch", "mid-batch"])
def test_online_stage_carries_on_with_the_data_it_collected(reference, monkeypatch, capsys, where):
    name = f"online-{where.replace(' ', '-')}"
    if where == "after a batch":
        signal_at_log(monkeypatch, signal.SIGINT, "finetune", 200)
    else:  # the offline stage made 300 updates; the second batch's updates are 401-500
        after_update(monkeypatch, 450, lambda loss: os.kill(os.getpid(), signal.SIGINT))
    assert main(["run", *run_args(reference, name)]) == 130
    (state_path,) = (reference / name / "cache").glob("finetune-*/finetune.state.pt")
    progress = torch.load(state_path, weights_only=True)["progress"]
    record = progress["record"]
    chunks = [torch.load(state_path.with_name(chunk), weights_only=True) for chunk in record["chunks"]]
    kept = sum(part["size"] for part in [*chunks, *record["pending"].values()])
    assert progress["step"] == 200 and kept == 200  # every collected frame: in the buffer or a pending episode
    assert progress["owed_updates"] == (0 if where == "after a batch" else 50)
    assert [frames for frames, _ in record["evals"]] == ([0, 200] if where == "after a batch" else [0])

    monkeypatch.undo()
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir_of(reference, name))]) == 0
    out = capsys.readouterr().out
    assert "[offline] reusing" in out and "[finetune] resuming from" in out and "at frame 200" in out
    finetune = stage_outputs(reference, name, "finetune")
    assert [frames for frames, _ in finetune["evals"]] == [0, 200, 400]
    assert finetune["evals"][:len(record["evals"])] == [list(e) for e in record["evals"]]
    assert stage_outputs(reference, name, "evaluate")["policy"] == finetune["policy"]
    assert not list(state_path.parent.glob("*.state.pt"))  # states and replay chunks go once the stage is done


def test_online_record_saves_only_the_rows_added_since_the_last_checkpoint(tmp_path):
    def rows(*values):
        return TensorDict({"x": torch.tensor(values, dtype=torch.float32)}, [len(values)])

    state_path = tmp_path / "finetune.state.pt"
    data = OnlineReplay(10, batch_size=2)
    record = supervision.OnlineRecord(data, evals=[(0, 1.0)])
    data.add(rows(1, 2, 3))
    assert len(record.state_dict(state_path)["chunks"]) == 1
    data.add(rows(4, 5))
    state = record.state_dict(state_path)
    assert [torch.load(tmp_path / chunk, weights_only=True)["size"] for chunk in state["chunks"]] == [3, 2]

    restored = OnlineReplay(10, batch_size=2)
    supervision.OnlineRecord(restored, evals=[]).load_state_dict(state, state_path)
    assert restored.buffer[:]["x"].tolist() == [1, 2, 3, 4, 5]


def test_sigkill_at_a_random_point_then_resume_matches_an_uninterrupted_run(reference):
    """Kill the CLI with SIGKILL somewhere in offline training or later; resume; compare with `reference`."""
    delay = random.Random(7).uniform(0.3, 2.5)  # seconds after the run directory exists: offline or later
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the reference ran on one thread too (conftest)
    log = reference / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cqlsac.pipeline.cli", "run",
                                 *run_args(reference, "killed")], env=env, stdout=out, stderr=out)
        runs = reference / "killed" / "runs"
        while proc.poll() is None and not list(runs.glob("*/config.yaml")):
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
    # The whole tiny run takes several seconds after its folder appears: a kill after 1 s lands in it.
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert not (run_dir_of(reference, "killed") / "summary.json").exists()  # unfinished: the resume has work to do

    assert main(["run", "--resume", str(run_dir_of(reference, "killed"))]) == 0
    assert_same_weights(agent_weights(reference, "killed"), agent_weights(reference, "reference"))
    assert stage_outputs(reference, "killed", "offline")["eval_return"] == \
        stage_outputs(reference, "reference", "offline")["eval_return"]
    assert_same_offline_log(reference, "killed")  # rows logged after the last checkpoint are dropped on resume
    finetune = stage_outputs(reference, "killed", "finetune")
    assert [frames for frames, _ in finetune["evals"]] == [0, 200, 400]
    assert [frames for frames, _ in stage_outputs(reference, "killed", "baseline")["evals"]] == [0, 200, 400]
    assert stage_outputs(reference, "killed", "evaluate")["mean_return"] == \
        stage_outputs(reference, "reference", "evaluate")["mean_return"]


# ---- numerical faults -----------------------------------------------------------------------
def test_nan_stops_the_stage_and_keeps_the_last_good_checkpoint(store, monkeypatch, capsys):
    # The output layer: NaN there reaches Q at once (oneDNN's fused ReLU maps a NaN pre-activation
    # to 0, so NaN in a hidden layer shows one update later, through the gradients).
    after_update(monkeypatch, 25, lambda loss: loss.critic.weights[-1].data.fill_(float("nan")))
    assert main(["run", *run_args(store, "nan")]) == 3
    err = capsys.readouterr().err
    (state,) = (store / "nan" / "cache").glob("offline-*/offline.state.pt")
    line = err.splitlines()[-1]  # after the progress bar
    assert line.startswith("cqlsac run: error: [offline] training diverged: ") and "Traceback" not in err
    assert "loss_qvalue" in line and "became NaN/Inf at update 26" in line
    assert f"the last good checkpoint (update 20) is kept at {state}" in line
    saved = torch.load(state, weights_only=True)
    assert saved["progress"]["step"] == 20
    assert all(torch.isfinite(value).all() for value in saved["loss"].values() if value.is_floating_point())


def test_q_values_above_the_bound_warn_once_with_the_step_where_they_began(tmp_path):
    supervisor = supervision.Supervisor(None, name="offline", unit="update", path=tmp_path / "s.pt", config_key="f",
                                        every=10, q_bound=100.0, resume=False)

    def metrics(q):
        return TensorDict({"loss_qvalue": torch.tensor(1.0), "q_data": torch.tensor(q)}, [])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, q in enumerate([5.0, -50.0, -150.0, 300.0, 20.0], start=1):
            supervisor.check(metrics(q), step)
        assert caught == []  # the values stay where they were computed until they are read
        supervisor.settle()
    assert [type(w.message) for w in caught] == [supervision.QValueWarning]
    assert "mean Q-value -150 passed q_value_bound=100 at update 3" in str(caught[0].message)
    supervisor.check(metrics(float("inf")), 6)
    for step in range(7, 7 + supervision.READ_EVERY - 2):
        supervisor.check(metrics(1.0), step)
    with pytest.raises(supervision.DivergenceError, match=r"q_data became NaN/Inf at update 6; no checkpoint was saved"):
        supervisor.check(metrics(1.0), 5 + supervision.READ_EVERY)  # the READ_EVERY-th check since the last read


def test_checkpoints_get_the_mode_of_a_plainly_written_file(tmp_path):
    atomic_torch_save({"x": 1}, tmp_path / "c.pt")
    (tmp_path / "plain").write_text("")
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 \
        == default_file_mode()


def test_a_run_without_resume_says_it_starts_over_an_interrupted_stage(tmp_path, capsys):
    (tmp_path / "s.pt").write_bytes(b"left by an interrupted run")
    supervisor = supervision.Supervisor(None, name="offline", unit="update", path=tmp_path / "s.pt", config_key="f",
                                        every=10, q_bound=100.0, resume=False)
    assert supervisor.restore() == {}
    assert "[offline] starting over: the checkpoint an interrupted run left at" in capsys.readouterr().out


# ---- bad input: one line, exit status 2 -----------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(store):
    """A dataset of another env, a truncated dataset, a garbage file, a file where a folder should be."""
    episode = Episode(observations=np.zeros((6, 2), np.float32), actions=np.zeros((5, 1), np.float32),
                      rewards=np.zeros(5), terminations=np.eye(5, dtype=bool)[-1], truncations=np.zeros(5, bool))
    write_dataset("test/car-v0", [episode], "MountainCarContinuous-v0", algorithm_name="test", description="test")
    source = store / "minari" / DATASET
    shutil.copytree(source, store / "minari" / "test" / "truncated-v0")
    metadata = store / "minari" / "test" / "truncated-v0" / "data" / "metadata.json"
    metadata.write_text(metadata.read_text().replace(DATASET, "test/truncated-v0"))
    data = metadata.with_name("main_data.hdf5")
    os.truncate(data, data.stat().st_size // 2)
    (store / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    (store / "a-file").write_text("not a folder")
    return store


@pytest.mark.parametrize("args, message", [
    (["dataset.name=test/none-v0"], "dataset 'test/none-v0' is not in the local Minari store"),
    (["dataset.name=test/car-v0"], "dataset 'test/car-v0' does not fit the env: its observation space is shape (2,)"),
    (["dataset.name=test/truncated-v0"], "dataset 'test/truncated-v0' at {root}/minari/test/truncated-v0/data is "
                                         "corrupted or truncated"),
    (["env.id=Pendulum-v9"], "gymnasium does not know the env id 'Pendulum-v9'. Similar ids: Pendulum-v1"),
    (["env.kwargs={g: 9.8, wings: 2}"], "env.kwargs {'g': 9.8, 'wings': 2} do not work with Pendulum-v1"),
    (["offline.updatez=3"], "unknown config key(s) offline.updatez"),
    (["offline.updates=many"], "offline.updates must be an integer, got 'many'"),
    (["checkpoints.online_every=0"], "checkpoints.online_every must be at least 1"),
    (["output_dir={root}/a-file/runs"], "output_dir: cannot write to {root}/a-file/runs ("),
    (["cache_dir={root}/a-file/cache"], "cache_dir: cannot write to {root}/a-file/cache ("),
    # Envs the agents cannot run: refused before a run directory exists, not deep inside a stage.
    (["env.kwargs={max_episode_steps: -1}"], "Pendulum-v1 with env.kwargs {'max_episode_steps': -1} has no time "
                                             "limit, so an episode may never end"),
    (["env.kwargs={max_episode_steps: -5}"], "env.kwargs {'max_episode_steps': -5} do not work with Pendulum-v1"),
    (["env.kwargs={g: abc}"], "env.kwargs {'g': 'abc'} do not work with Pendulum-v1: its first step fails ("),
    (["env.id=FrozenLake-v1"], "FrozenLake-v1 observes Discrete(16); the networks take a vector of numbers"),
    (["env.id=CarRacing-v3"], "CarRacing-v3 observes Box(0, 255, (96, 96, 3), uint8)"),
    (["env.id=Blackjack-v1"], "Blackjack-v1 observes Tuple(Discrete(32), Discrete(11), Discrete(2))"),
    # A dataset the stage would write over, or could not write at all, is refused before pretraining.
    (["dataset.name=null", "dataset.save_as=test/car-v0", "stages=[dataset]"],
     "dataset test/car-v0 is already in the local Minari store, and the dataset stage would write over it"),
    (["dataset.name=null", "dataset.save_as=x/y-v0", "stages=[dataset]"],
     "dataset.save_as: malformed dataset id 'x/y-v0'"),
    (["dataset.name=no id"], "dataset.name: malformed dataset id 'no id'"),
])
def test_bad_run_input_is_one_line_with_status_2(bad_inputs, capsys, args, message):
    args = [arg.replace("{root}", str(bad_inputs)) for arg in args]
    name = f"bad-{abs(hash(tuple(args)))}"
    assert main(["run", *run_args(bad_inputs, name, *args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cqlsac run: error: {message.replace('{root}', str(bad_inputs))}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not [path for path in (bad_inputs / name).rglob("*") if path.is_file()]  # nothing written


def test_no_dataset_is_written_over(bad_inputs, monkeypatch):
    before = dataset_content_digest("test/car-v0")
    cfg = PipelineConfig.from_yaml(None, ["dataset.save_as=test/car-v0"])
    with pytest.raises(ConfigError, match="already in the local Minari store"):  # the stage's check, under its lock
        stages.dataset_target(cfg, "0" * 12)
    # A writer that found the id free before collecting, and taken when it moves its data into place.
    monkeypatch.setattr(writer, "check_writable", lambda dataset_id, overwrite=False: get_dataset_path(dataset_id))
    episode = Episode(observations=np.ones((3, 2), np.float32), actions=np.ones((2, 1), np.float32),
                      rewards=np.ones(2), terminations=np.array([False, True]), truncations=np.zeros(2, bool))
    with pytest.raises(DatasetError, match="appeared at .* while this one was written; nothing was replaced"):
        write_dataset("test/car-v0", [episode], "MountainCarContinuous-v0", algorithm_name="test", description="t")
    assert dataset_content_digest("test/car-v0") == before


def test_a_damaged_dataset_cache_is_rebuilt_not_read_as_zeros(store):
    observations = load_transitions(DATASET)[0]["observation"].clone()
    (cache,) = (store / "dataset-cache" / "offline" / DATASET).iterdir()
    os.truncate(cache / "observation.memmap", 10)  # as a full disk or a kill outside cqlsac could leave it
    assert torch.equal(load_transitions(DATASET)[0]["observation"], observations)


def interrupted_run(root, name):
    """A run directory whose offline stage stopped (config.yaml and the offline stage folder), and the pipeline."""
    pipe = Pipeline.from_yaml(None, run_args(root, name), run_dir=root / name / "runs" / "run")
    pipe.run_dir.mkdir(parents=True)
    pipe.cfg.to_yaml(pipe.run_dir / "config.yaml")
    pipe.stage_dir("offline").mkdir(parents=True)
    return pipe, pipe.stage_dir("offline") / "offline.state.pt"


def test_bad_checkpoints_and_run_dirs_are_one_line_with_status_2(bad_inputs, capsys):
    pipe, state = interrupted_run(bad_inputs, "bad-checkpoint")
    shutil.copy(bad_inputs / "garbage.pt", state)
    other, other_state = interrupted_run(bad_inputs, "other-config")
    agent = make_agent(make_env("Pendulum-v1"), other.cfg.network, other.cfg.offline.loss, other.cfg.offline.optim)
    loss = agent.loss
    save_training_state(other_state, "another config", loss, agent.optimizer, {"step": 1})
    agent = bad_inputs / "agent.pt"
    torch.save({"kind": "cqlsac-agent", "loss": loss.state_dict()}, agent)
    cases = [  # (arguments, the start of the line, the fix it names)
        (["run", "--resume", str(pipe.run_dir)], f"checkpoint {state} is corrupted or not a torch file (",
         f"delete {state} to restart this stage from scratch"),
        (["run", "--resume", str(other.run_dir)], f"checkpoint {other_state} was written by another config",
         "resume with the run's own config.yaml"),
        (["run", "--resume", str(bad_inputs)], f"{bad_inputs} is not a run directory (no config.yaml in it)",
         "pass the folder that `cqlsac run` printed"),
        (["run", "--resume", str(pipe.run_dir), "seed=1"], "--resume takes no config or overrides",
         "continues with its own config.yaml"),
        (["eval", str(bad_inputs / "garbage.pt")], "checkpoint", "pass a policy.pt"),
        (["eval", str(agent)], f"{agent} is not a cqlsac-policy checkpoint", "pass a policy.pt"),
    ]
    for argv, start, fix in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"cqlsac {argv[0]}: error: {start}") and fix in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_eval_refuses_a_damaged_run_summary_and_a_seed_out_of_range(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for text in ("[1, 2", '{"policy": 5}', "[]"):
        (run / "summary.json").write_text(text)
        assert main(["eval", str(run)]) == 2
        err = capsys.readouterr().err
        assert err == f"cqlsac eval: error: {run / 'summary.json'} is not a run summary cqlsac can read; pass the " \
                      "policy.pt of the run instead\n"
    assert main(["eval", str(run), "--dataset", ""]) == 2  # not the run's own dataset, silently
    assert capsys.readouterr().err == "cqlsac eval: error: --dataset is empty: name a dataset id " \
                                      "(`cqlsac datasets list`), or leave it out\n"
    for seed in ("-1", str(2**31)):
        with pytest.raises(SystemExit) as stop:
            main(["eval", str(run), "--seed", seed])
        assert stop.value.code == 2 and f"argument --seed: must be in [0, 2**31), got {seed}" in capsys.readouterr().err


def test_a_checkpoint_chunk_holds_its_own_rows_not_the_whole_buffer(tmp_path):
    data = OnlineReplay(100_000, batch_size=2)
    data.add(TensorDict({"x": torch.zeros(50_000, 8)}, [50_000]))
    record = supervision.OnlineRecord(data, evals=[])
    record.state_dict(tmp_path / "s.state.pt")
    data.add(TensorDict({"x": torch.ones(10, 8)}, [10]))
    (chunk, last) = sorted(tmp_path.glob("*.rows-*"))[0], record.state_dict(tmp_path / "s.state.pt")["chunks"][-1]
    assert (tmp_path / last).stat().st_size < 10_000  # 10 rows of 8 floats, not the buffer's 100,000 rows
    assert chunk.stat().st_size < 50_000 * 8 * 4 * 1.2


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["sweep", "--bogus"], ["report", "x", "--bogus"],
                                  ["config", "--bogus"], ["eval", "x", "--bogus"], ["datasets", "list", "--bogus"],
                                  ["datasets", "show", "a/b-v0", "--bogus"], ["datasets", "create", "a/b-v0", "--bogus"]])
def test_an_unknown_option_is_one_line_naming_its_own_commands_usage(capsys, argv):
    command = " ".join(argv[: 2 if argv[0] == "datasets" else 1])
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err == f"cqlsac {command}: error: unrecognized arguments: --bogus (usage: cqlsac {command} --help)\n"

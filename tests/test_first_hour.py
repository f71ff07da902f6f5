"""What a new user meets first: numbers and keys on the command line, `cqlsac config`, start-up
without torch, weak pretraining, a failed start, the report and `cqlsac eval RUN_DIR`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cqlsac.datasets import creation
from cqlsac.datasets.creation import create_dataset
from cqlsac.pipeline.cli import main
from cqlsac.pipeline.config import ConfigError, PipelineConfig, bundled_configs

TINY = [
    "network.actor_hidden=[16,16]", "network.critic_hidden=[16,16]",
    "pretrain.frames=400", "pretrain.init_random_frames=200", "pretrain.frames_per_batch=100",
    "pretrain.eval_every=200", "pretrain.eval_episodes=1", "pretrain.batch_size=32",
    "dataset.steps=400", "offline.updates=20", "offline.batch_size=32", "offline.log_every=10",
    "offline.loss.num_actions=2", "finetune.frames=200", "finetune.eval_every=100", "finetune.eval_episodes=1",
    "finetune.batch_size=32", "baseline.frames=200", "baseline.init_random_frames=100", "baseline.eval_every=100",
    "baseline.eval_episodes=1", "baseline.batch_size=32", "evaluate.episodes=2",
]


# ---- numbers and keys -------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, value", [
    ("offline.optim.actor_lr=3e-4", ("offline", "optim", "actor_lr"), 3e-4),
    ("offline.updates=1e3", ("offline", "updates"), 1000),
    ("offline.loss.cql_weight=1E1", ("offline", "loss", "cql_weight"), 10.0),
    ("finetune.optim.critic_lr=.5e-3", ("finetune", "optim", "critic_lr"), 5e-4),
])
def test_numbers_parse_as_yaml_1_2_does(override, key, value):
    cfg = PipelineConfig.from_yaml(None, [override])
    for part in key:
        cfg = getattr(cfg, part)
    assert cfg == value and type(cfg) is type(value)


def test_a_fractional_count_is_still_an_error():
    with pytest.raises(ConfigError, match="offline.updates must be an integer, got 1500.5"):
        PipelineConfig.from_yaml(None, ["offline.updates=1.5005e3"])


def test_a_key_given_twice_is_an_error_not_the_last_one_silently():
    with pytest.raises(ConfigError, match=r"offline.updates is given twice \('offline.updates=abc' and 'offline.updates=50'\)"):
        PipelineConfig.from_yaml(None, ["offline.updates=abc", "offline.updates=50"])
    with pytest.raises(ConfigError, match="given twice"):
        PipelineConfig.from_yaml(None, ["seed=1", " seed=2"])


def test_a_key_twice_in_a_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("offline:\n  updates: 10\n  updates: 20\n")
    with pytest.raises(ConfigError, match=f"^config file {path}: key updates given twice \\(again on line 3\\)$"):
        PipelineConfig.from_yaml(path)


def test_config_files_that_are_not_yaml_files_are_named_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe seed: 1")
    with pytest.raises(ConfigError, match=f"^config file {binary} is not UTF-8 text"):
        PipelineConfig.from_yaml(binary)
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a directory"):
        PipelineConfig.from_yaml(tmp_path)
    with pytest.raises(ConfigError, match="config file offline.updates does not exist .*; an override looks like key=value"):
        PipelineConfig.from_yaml("offline.updates")  # `cqlsac config offline.updates`, the `=value` forgotten
    with pytest.raises(ConfigError, match="^the config name is empty; name a YAML file or a bundled config"):
        PipelineConfig.from_yaml("")  # `cqlsac config ""`, not the current folder


def test_random_frames_off_the_batch_grid_name_the_key():
    with pytest.raises(ConfigError, match=r"pretrain.init_random_frames \(250\) must be a multiple of "
                                          r"pretrain.frames_per_batch \(200\)"):
        PipelineConfig.from_yaml(None, ["pretrain.init_random_frames=250"])


def test_bundled_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"pendulum", "lunarlander", "hopper", "smoke"} <= set(bundled_configs())
    assert PipelineConfig.from_yaml("lunarlander").env.kwargs == {"continuous": True}
    assert PipelineConfig.from_yaml("pendulum") == PipelineConfig()
    with pytest.raises(ConfigError, match="config file lunarlandr does not exist \\(bundled configs: hopper, "):
        PipelineConfig.from_yaml("lunarlandr")


def test_cqlsac_config_prints_every_key_documented_and_loads_back(tmp_path, capsys):
    assert main(["config", "lunarlander", "seed=4"]) == 0
    text = capsys.readouterr().out
    assert "# Score the dataset against the best pretrained policy" in text  # dataset.reference_scores
    assert "# Updates per collected frame." in text
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert PipelineConfig.from_yaml(path) == PipelineConfig.from_yaml("lunarlander", ["seed=4"])


def test_help_and_config_do_not_import_torch():
    code = ("import sys; from cqlsac.pipeline.cli import main; main(['config']); "
            "assert not {'torch', 'torchrl', 'minari'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    help_text = subprocess.run([sys.executable, "-m", "cqlsac.pipeline.cli", "eval", "--help"], check=True,
                               capture_output=True, text=True).stdout
    assert "Mean return of the policy (deterministic unless --sample-actions)" in help_text and "RUN_DIR" in help_text


# ---- runs -------------------------------------------------------------------------------------
def run_tiny(workdir: Path, capsys, *extra) -> Path:
    assert main(["run", *TINY, f"output_dir={workdir / 'runs'}", f"cache_dir={workdir / 'cache'}", *extra]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_failed_start_leaves_no_run_or_stage_folder(tmp_path, dataset_store, capsys):
    args = [f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["run", *args, "dataset.name=test/none-v0"]) == 2
    assert "is not in the local Minari store" in capsys.readouterr().err
    assert main(["run", *args, "env.id=Pendulum-v9"]) == 2
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "cache").glob("*"))


def test_weak_pretraining_finishes_with_unnormalised_scores_and_says_why(tmp_path, dataset_store, monkeypatch, capsys):
    # The best pretrained policy scores below random play (as after a very short pretraining).
    monkeypatch.setattr(creation, "mean_eval_return", lambda env, kwargs, policy, episodes, seed:
                        -1000.0 if policy.actor is None else -1500.0)
    run_dir = run_tiny(tmp_path, capsys, "dataset.reference_scores=true")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_normalized_score"] is None and summary["ref_max_score"] is None
    report = (run_dir / "report.md").read_text()
    assert "| normalised score | not computed: the dataset has no reference scores (expert " in report
    assert "returns -1500.000, random -1000.000: it does not beat random play)" in report
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0  # no normalised score, and it says so
    out, err = capsys.readouterr()
    assert "normalized_score" not in json.loads(out) and err.endswith("has no reference scores, so no normalised score\n")


def test_report_reads_as_a_report_and_eval_takes_the_run_directory(tmp_path, dataset_store, monkeypatch, capsys):
    monkeypatch.setattr(creation, "mean_eval_return", lambda env, kwargs, policy, episodes, seed:
                        -1000.0 if policy.actor is None else -100.0)  # the reference scores of the dataset
    run_dir = run_tiny(tmp_path, capsys)
    summary = json.loads((run_dir / "summary.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert summary["policy"] == str(run_dir / "policy.pt") and (run_dir / "policy.pt").is_file()
    assert f"`cqlsac eval {run_dir}`" in report
    final = f"{summary['final_eval_return']:,.1f}"
    assert f"| final return | **{final}**: the fine-tuned policy, deterministic, mean of 2 seeded episodes |" in report
    assert "{" not in report and str(summary["final_eval_return"]) not in report  # no dicts, no raw floats
    assert "| baseline |" in report and "| SAC from scratch |" in report
    assert "(0 = the random policy's return -1,000.0, 100 = the expert's -100.0)" in report
    assert summary["baseline_evals"][0][0] == 0  # SAC's curve starts before its first step, as fine-tuning's

    assert main(["eval", str(run_dir), "--episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["policy"] == summary["policy"] and result["mean_return"] == summary["final_eval_return"]
    assert result["normalized_score"] == pytest.approx(100 * (result["mean_return"] + 1000) / 900)
    assert result["normalized_score"] == pytest.approx(summary["final_normalized_score"])


def test_datasets_list_calls_a_dataset_made_without_a_preset_custom(dataset_store, tmp_path, capsys):
    from cqlsac.components.checkpoints import save_policy
    from cqlsac.components.config import NetworkConfig
    from cqlsac.components.envs import make_env
    from cqlsac.components.networks import make_actor

    env = make_env("Pendulum-v1")
    network = NetworkConfig(actor_hidden=(8,), critic_hidden=(8,))
    save_policy(tmp_path / "p.pt", make_actor(env.observation_spec["observation"], env.action_spec, network),
                "Pendulum-v1", network)
    create_dataset("test/custom-v0", [tmp_path / "p.pt"], 50, ref_episodes=1)
    assert main(["datasets", "list"]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("test/custom-v0")]
    assert row[-1] == "custom"

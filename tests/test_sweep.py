"""Sweeps: the product of axes, one failing run among finished ones, a killed sweep resumed, and the
same numbers from the local and the Ray backend."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cqlsac.pipeline.cli import main
from cqlsac.pipeline.config import ConfigError
from cqlsac.pipeline.sweep import Sweep, code_version, parse_seeds, split_values

# SAC from scratch alone, at a tiny budget: a run is a few seconds.
BASELINE_ONLY = [
    "stages=[baseline]", "network.actor_hidden=[16,16]", "network.critic_hidden=[16,16]", "baseline.frames=200",
    "baseline.init_random_frames=100", "baseline.eval_every=100", "baseline.eval_episodes=1", "baseline.batch_size=32",
]


def folders(tmp_path):
    return [f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]


def test_values_and_seeds_parse():
    assert split_values("fixed,annealed") == ["fixed", "annealed"]
    assert split_values("[64,64],[128,128]") == ["[64,64]", "[128,128]"]
    assert split_values("{a: 1, b: 2}") == ["{a: 1, b: 2}"]
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("0,5,7-8") == [0, 5, 7, 8]
    for bad, message in (("x", "expected seeds like 0-9"), ("3-1", "3-1 is an empty range"),
                         ("1,1", "names a seed twice")):
        with pytest.raises(ConfigError, match=message):
            parse_seeds(bad)


def test_the_runs_are_the_product_of_the_axes_setting_by_setting(tmp_path):
    sweep = Sweep.from_args(None, "0-1", ["finetune.mixing=fixed,merged", "offline.loss.cql_weight=1,5", *folders(tmp_path)])
    assert [(run.setting, run.seed, run.overrides) for run in sweep.runs] == [
        (0, 0, {"finetune.mixing": "fixed", "offline.loss.cql_weight": "1"}),
        (0, 1, {"finetune.mixing": "fixed", "offline.loss.cql_weight": "1"}),
        (1, 0, {"finetune.mixing": "fixed", "offline.loss.cql_weight": "5"}),
        (1, 1, {"finetune.mixing": "fixed", "offline.loss.cql_weight": "5"}),
        (2, 0, {"finetune.mixing": "merged", "offline.loss.cql_weight": "1"}),
        (2, 1, {"finetune.mixing": "merged", "offline.loss.cql_weight": "1"}),
        (3, 0, {"finetune.mixing": "merged", "offline.loss.cql_weight": "5"}),
        (3, 1, {"finetune.mixing": "merged", "offline.loss.cql_weight": "5"}),
    ]
    cfg = sweep.run_config(sweep.runs[5].overrides, 1)
    assert (cfg.finetune.mixing, cfg.offline.loss.cql_weight, cfg.seed) == ("merged", 1.0, 1)
    assert cfg.cache_dir == str((tmp_path / "cache").resolve())  # every run, on every node, finds the same cache


@pytest.mark.parametrize("assignments, message", [
    (["finetune.mixng=fixed,merged"], "unknown config key(s) finetune.mixng"),
    (["seed=1,2"], "seeds are an axis of their own"),
    (["offline.updates=10,x"], "offline.updates must be an integer, got 'x'"),
    (["--vectorise-offline", "offline.optim.critic_grad_clip=1.0"], "it needs offline.optim.actor_every=1 and no"),
    (["--seeds", "-1"], "seed must be in [0, 2**31), got -1"),
    (["--address", "127.0.0.1:1"], "--address names a Ray cluster: use it with --backend ray"),
    (["cache_dir=/proc/no-such-folder"], "cache_dir: cannot write to /proc/no-such-folder"),
    (["dataset.save_as=te/st-v0x"], "dataset.save_as: malformed dataset id 'te/st-v0x'"),
    # Two seeds pretrain two behaviour policies: their datasets cannot share one id.
    (["--seeds", "0-1", "dataset.save_as=test/one-v0"], "dataset.save_as=test/one-v0: runs [base config | seed 0] "
                                                         "and [base config | seed 1] would write different datasets"),
])
def test_a_bad_sweep_fails_before_any_run(tmp_path, capsys, assignments, message):
    given = {item.split("=")[0] for item in assignments}
    assert main(["sweep", *[f for f in folders(tmp_path) if f.split("=")[0] not in given], *assignments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_runs_that_share_one_dataset_stage_may_name_its_dataset(tmp_path):
    sweep = Sweep.from_args(None, "0", ["offline.loss.cql_weight=1,5", "dataset.save_as=test/one-v0", *folders(tmp_path)])
    assert [run.overrides for run in sweep.runs] == [{"offline.loss.cql_weight": "1"}, {"offline.loss.cql_weight": "5"}]


@pytest.mark.parametrize("text, message", [
    ("seeds: [1, 1]\n", "seeds [1, 1] name a seed twice"),
    ("seeds: 5\n", "seeds must be a list of integers or a string like 0-9, got 5"),
    ("seeds: [1.7]\n", "seeds must be a list of integers or a string like 0-9, got [1.7]"),
    ("seeds: 5-2\n", "seeds '5-2': 5-2 is an empty range"),
    ("settings: [a, b]\n", "settings must be a mapping of keys to settings"),
    ("settings: {a: 5}\n", "settings.a must be a mapping of config keys to values, got 5"),
    ("axes: {finetune.mixing: fixed}\n", "axes.finetune.mixing must be a list of values, got 'fixed'"),
    ("overrides: [a, b]\n", "overrides must be a mapping of keys to values, got ['a', 'b']"),
    ("config: [a]\n", "config must be a string, got ['a']"),
    ("seeds: [0]\nseeds: [1]\n", "key seeds given twice (again on line 2)"),
])
def test_a_bad_sweep_file_is_one_line_before_anything_is_written(tmp_path, capsys, text, message):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(text + f"overrides: {{output_dir: {tmp_path / 'runs'}}}\n" * ("overrides" not in text))
    assert main(["sweep", "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cqlsac sweep: error: sweep file {spec}") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    assert main(["sweep", "--spec", str(tmp_path / "nope.yaml")]) == 2
    assert f"sweep file {tmp_path / 'nope.yaml'} is not a file" in capsys.readouterr().err


def test_a_damaged_record_is_one_line_and_nothing_is_written(tmp_path, capsys):
    whole = {"spec": {"config": None, "seeds": [0], "axes": {}, "overrides": []}, "runs": [],
             "machine": {}, "wall_seconds": 1.0}
    cases = [  # (the record's text, the message)
        ('{"spec": {"config": null', "is not a sweep record: it is not JSON"),
        ('{"spec": {}}', "is not a whole sweep record (it has no spec.config, spec.seeds, spec.axes, spec.overrides, "
                         "runs, machine, wall_seconds)"),
        (json.dumps({**whole, "runs": [{"seed": 0}]}), "is not a whole sweep record (it has no runs with seed, "
                                                       "setting, status, summary"),
        (json.dumps({**whole, "runs": [{"setting": 0, "seed": 0, "status": "finished", "summary": "edited"}]}),
         "runs with seed, setting, status, summary, each summary a mapping or null)"),
    ]
    for text, message in cases:
        sweep_dir = tmp_path / "sweep"
        sweep_dir.mkdir(exist_ok=True)
        (sweep_dir / "sweep.json").write_text(text)
        for argv in (["report", str(sweep_dir)], ["report", str(sweep_dir), "--results", str(tmp_path / "r.md")],
                     ["sweep", "--resume", str(sweep_dir)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["sweep", "sweep.json"]  # no curves, page or record
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is neither a sweep directory (no sweep.json in it) nor a sweep record" in capsys.readouterr().err
    assert main(["report", str(sweep_dir), "--results", str(tmp_path)]) == 2
    assert f"--results {tmp_path}: not a file that can be written" in capsys.readouterr().err
    kept = json.loads(sorted(Path(__file__).parents[1].glob("docs/records/*.json"))[0].read_text())
    (sweep_dir / "sweep.json").write_text(json.dumps({**kept, "runs": kept["runs"][:1]}))
    (sweep_dir / "report.md").mkdir()  # where the report goes, a folder: the system's reason, in one line
    assert main(["report", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cqlsac report: error: {sweep_dir / 'report.md'}: ") and err.count("\n") == 1, err


def test_a_kept_record_that_cannot_be_carried_on_where_it_goes_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    record = tmp_path / "20261203-000000-abcdef.json"
    record.write_text(json.dumps({"spec": {"config": None, "seeds": [0], "axes": {}, "overrides": [
        f"output_dir={tmp_path / 'a-file' / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]}, "runs": [],
        "machine": {}, "wall_seconds": 1.0}))
    assert main(["sweep", "--resume", str(record)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cqlsac sweep: error: --resume: cannot write to {tmp_path}/a-file/runs/sweeps/"
                          "20261203-000000-abcdef (") and "a kept record carries on under its config's output_dir" \
        in err and err.count("\n") == 1, err


def test_a_sweep_from_a_yaml_file(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("config: smoke\nseeds: 0-2\ntitle: Mixing\ndescription: Does the mixing matter?\n"
                    "axes:\n  finetune.mixing: [fixed, merged]\n"
                    "  network.actor_hidden: [[32, 32], [64, 64]]\noverrides:\n  offline.updates: 50\n")
    sweep = Sweep.from_yaml(spec, sweep_dir=str(tmp_path / "s"))
    assert len(sweep.runs) == 12 and (sweep.title, sweep.description) == ("Mixing", "Does the mixing matter?")
    sweep.save(started=0.0, ended=None)
    assert Sweep.resumed(tmp_path / "s").description == "Does the mixing matter?"
    cfg = sweep.run_config(sweep.runs[-1].overrides, 2)
    assert (cfg.network.actor_hidden, cfg.finetune.mixing, cfg.offline.updates) == ((64, 64), "merged", 50)


def test_a_failing_run_is_one_line_and_the_others_finish(tmp_path, dataset_store, capsys):
    from cqlsac.datasets import create_dataset

    create_dataset("test/there-v0", ["random"], 100, env_id="Pendulum-v1")
    args = ["sweep", "stages=[dataset]", "dataset.name=test/there-v0,test/gone-v0", *folders(tmp_path)]
    assert main(args) == 1  # not every run finished
    sweep_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["finished", "failed"]
    assert runs[1]["error"].startswith("dataset 'test/gone-v0' is not in the local Minari store")
    report = (sweep_dir / "report.md").read_text()
    assert "Runs: 1 finished, 1 failed, 0 interrupted" in report and "test/gone-v0, seed 0: failed" in report
    assert "**Incomplete: 1 of 2 runs finished.**" in report

    # A results page: the sweep's generated section is added, the page's other sections are kept, and
    # the sweep's record is kept beside the page, which makes the same section once the sweep is gone.
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nan old header\n\n<!-- sweep older -->\n## An older sweep\n\nits text\n")
    assert main(["report", str(sweep_dir), "--results", str(results)]) == 0
    page = results.read_text()
    assert page.startswith("# Results") and "an old header" not in page
    assert 0 < page.index("<!-- sweep older -->\n## An older sweep\n\nits text\n") < page.index(
        f"<!-- sweep {sweep_dir.name} -->\n## Sweep `{sweep_dir.name}`")
    record = results.parent / "records" / f"{sweep_dir.name}.json"
    assert record.read_bytes() == (sweep_dir / "sweep.json").read_bytes()
    assert f"![curves](img/sweep-{sweep_dir.name}.png)" in page
    assert (results.parent / "img" / f"sweep-{sweep_dir.name}.png").is_file()
    shutil.rmtree(sweep_dir)
    assert main(["report", str(record), "--results", str(results)]) == 0
    assert results.read_text() == page
    assert main(["report", str(record)]) == 2  # a record alone has no sweep directory to write report.md into
    assert "is a sweep record, not a sweep directory" in capsys.readouterr().err

    # The sweep carries on from its kept record (a later session): the finished run is kept, the other runs.
    create_dataset("test/gone-v0", ["random"], 100, env_id="Pendulum-v1")
    assert main(["sweep", "--resume", str(record)]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == sweep_dir
    resumed = json.loads((sweep_dir / "sweep.json").read_text())
    assert [run["status"] for run in resumed["runs"]] == ["finished", "finished"]
    assert resumed["runs"][0]["summary"] == runs[0]["summary"] and not (sweep_dir / "runs" / "00-seed0").exists()
    assert [session["machine"]["cores"] for session in resumed["sessions"]] == [os.cpu_count()] * 2
    assert [session["code"] for session in resumed["sessions"]] == [code_version()] * 2
    # The report names the code of the first session, and of a later one where it differs.
    resumed["sessions"][0]["code"], resumed["sessions"][1]["code"] = "1111111", "2222222+changes"
    (sweep_dir / "sweep.json").write_text(json.dumps(resumed))
    assert main(["report", str(sweep_dir)]) == 0
    report = (sweep_dir / "report.md").read_text()
    assert " with cqlsac at commit 1111111, local backend" in report
    assert f"Resumed {resumed['sessions'][1]['started']} by `(from Python)` with cqlsac at commit 2222222+changes" in report
    assert main(["sweep", "--resume", str(record)]) == 2  # it carries on in sweep_dir now: resume that
    assert f"already carries on this record: resume it with --resume {sweep_dir}" in capsys.readouterr().err


def test_a_sweep_does_not_carry_on_with_other_data_under_its_dataset_name(tmp_path, dataset_store, capsys):
    from cqlsac.datasets import create_dataset, dataset_content_digest, open_dataset

    create_dataset("test/data-v0", ["random"], 100, env_id="Pendulum-v1")
    args = ["sweep", "stages=[dataset]", "dataset.name=test/data-v0,test/later-v0", *folders(tmp_path)]
    assert main(args) == 1  # test/later-v0 is not there yet
    sweep_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["runs"][0]["summary"]["dataset_sha256"] == dataset_content_digest("test/data-v0")

    # The dataset re-created with other data (as on another machine): neither way of resuming carries on.
    stored = Path(open_dataset("test/data-v0").spec.data_path).parent
    shutil.copytree(stored, tmp_path / "kept")
    create_dataset("test/data-v0", ["random"], 100, env_id="Pendulum-v1", seed=1, overwrite=True)
    create_dataset("test/later-v0", ["random"], 100, env_id="Pendulum-v1")
    kept_record = tmp_path / "record.json"
    shutil.copy(sweep_dir / "sweep.json", kept_record)
    for source in (sweep_dir, kept_record):
        assert main(["sweep", "--resume", str(source)]) == 2
        assert "dataset 'test/data-v0' here holds other data than this sweep's finished runs used" in capsys.readouterr().err
    assert json.loads((sweep_dir / "sweep.json").read_text()) == record
    assert not (tmp_path / "runs" / "sweeps" / "record").exists()

    # Its files copied back, the sweep carries on.
    shutil.rmtree(stored)
    shutil.copytree(tmp_path / "kept", stored)
    assert main(["sweep", "--resume", str(sweep_dir)]) == 0
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["finished", "finished"]

    # A record whose finished runs already mix data under one name says so above its tables.
    runs[1]["summary"].update(dataset_id="test/data-v0", dataset_sha256="0" * 64)
    (sweep_dir / "sweep.json").write_text(json.dumps({**record, "runs": runs}))
    assert main(["report", str(sweep_dir)]) == 0
    assert ("**Mixed data: the finished runs trained on 2 different datasets named `test/data-v0`.**"
            in (sweep_dir / "report.md").read_text())


def sweep_command(tmp_path, *extra):
    return [sys.executable, "-m", "cqlsac.pipeline.cli", "sweep", "--seeds", "0-1", "baseline.batch_size=16,32",
            *BASELINE_ONLY[:-1], "--workers", "1", f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
            *extra]


def test_a_killed_sweep_resumes_keeping_its_finished_runs(tmp_path):
    proc = subprocess.Popen(sweep_command(tmp_path, "--threads=1"), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    record_path = None
    while proc.poll() is None:
        found = list((tmp_path / "runs" / "sweeps").glob("*/sweep.json"))
        if found and any(run["status"] == "finished" for run in json.loads(found[0].read_text())["runs"]):
            record_path = found[0]
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, mid-run
    proc.wait()
    assert record_path is not None
    sweep_dir = record_path.parent
    before = {(r["setting"], r["seed"]): r for r in json.loads(record_path.read_text())["runs"]}
    finished = [key for key, run in before.items() if run["status"] == "finished"]
    assert 1 <= len(finished) < 4

    done = subprocess.run([sys.executable, "-m", "cqlsac.pipeline.cli", "sweep", "--resume", str(sweep_dir)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {(r["setting"], r["seed"]): r for r in json.loads(record_path.read_text())["runs"]}
    assert all(run["status"] == "finished" for run in after.values())
    for key in finished:  # kept as they were, not run again
        assert after[key]["summary"] == before[key]["summary"]
    record, first = json.loads(record_path.read_text()), json.loads(record_path.read_text())["sessions"][0]
    assert len(record["sessions"]) == 2 and record["started"] == first["started"]
    assert first["command"] == " ".join(["python -m cqlsac.pipeline.cli", *sweep_command(tmp_path, "--threads=1")[3:]])
    assert record["sessions"][1]["command"] == f"python -m cqlsac.pipeline.cli sweep --resume {sweep_dir}"
    assert first["wall_seconds"] is None and record["wall_seconds"] is None  # the killed session's time is unknown
    assert record["sessions"][1]["wall_seconds"] > 0


def test_ctrl_c_stops_the_whole_sweep_with_status_130(tmp_path):
    proc = subprocess.Popen(sweep_command(tmp_path), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list((tmp_path / "runs" / "sweeps").glob("*/runs/00-seed0/config.yaml")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped; finished runs are kept; resume with `cqlsac sweep --resume" in err
    (record,) = (tmp_path / "runs" / "sweeps").glob("*/sweep.json")
    statuses = {run["status"] for run in json.loads(record.read_text())["runs"]}
    assert "interrupted" in statuses and "pending" not in statuses


def test_the_ray_backend_gives_the_local_backends_numbers(tmp_path):
    pytest.importorskip("ray")

    def sweep(backend):
        folder = tmp_path / backend
        result = Sweep.from_args(None, "0-1", BASELINE_ONLY + [f"output_dir={folder}", f"cache_dir={folder / 'cache'}"],
                                 workers=2, threads=1, backend=backend).run()
        return [(run["seed"], run["summary"]["baseline_evals"]) for run in result["runs"]]

    local = sweep("local")
    assert sweep("ray") == local and len(local) == 2


def test_named_settings_set_several_keys_together(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("seeds: [3]\nsettings:\n  plain: {recipe: cql}\n"
                    "  short warm-up: {recipe: wsrl, finetune.warmup_frames: 1000}\n")
    sweep = Sweep.from_yaml(spec, sweep_dir=str(tmp_path / "s"))
    assert [sweep.label(run.setting) for run in sweep.runs] == ["plain", "short warm-up"]
    cfg = sweep.run_config(sweep.runs[1].overrides, 3)
    assert (cfg.recipe, cfg.finetune.warmup_frames, cfg.network.num_critics, cfg.seed) == ("wsrl", 1000, 10, 3)


def test_the_code_version_is_the_commit_of_the_checkout_that_runs():
    import cqlsac.pipeline.sweep as sweep_module

    root = Path(sweep_module.__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        assert code_version() is None  # an installed package: no commit to name
        return
    head = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True).stdout.strip()
    assert code_version() == head + ("+changes" if changed else "")


def test_a_new_sweep_does_not_carry_on_a_sweep_started_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20261203-120000")  # both sweeps in one second
    first = Sweep.from_args("smoke", "0", folders(tmp_path))
    Path(first.sweep_dir).mkdir(parents=True)
    first.save(time.time(), None)  # its sweep.json, as its first step writes it
    second, raced = (Sweep.from_args("smoke", "0", folders(tmp_path)) for _ in range(2))
    assert second.sweep_dir == raced.sweep_dir == f"{first.sweep_dir}-2" and second.earlier_sessions == []
    assert {Path(run.run_dir).parent.parent for run in second.runs} == {Path(second.sweep_dir)}
    Path(second.sweep_dir).mkdir()  # `second` started first: `raced` takes the next name, and its runs go there
    monkeypatch.setattr("cqlsac.pipeline.sweep.schedule", lambda todo, *args: iter(()))  # no run is started
    monkeypatch.setattr("cqlsac.pipeline.sweep_report.write", lambda sweep_dir: None)
    raced.run()
    assert raced.sweep_dir == f"{first.sweep_dir}-3" and (Path(raced.sweep_dir) / "sweep.json").is_file()
    assert {Path(run.run_dir).parent.parent for run in raced.runs} == {Path(raced.sweep_dir)}


def test_a_seed_range_too_long_for_any_sweep_is_refused_before_it_is_built():
    with pytest.raises(ConfigError, match="--seeds '0-2000000000': 2000000001 seeds in 0-2000000000; a sweep takes at most"):
        parse_seeds("0-2000000000")
    assert len(parse_seeds("0-9999")) == 10_000

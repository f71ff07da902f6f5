"""Sweeps: every combination of some config values, over seeds, each combination a normal pipeline run.

All runs share the stage cache, so runs that share a stage (the same dataset, the same baseline)
compute it once. They run in worker processes on this machine (`local`) or as Ray tasks
(`ray`, on a local instance or a cluster), one fresh process per run with `threads` torch threads.
A sweep directory holds `sweep.json` (the spec and every run's status and summary), `runs/`
(one run directory each) and the report that `cqlsac report` makes from them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from cqlsac.components.checkpoints import atomic_json
from cqlsac.components.errors import UserError
from cqlsac.pipeline.cache import claim_new_folder, ensure_output_writable, ensure_writable, unused_name
from cqlsac.pipeline.config import ConfigError, PipelineConfig, config_hash, read_yaml

SWEEP_FILE = "sweep.json"
MAX_SEEDS = 10_000  # far more runs than any sweep makes, and a list that costs nothing to build
BACKENDS = ("local", "ray")


def record_path(source: str | Path) -> Path:
    """A sweep's record: `sweep.json` in its sweep directory, or the record file itself (a copy kept
    beside a results page, `docs/records/NAME.json`)."""
    source = Path(source)
    path = source / SWEEP_FILE if source.is_dir() else source
    if not (path.is_file() and path.suffix == ".json"):
        raise ConfigError(f"{source} is neither a sweep directory (no {SWEEP_FILE} in it) nor a sweep record (.json); "
                          "pass the folder that `cqlsac sweep` printed last")
    return path


def load_record(source: str | Path) -> dict:
    """A sweep's record (spec, sessions, runs), from its directory or its kept record file."""
    path = record_path(source)
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:  # UnicodeDecodeError too
        raise ConfigError(f"{path} is not a sweep record: it is not JSON ({str(exc).splitlines()[0]}); a file "
                          "cut short cannot be read") from None
    if not (isinstance(record, dict) and isinstance(record.get("spec"), dict)):
        raise ConfigError(f"{path} is not a sweep record (no spec in it)")
    missing = [f"spec.{key}" for key in RECORD_SPEC if key not in record["spec"]]
    missing += [key for key in RECORD_KEYS if key not in record]
    if not missing and not (isinstance(record["runs"], list)
                            and all(isinstance(run, dict) and RECORD_RUN <= set(run)
                                    and isinstance(run["summary"], (dict, type(None))) for run in record["runs"])):
        missing = [f"runs with {', '.join(sorted(RECORD_RUN))}, each summary a mapping or null"]
    if missing:
        raise ConfigError(f"{path} is not a whole sweep record (it has no {', '.join(missing)})")
    return record


RECORD_SPEC = ("config", "seeds", "axes", "overrides")  # what `sweep.json` holds, as `Sweep.save` writes it
RECORD_KEYS = ("runs", "machine", "wall_seconds")
RECORD_RUN = {"setting", "seed", "status", "summary"}


def dataset_digests(runs: list[dict]) -> dict[str, set[str]]:
    """The content digests of the datasets that the finished runs trained on, by dataset id (runs
    from before summaries kept digests are left out)."""
    digests: dict[str, set[str]] = {}
    for run in runs:
        summary = run.get("summary") or {}
        if run["status"] == "finished" and summary.get("dataset_sha256"):
            digests.setdefault(summary["dataset_id"], set()).add(summary["dataset_sha256"])
    return digests


def check_same_data(runs: list[dict]) -> None:
    """Refuse to carry a sweep on where a dataset that its finished runs trained on now holds other data
    under the same id (re-created on another machine, whose float rounding trains another behaviour
    policy): its runs would no longer be one comparison."""
    from cqlsac.datasets import dataset_content_digest, is_local

    for dataset_id, digests in dataset_digests(runs).items():
        if is_local(dataset_id) and (here := dataset_content_digest(dataset_id)) not in digests:
            raise ConfigError(f"dataset {dataset_id!r} here holds other data than this sweep's finished runs used "
                              f"(sha256 {here[:12]}, theirs {', '.join(d[:12] for d in sorted(digests))}), e.g. "
                              "re-created on another machine: copy its files from where they ran, or start a new sweep")


def record_name(source: str | Path) -> str:
    """A sweep's name: its directory's, which its record kept beside a results page keeps (NAME.json)."""
    source = Path(source)
    return source.name if source.is_dir() else source.stem


def split_values(text: str) -> list[str]:
    """`a,[1,2],{x: 1}` -> `["a", "[1,2]", "{x: 1}"]`: commas inside brackets or braces do not split."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def parse_seeds(text: str, given_as: str = "--seeds") -> list[int]:
    """`0-9` or `0,3,5` or `0-2,7` -> a list of seeds; errors name them as `given_as`."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if match is None:
            raise ConfigError(f"{given_as} {text!r}: expected seeds like 0-9, 0,3,5 or 0-2,7")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise ConfigError(f"{given_as} {text!r}: {low}-{high} is an empty range")
        if high - low >= MAX_SEEDS:
            raise ConfigError(f"{given_as} {text!r}: {high - low + 1} seeds in {low}-{high}; a sweep takes at most "
                              f"{MAX_SEEDS}")
        seeds += range(low, high + 1)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{given_as} {text!r} names a seed twice")
    return seeds


def as_override(key: str, value: Any) -> str:
    """`key=value` with the value written as YAML (so that it parses back to the same value)."""
    if isinstance(value, str):
        return f"{key}={value}"
    dumped = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return f"{key}={dumped.removesuffix(chr(10) + '...').strip()}"


@dataclass
class SweepRun:
    """One run of a sweep: a setting (one value per axis) and a seed."""

    setting: int
    seed: int
    overrides: dict[str, Any]
    run_dir: str
    status: str = "pending"
    error: str | None = None
    summary: dict | None = None


@dataclass
class Sweep:
    """The runs of `config` (a path, a bundled name, or None for the default) with the fixed
    `overrides`, for every combination of the `axes` values (or each of the `named` settings, each a
    few keys set together) and every seed.

    `workers` runs go at once, each with `threads` torch threads (default: the cores shared out).
    With `backend="ray"`, each run is a Ray task (`address` of a cluster, else a local instance);
    the cache must then be on a filesystem every node sees. With `vectorise_offline`, the offline
    stages of each setting's seeds whose datasets exist are first computed together, as one
    vectorised update (docs/performance.md), and the runs reuse them.
    """

    config: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    named: dict[str, dict[str, str]] = field(default_factory=dict)
    sweep_dir: str | None = None
    workers: int = 1
    backend: str = "local"
    address: str | None = None
    threads: int | None = None
    title: str | None = None
    description: str | None = None
    vectorise_offline: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.address is not None and self.backend != "ray":
            raise ConfigError("--address names a Ray cluster: use it with --backend ray")
        if self.vectorise_offline and self.backend != "local":
            raise ConfigError("--vectorise-offline runs on this machine: use it with --backend local")
        if not self.seeds:
            raise ConfigError("a sweep needs at least one seed")
        if any(override.split("=", 1)[0].strip() == "seed" for override in self.overrides) or "seed" in self.axes:
            raise ConfigError("seeds are an axis of their own: use --seeds, not seed=...")
        if self.axes and self.named:
            raise ConfigError("a sweep has axes or named settings, not both")
        for key, values in self.axes.items():
            if not values:
                raise ConfigError(f"axis {key} has no values")
        self.threads = self.threads or max(1, (os.cpu_count() or 1) // self.workers)
        self.base = PipelineConfig.from_yaml(self.config, self.overrides)  # a bad key fails before anything runs
        self.cache_dir = str(Path(self.base.cache_dir).resolve())
        self.new_name = None  # without a given `sweep_dir`, a new folder of this name (or `-2`, ...), made by `run`
        if self.sweep_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            key = config_hash(self.config, self.overrides, self.axes, self.seeds)[:6]
            self.new_name = Path(self.base.output_dir).resolve() / "sweeps" / f"{stamp}-{key}"
            self.sweep_dir = str(unused_name(self.new_name))
        self.runs = self.plan()

    # --- the spec -----------------------------------------------------------------------------
    @classmethod
    def from_args(cls, config: str | None, seeds: str, assignments: list[str], **execution) -> Sweep:
        """A sweep from the command line: `key=v` fixes a value, `key=v1,v2` makes an axis."""
        axes, overrides = {}, []
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"{item!r} must look like key=value or key=v1,v2")
            key, raw = item.split("=", 1)
            values = split_values(raw)
            if len(values) > 1:
                axes[key.strip()] = values
            else:
                overrides.append(item)
        return cls(config=config, seeds=parse_seeds(seeds), axes=axes, overrides=overrides, **execution)

    @classmethod
    def from_yaml(cls, path: str | Path, **execution) -> Sweep:
        """A sweep from a YAML file with `config`, `seeds` (a list or a string like 0-9), `axes`
        (key: [values]) or `settings` (name: {key: value, ...}), `overrides` (key: value), and the
        `title` and `description` of its report."""
        if not Path(path).is_file():
            raise ConfigError(f"sweep file {path} is not a file (the sweep files of the experiments are in "
                              "experiments/sweeps/)")
        data = read_yaml(Path(path), "sweep file")
        valid = {"config", "seeds", "axes", "settings", "overrides", "title", "description"}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"sweep file {path}: unknown key(s) {unknown} (valid: {', '.join(sorted(valid))})")

        def mapping(key: str, of: str = "values") -> dict:
            value = data.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"sweep file {path}: {key} must be a mapping of keys to {of}, got {value!r}")
            return value

        for key in ("config", "title", "description"):
            if not isinstance(data.get(key), (str, type(None))):
                raise ConfigError(f"sweep file {path}: {key} must be a string, got {data[key]!r}")
        seeds = data.get("seeds", [0])
        if isinstance(seeds, str):
            seeds = parse_seeds(seeds, f"sweep file {path}: seeds")
        elif not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise ConfigError(f"sweep file {path}: seeds must be a list of integers or a string like 0-9, got {seeds!r}")
        elif len(set(seeds)) != len(seeds):
            raise ConfigError(f"sweep file {path}: seeds {seeds} name a seed twice")
        axes = mapping("axes", "lists of values")
        for key, values in axes.items():
            if not isinstance(values, list):
                raise ConfigError(f"sweep file {path}: axes.{key} must be a list of values, got {values!r}")
        settings = mapping("settings", "settings (each a mapping of config keys to values)")
        for name, setting in settings.items():
            if not isinstance(setting, dict):
                raise ConfigError(f"sweep file {path}: settings.{name} must be a mapping of config keys to values, "
                                  f"got {setting!r}")
        axes = {key: [as_override(key, v).split("=", 1)[1] for v in values] for key, values in axes.items()}
        overrides = [as_override(key, value) for key, value in mapping("overrides").items()]
        named = {str(name): {key: as_override(key, value).split("=", 1)[1] for key, value in setting.items()}
                 for name, setting in settings.items()}
        return cls(config=data.get("config"), seeds=seeds, axes=axes, overrides=overrides, named=named,
                   title=data.get("title"), description=data.get("description"), **execution)

    @classmethod
    def resumed(cls, source: str | Path, **execution) -> Sweep:
        """The sweep recorded in the sweep directory `source`: its finished runs are kept, the others run
        (or resume from their checkpoints). `source` may also be a sweep's kept record (`sweep.json`
        copied beside a results page, as `cqlsac report --results` keeps it): the sweep then carries on
        in a new directory of the same name, e.g. in a later session; its unfinished runs start over."""
        source, recorded = Path(source), load_record(source)
        spec = recorded["spec"]
        sweep = dict(config=spec["config"], seeds=spec["seeds"], axes=spec["axes"], overrides=spec["overrides"],
                     named=spec.get("named", {}), title=spec.get("title"), description=spec.get("description"))
        if source.is_dir():
            return cls(**sweep, sweep_dir=str(source), **execution)
        output_dir = PipelineConfig.from_yaml(spec["config"], spec["overrides"]).output_dir
        sweep_dir = Path(output_dir).resolve() / "sweeps" / record_name(source)
        if (sweep_dir / SWEEP_FILE).exists():
            raise ConfigError(f"{sweep_dir} already carries on this record: resume it with --resume {sweep_dir}")
        check_same_data(recorded["runs"])
        cls(**sweep, sweep_dir=str(sweep_dir), **execution)  # every option and run config checked before the copy
        ensure_writable(sweep_dir, "--resume", f"a kept record carries on under its config's output_dir "
                                               f"({output_dir}): run from a folder where that is writable")
        atomic_json(sweep_dir / SWEEP_FILE, recorded)
        return cls(**sweep, sweep_dir=str(sweep_dir), **execution)

    def settings(self) -> list[dict[str, str]]:
        """The named settings, or every combination of the axes' values, the first axis varying slowest."""
        if self.named:
            return list(self.named.values())
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))]

    def plan(self) -> list[SweepRun]:
        """The runs, setting by setting (so that runs at once differ in seed and share no stage), with the
        status of any earlier attempt of this sweep directory: a finished run is kept by its summary in
        `sweep.json`, whether or not its run directory is still there."""
        earlier, self.earlier_sessions = {}, []
        record = Path(self.sweep_dir) / SWEEP_FILE
        if record.is_file():
            recorded = json.loads(record.read_text())
            check_same_data(recorded["runs"])
            earlier = {(r["setting"], r["seed"]): r for r in recorded["runs"]}
            self.earlier_sessions = recorded.get("sessions") or [
                {key: recorded.get(key) for key in ("command", "started", "wall_seconds")}]
            for session in self.earlier_sessions:  # records from before sessions named their machine
                session.setdefault("machine", recorded.get("machine"))
        runs, writers = [], {}
        for index, setting in enumerate(self.settings()):
            for seed in self.seeds:
                cfg = self.run_config(setting, seed)  # every config is valid before any run starts
                self.check_dataset_target(cfg, f"[{self.label(index)} | seed {seed}]", writers)
                optim = cfg.offline.optim
                if self.vectorise_offline and (optim.actor_every != 1 or optim.critic_grad_clip is not None):
                    raise ConfigError("--vectorise-offline updates every parameter at every step, without gradient "
                                      "clipping: it needs offline.optim.actor_every=1 and no "
                                      "offline.optim.critic_grad_clip")
                run_dir = Path(self.sweep_dir) / "runs" / f"{index:02d}-seed{seed}"
                done = earlier.get((index, seed))
                finished = done is not None and done["status"] == "finished" and done.get("summary") is not None
                runs.append(SweepRun(**done) if finished else SweepRun(index, seed, setting, str(run_dir)))
        return runs

    @staticmethod
    def check_dataset_target(cfg: PipelineConfig, run: str, writers: dict[str, tuple[str, str]]) -> None:
        """Two runs that would write different datasets under one `dataset.save_as` are refused before
        any run starts (else the second stops at its dataset stage, after its pretraining).
        `writers` maps each id to the first run writing it and that run's dataset stage key."""
        if cfg.dataset.save_as is None:
            return
        from cqlsac.pipeline.pipeline import Pipeline  # torch: only for sweeps that name their dataset

        pipe = Pipeline(cfg)
        if "dataset" not in pipe.plan():
            return
        key = pipe.stage_key("dataset")
        first, first_key = writers.setdefault(cfg.dataset.save_as, (run, key))
        if key != first_key:
            raise ConfigError(f"dataset.save_as={cfg.dataset.save_as}: runs {first} and {run} would write different "
                              "datasets under this one id; drop dataset.save_as (each run then names its own), or "
                              "make the dataset once and sweep on it with dataset.name")

    def run_overrides(self, setting: dict[str, str], seed: int) -> list[str]:
        """The run's overrides: the fixed ones, its setting, its seed and the cache as an absolute path."""
        fixed = [o for o in self.overrides if o.split("=", 1)[0].strip() != "cache_dir"]
        return [*fixed, *(f"{key}={value}" for key, value in setting.items()), f"seed={seed}",
                f"cache_dir={self.cache_dir}"]

    def run_config(self, setting: dict[str, str], seed: int) -> PipelineConfig:
        return PipelineConfig.from_yaml(self.config, self.run_overrides(setting, seed))

    # --- running ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every unfinished run; returns the sweep record (also in `sweep.json`). Ctrl-C stops the
        whole sweep: running runs save their checkpoints and are marked interrupted (see `schedule`)."""
        from tqdm.auto import tqdm

        ensure_writable(Path(self.cache_dir), "cache_dir")  # before anything is written, as for a run
        if self.new_name is not None:  # a folder no other sweep writes: if another took the name meanwhile, the next
            claimed = str(claim_new_folder(self.new_name))
            if claimed != self.sweep_dir:
                self.sweep_dir = claimed
                self.runs = self.plan()  # the run folders go under it
            self.new_name = None
        else:
            ensure_output_writable(Path(self.sweep_dir), bool(self.earlier_sessions), "sweep")
        ray = RayBackend(self.threads, self.address) if self.backend == "ray" else None  # connected before any write
        try:
            started = time.time()
            todo = [run for run in self.runs if run.status != "finished"]
            self.save(started, None)
            tasks = {id(run): self.task(run) for run in todo}
            if self.vectorise_offline:
                self.offline_together(todo, tasks)
        except BaseException:
            if ray is not None:
                ray.close()
            raise
        backend = ray or LocalBackend(self.workers)  # `schedule` closes it
        with tqdm(total=len(self.runs), initial=len(self.runs) - len(todo), desc="sweep", unit="run") as bar:
            try:
                for run, result in schedule(todo, tasks, self.workers, backend):
                    run.status, run.error, run.summary = result["status"], result.get("error"), result.get("summary")
                    bar.update(1)
                    tqdm.write(self.progress_line(run))
                    self.save(started, None)
            except KeyboardInterrupt:
                for run in todo:
                    if run.status == "pending":
                        run.status = "interrupted"
                self.save(started, time.time())
                raise
        record = self.save(started, time.time())
        from cqlsac.pipeline import sweep_report

        sweep_report.write(Path(self.sweep_dir))
        return record

    def label(self, setting: int) -> str:
        """A setting's name in reports: its given name, or its `key=value` list."""
        if self.named:
            return list(self.named)[setting]
        return ", ".join(f"{k}={v}" for k, v in self.settings()[setting].items()) or "base config"

    def offline_together(self, runs: list[SweepRun], tasks: dict) -> None:
        """Each setting's offline stages computed together, in one process with every thread of the sweep."""
        groups: dict[int, list[dict]] = {}
        for run in runs:
            groups.setdefault(run.setting, []).append(tasks[id(run)])
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as executor:
            for setting, group in groups.items():
                if len(group) > 1:
                    job = {"runs": group, "threads": self.threads * self.workers}
                    count = executor.submit(run_offline_group, job).result()
                    print(f"[{self.label(setting)}] {count} offline stages computed together")

    def task(self, run: SweepRun) -> dict:
        return {"config": self.config, "overrides": self.run_overrides(run.overrides, run.seed),
                "run_dir": run.run_dir, "threads": self.threads}

    def progress_line(self, run: SweepRun) -> str:
        label = self.label(run.setting)
        if run.status == "finished":
            final = run.summary.get("final_eval_return")
            outcome = "finished" + (f", final return {final:.1f}" if final is not None else "")
        else:
            outcome = f"{run.status}: {run.error}"
        return f"[{label} | seed {run.seed}] {outcome}"

    def save(self, started: float, ended: float | None) -> dict:
        """Write `sweep.json`. A resumed sweep keeps its first command, start and machine; its wall time is
        the sum over its sessions (unknown while one is running or when one was cut off), each listed in
        `sessions` with its machine."""
        session = {"command": command_line(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                   "wall_seconds": None if ended is None else round(ended - started, 1), "machine": machine(),
                   "code": code_version()}
        sessions = [*self.earlier_sessions, session]
        walls = [s["wall_seconds"] for s in sessions]
        record = {
            "spec": {"config": self.config, "seeds": self.seeds, "axes": self.axes, "overrides": self.overrides,
                     "named": self.named, "title": self.title, "description": self.description},
            "command": sessions[0]["command"], "backend": self.backend, "workers": self.workers,
            "threads": self.threads, "machine": sessions[0]["machine"], "started": sessions[0]["started"],
            "wall_seconds": None if None in walls else round(sum(walls), 1), "sessions": sessions,
            "runs": [asdict(run) for run in self.runs],
        }
        atomic_json(Path(self.sweep_dir) / SWEEP_FILE, record)
        return record


@functools.cache  # a session's machine and code stay what they were: read once, not at every save
def machine() -> dict:
    """What the runs ran on: processor, cores, Python and torch's versions."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": importlib.metadata.version("torch")}


def command_line() -> str | None:
    """The command that runs this sweep, as typed: `cqlsac ...` or `python -m cqlsac.pipeline.cli ...`;
    None when called from Python."""
    program = Path(sys.argv[0])
    if program.name == "cqlsac":
        return " ".join(["cqlsac", *sys.argv[1:]])
    if program.resolve() == (Path(__file__).resolve().parent / "cli.py"):
        return " ".join(["python -m cqlsac.pipeline.cli", *sys.argv[1:]])
    return None


@functools.cache
def code_version() -> str | None:
    """The git commit of the cqlsac checkout that runs, `+changes` when its tracked files differ from
    it; None when cqlsac is not run from a git checkout (an installed package) or git is missing."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # not a checkout of cqlsac itself (e.g. a venv inside a repo)
        return None
    commit, changes = git("rev-parse", "--short=7", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return None if commit is None else commit + ("+changes" if changes else "")


# --- one run, in a worker process -------------------------------------------------------------------
def run_one(task: dict) -> dict:
    """Run (or resume) one pipeline run; its output goes to `run.log` in its run directory. Returns
    `{"status", "error", "summary"}`: a failure is one line, never an exception."""
    import torch

    from cqlsac.pipeline.pipeline import Pipeline
    from cqlsac.pipeline.supervision import DivergenceError, Interrupted, stop_on_signals

    torch.set_num_threads(task["threads"])
    run_dir = Path(task["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
        # This process runs this one task: its file descriptors go to the log too (libraries' own handlers).
        sys.stdout.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with stop_on_signals():
                if (run_dir / "config.yaml").is_file():
                    pipe = Pipeline.resumed(run_dir)
                else:
                    pipe = Pipeline(PipelineConfig.from_yaml(task["config"], task["overrides"]), run_dir=run_dir)
                return {"status": "finished", "summary": pipe.run()}
        except (Interrupted, KeyboardInterrupt):
            return {"status": "interrupted", "error": "stopped by a signal; the sweep resumes it from its checkpoints"}
        except (UserError, DivergenceError) as exc:
            return {"status": "failed", "error": str(exc).splitlines()[0]}
        except Exception as exc:  # a bug: the other runs go on, the line says where to look
            traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            return {"status": "failed", "error": f"{type(exc).__name__}: {first} (traceback in {run_dir / 'run.log'})"}


def run_offline_group(job: dict) -> int:
    """The offline stages of one setting's runs, computed together (`compute_offline_together`)."""
    import torch

    from cqlsac.pipeline.pipeline import Pipeline, compute_offline_together

    torch.set_num_threads(job["threads"])
    pipes = [Pipeline(PipelineConfig.from_yaml(t["config"], t["overrides"]), run_dir=t["run_dir"]) for t in job["runs"]]
    return compute_offline_together(pipes)


# --- backends --------------------------------------------------------------------------------------
def schedule(runs: list[SweepRun], tasks: dict, workers: int, backend) -> Iterator[tuple[SweepRun, dict]]:
    """Up to `workers` runs in flight on `backend`; yields each run with its result as it ends. On
    Ctrl-C the runs in flight are stopped (they save a checkpoint) and recorded as they end. A run
    that ends interrupted (a signal reached it: Ctrl-C, SIGTERM, a kill) stops them all the same way,
    also when the signal did not reach this process."""
    in_flight = {}
    queue = list(runs)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < workers:
                run = queue.pop(0)
                in_flight[backend.submit(tasks[id(run)])] = run
            interrupted = False
            for handle in backend.finished(list(in_flight)):
                run, result = in_flight.pop(handle), backend.result(handle)
                interrupted |= result["status"] == "interrupted"
                yield run, result
            if interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        backend.stop(list(in_flight))
        for handle, run in in_flight.items():
            result = backend.result(handle, stopped=True)
            run.status, run.error = result["status"], result.get("error")
        raise
    finally:
        backend.close()


class LocalBackend:
    """Each run in a fresh worker process of this machine."""

    def __init__(self, workers: int):
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                            max_tasks_per_child=1)
        self.previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def submit(self, task: dict):
        return self.executor.submit(run_one, task)

    def finished(self, handles: list) -> list:
        # With a timeout, so that the main thread wakes to take a signal delivered to another thread.
        while True:
            done = wait(handles, timeout=0.5, return_when=FIRST_COMPLETED)[0]
            if done:
                return list(done)

    def result(self, future, stopped: bool = False) -> dict:
        if future.cancelled():
            return {"status": "interrupted"}
        try:
            return future.result()
        except Exception as exc:  # the worker process died
            return {"status": "failed", "error": f"worker process failed: {type(exc).__name__}: {exc}"}

    def stop(self, handles: list) -> None:
        # Ctrl-C reached every process of the group; a SIGTERM to the sweep alone is passed on to the runs.
        for process in list(getattr(self.executor, "_processes", {}).values()):
            _signal_quietly(process.pid, signal.SIGINT)

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)
        self.executor.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Each run a Ray task asking for `threads` CPUs, in a fresh worker process, never retried."""

    def __init__(self, threads: int, address: str | None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports to Ray's servers
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray on a local instance
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray: pip install -e '.[ray]'") from None
        self.ray = ray
        self.owns = not ray.is_initialized()
        if self.owns:
            try:
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         **({} if address else {"num_cpus": os.cpu_count()}))
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"Ray did not start or connect{f' to {address}' if address else ''} "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        self.remote = ray.remote(num_cpus=threads, max_retries=0, max_calls=1)(run_one)

    def submit(self, task: dict):
        return self.remote.remote(task)

    def finished(self, handles: list) -> list:
        while True:  # with a timeout, so that the main thread takes Ctrl-C at once
            ready = self.ray.wait(handles, num_returns=1, timeout=0.5)[0]
            if ready:
                return ready

    def result(self, ref, stopped: bool = False) -> dict:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if stopped:
                return {"status": "interrupted"}
            return {"status": "failed", "error": f"Ray: {type(exc).__name__}: {str(exc).splitlines()[0]}"}

    def stop(self, handles: list) -> None:
        for ref in handles:
            self.ray.cancel(ref)

    def close(self) -> None:
        if self.owns:
            self.ray.shutdown()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass

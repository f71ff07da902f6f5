"""The declarative CQL-SAC pipeline: it wires components from a `PipelineConfig` and runs the stages.

`Pipeline.run` plans the stages (`stages.stage_table`), then runs or reuses each one in
dependency order; a stage works through a `StageContext`, which holds what it may read of the
config, its folder, its inputs' outputs and the factories of its agents, collectors and evaluations.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType

from cqlsac.components.allocator import keep_freed_memory
from cqlsac.components.checkpoints import atomic_write, save_policy
from cqlsac.components.collector import make_collector
from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.envs import check_env, make_env
from cqlsac.components.evaluation import evaluate_policy
from cqlsac.components.networks import action_bounds, is_discrete
from cqlsac.components.update import Agent, make_agent
from cqlsac.datasets import check_dataset_fits, check_spaces, load_offline_replay
from cqlsac.pipeline import report
from cqlsac.pipeline.cache import (
    ConfigView,
    claim_new_folder,
    ensure_output_writable,
    ensure_writable,
    finish,
    finished_outputs,
    read_values,
    remove_if_unused,
    stage_lock,
    unused_name,
)
from cqlsac.pipeline.config import ConfigError, OnlineConfig, PipelineConfig, config_hash, finetune_loss, read_yaml
from cqlsac.pipeline.stages import (
    STAGE_NAMES,
    Stage,
    check_dataset_target,
    run_offline_together,
    stage_table,
)
from cqlsac.pipeline.supervision import STATE_SUFFIX, CurveRecord, OnlineRecord, Supervisor, stop_if_requested


class MetricsLog:
    """Training curves in the run directory (TorchRL's CSV logger, or TensorBoard), made on first use."""

    def __init__(self, run_dir: Path, kind: str):
        self.run_dir, self.kind = run_dir, kind
        self._logger = None

    @property
    def logger(self):
        if self._logger is None:
            from torchrl.record.loggers import CSVLogger, TensorboardLogger

            logger_cls = TensorboardLogger if self.kind == "tensorboard" else CSVLogger
            self._logger = logger_cls(exp_name="logs", log_dir=str(self.run_dir))
        return self._logger

    def log(self, prefix: str, metrics: TensorDictBase, step: int) -> None:
        for key, value in metrics.items():
            self.logger.log_scalar(f"{prefix}/{key}", float(value), step=step)

    def scalar(self, name: str, value: float, step: int) -> None:
        self.logger.log_scalar(name, value, step=step)

    def drop_after(self, prefix: str, step: int) -> None:
        """Drop the CSV rows of `prefix` after `step`, which a resumed loop logs again (and a last
        row cut short by a kill)."""
        for path in (self.run_dir / "logs" / "scalars" / prefix).glob("*.csv"):
            rows = path.read_text().splitlines(keepends=True)
            atomic_write(path, "".join(row for row in rows if row.endswith("\n") and float(row.split(",", 1)[0]) <= step))


@dataclass
class StageContext:
    """What one stage works with: the config fields it declared, its folder and cache key, its
    inputs' outputs, the run's log, and factories wired from the config."""

    name: str
    cfg: ConfigView
    dir: Path
    key: str
    seed: int
    inputs: dict[str, dict]
    log: MetricsLog
    resume: bool
    supervisors: list[Supervisor] = field(default_factory=list)

    def env(self):
        return make_env(self.cfg.env.id, env_kwargs=self.cfg.env.kwargs)

    def agent(self, loss: LossConfig, optim: OptimConfig, network: NetworkConfig | None = None) -> Agent:
        """A fresh agent for the env's specs (networks from `network`, else the config's)."""
        env = self.env()
        agent = make_agent(env, network or self.cfg.network, loss, optim, compile=self.cfg.compile)
        env.close()
        return agent

    def collector_after(self, actor, schedule: OnlineConfig, seed: int) -> Callable[[int], Collector]:
        """`frames_done -> Collector` for the rest of an online loop.

        A resumed loop cannot restore its env, so it carries on with a fresh collector for the
        frames still to collect, seeded apart from the first one so it does not replay its episodes.
        """
        env_id, env_kwargs = self.cfg.env.id, self.cfg.env.kwargs

        def collector(frames_done: int) -> Collector:
            return make_collector(partial(make_env, env_id, env_kwargs=env_kwargs, num_envs=schedule.num_envs), actor,
                                  frames_per_batch=schedule.frames_per_batch,
                                  total_frames=schedule.frames - frames_done,
                                  init_random_frames=max(schedule.init_random_frames - frames_done, 0),
                                  seed=seed + frames_done)
        return collector

    def evaluation_returns(self, actor, episodes: int,
                           exploration: ExplorationType = ExplorationType.DETERMINISTIC) -> list[float]:
        """Returns of `episodes` episodes (the deterministic policy unless `exploration` says otherwise);
        every evaluation of a run starts from `evaluate.seed`."""
        return evaluate_policy(actor, self.cfg.env.id, self.cfg.env.kwargs, episodes, self.cfg.evaluate.seed,
                               exploration)

    def mean_return(self, actor, episodes: int) -> float:
        returns = self.evaluation_returns(actor, episodes)
        return sum(returns) / len(returns)

    def supervisor(self, agent: Agent, record: OnlineRecord | CurveRecord | None = None,
                   unit: str = "frame") -> Supervisor:
        """The supervisor of this stage's training loop, whose steps are collected frames (an online
        loop) or updates (`unit="update"`), checkpointing to `<stage dir>/<stage>.state.pt`."""
        checkpoints = self.cfg.checkpoints
        supervisor = Supervisor(
            agent, name=self.name, unit=unit, path=self.dir / f"{self.name}{STATE_SUFFIX}", config_key=self.key,
            every=checkpoints.offline_every if unit == "update" else checkpoints.online_every,
            q_bound=self.cfg.q_value_bound, resume=self.resume, record=record,
            on_resume=partial(self.log.drop_after, self.name))
        self.supervisors.append(supervisor)
        return supervisor

    def save_policy(self, path: Path, actor, network: NetworkConfig, **info) -> None:
        save_policy(path, actor, self.cfg.env.id, network, self.cfg.env.kwargs, **info)

    def offline_replay(self, batch_size: int | None):
        """The offline dataset as a replay buffer, after checking that it fits the env."""
        dataset_id = self.inputs["dataset"]["dataset_id"]
        replay, info = load_offline_replay(dataset_id, batch_size=batch_size, gamma=self.cfg.offline.loss.gamma)
        env = self.env()
        check_spaces(info, env)
        env.close()
        warn_if_recorded_elsewhere(info, self.cfg.env.id, self.cfg.env.kwargs)
        return replay, info

    def seconds_before(self) -> float:
        """Compute time of this stage in the interrupted runs it resumed from."""
        return sum(supervisor.seconds_before for supervisor in self.supervisors)


def warn_if_recorded_elsewhere(info, env_id: str, env_kwargs: dict) -> None:
    """Warn when the dataset was recorded on another env id or kwargs: its spaces may match while
    its dynamics differ (e.g. Pendulum with another `g`), so its policy is trained on one task and
    evaluated on another."""
    if info.env_spec is None:
        return
    env = gym.make(env_id, **env_kwargs)  # its spec as gym.make settles it
    ours, recorded = env.spec, info.env_spec
    env.close()
    if (ours.id, ours.kwargs, ours.max_episode_steps) != (recorded.id, recorded.kwargs, recorded.max_episode_steps):
        warnings.warn(f"dataset {info.dataset_id!r} was recorded on {recorded.id} with kwargs {recorded.kwargs} "
                      f"and a time limit of {recorded.max_episode_steps} steps, but the pipeline runs {ours.id} "
                      f"with kwargs {ours.kwargs} and {ours.max_episode_steps}", stacklevel=2)


def check_action_family(cfg: PipelineConfig, action_spec) -> None:
    """An env with neither Box nor Discrete actions, or an option of one action family set for the
    other, is a `ConfigError` naming the key."""
    if not is_discrete(action_spec):
        try:
            action_bounds(action_spec)
        except TypeError as exc:
            raise ConfigError(f"env.id {cfg.env.id}: {exc}") from None
    discrete = is_discrete(action_spec)
    losses = {"offline.loss": cfg.offline.loss}
    if cfg.finetune.cql_weight is not None or cfg.finetune.calibrated:
        losses["finetune (its loss)"] = finetune_loss(cfg.offline.loss, cfg.finetune)
    for key, loss in losses.items():
        if discrete and loss.num_actions != LossConfig().num_actions:
            raise ConfigError(f"{key}.num_actions samples continuous actions; {cfg.env.id} has discrete ones, over "
                              "which the logsumexp is exact: remove it")
        if not discrete and loss.cql_subtracted != "data_action":
            raise ConfigError(f"{key}.cql_subtracted={loss.cql_subtracted!r} is for discrete actions; {cfg.env.id} "
                              "has continuous ones")
    if discrete and cfg.network.scale_lb != NetworkConfig().scale_lb:
        raise ConfigError(f"network.scale_lb bounds a Gaussian's scale; {cfg.env.id} has discrete actions: remove it")


class Pipeline:
    """Wires components from a `PipelineConfig` and runs the named stages in dependency order."""

    def __init__(self, cfg: PipelineConfig, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.table: dict[str, Stage] = stage_table(cfg)
        self.resume = resume  # continue interrupted stages from their in-stage checkpoints
        stamp = time.strftime("%Y%m%d-%H%M%S")
        # Without a given `run_dir`, a new folder of this name (or `-2`, `-3`, ...), made by `claim_run_dir`.
        self.new_name = None if run_dir else Path(cfg.output_dir) / f"{stamp}-{config_hash(cfg)[:6]}"
        self.run_dir = Path(run_dir) if run_dir else unused_name(self.new_name)
        self.outputs: dict[str, dict] = {}
        self.stage_seconds: dict[str, float] = {}
        self._keys: dict[str, str] = {}
        self.log = MetricsLog(self.run_dir, cfg.logger)

    @classmethod
    def from_yaml(cls, path=None, overrides=(), run_dir=None) -> Pipeline:
        """The pipeline of a YAML config (a path or a bundled name such as `lunarlander`; None: the default)."""
        return cls(PipelineConfig.from_yaml(path, list(overrides)), run_dir)

    @classmethod
    def resumed(cls, run_dir: str | Path) -> Pipeline:
        """The pipeline of an interrupted run, from its `config.yaml`; it continues where the run stopped."""
        config = Path(run_dir) / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml in it); pass the folder "
                              "that `cqlsac run` printed as its run directory")
        data = read_yaml(config)
        if not data:  # a run writes its whole config: an empty one would resume as the defaults
            raise ConfigError(f"{config} is empty, not the config a run wrote: {run_dir} cannot be resumed")
        return cls(PipelineConfig.from_dict(data), run_dir, resume=True)

    def claim_run_dir(self) -> None:
        """Make sure the run directory is this run's: a name chosen here becomes a folder that no other
        run writes (`claim_new_folder`); a given one (`--resume`, a sweep's) must be writable."""
        if self.new_name is not None:
            self.run_dir = claim_new_folder(self.new_name)
            self.log = MetricsLog(self.run_dir, self.cfg.logger)
            self.new_name = None  # a second `run` writes into it again
        else:
            ensure_output_writable(self.run_dir, self.resume, "run")

    # --- the stage graph --------------------------------------------------------------------
    def stage_key(self, name: str) -> str:
        """The cache key of stage `name`: what it reads of the config, its inputs' keys, its data and version."""
        if name not in self._keys:
            stage = self.table[name]
            versioned = name if stage.version == 1 else f"{name}-v{stage.version}"
            parts = [read_values(self.cfg, stage.reads), *[self.stage_key(i) for i in stage.inputs]]
            if stage.data_digest is not None:
                parts.append(stage.data_digest(self.cfg))  # a dataset re-created under the same name is other data
            self._keys[name] = config_hash(versioned, self.stage_seed(name), *parts)
        return self._keys[name]

    def stage_seed(self, name: str) -> int:
        return self.cfg.seed + self.table[name].seed_offset(self.cfg)

    def stage_dir(self, name: str) -> Path:
        # Absolute, so that the paths stages record in their outputs work from any working directory.
        return Path(self.cfg.cache_dir).resolve() / f"{name}-{self.stage_key(name)}"

    def plan(self, stages=None) -> list[str]:
        """The stages to run, with the stages they read, in dependency order (stages that a named
        dataset replaces are left out)."""
        order: list[str] = []

        def visit(name):
            if name not in order:
                for dep in self.table[name].inputs:
                    visit(dep)
                order.append(name)

        for name in stages or self.cfg.stages:
            if name in self.table:
                visit(name)
        return order

    def finished_outputs(self, name: str) -> dict | None:
        """What stage `name` wrote when it finished for this config; None if it has not (or its outputs
        can no longer be used)."""
        outputs = finished_outputs(self.stage_dir(name))
        return outputs if outputs is not None and self.table[name].intact(outputs) else None

    # --- running ----------------------------------------------------------------------------
    def check(self, plan: list[str]) -> None:
        """Fail before anything is written: an env the agents cannot run (`check_env`), a named dataset
        that is not local, does not fit the env or is truncated, a dataset the run would write over, a
        folder that cannot be written."""
        check_env(self.cfg.env.id, self.cfg.env.kwargs)
        env = make_env(self.cfg.env.id, env_kwargs=self.cfg.env.kwargs)
        try:
            check_action_family(self.cfg, env.action_spec)
            if self.cfg.dataset.name is not None:
                check_dataset_fits(self.cfg.dataset.name, env)
        finally:
            env.close()
        for name in plan:
            self.stage_key(name)
        # A dataset stage that will run must not write over a local dataset. Where its folder exists,
        # another run may be writing it now; the stage checks again under its lock.
        save_as = self.cfg.dataset.save_as
        if "dataset" in plan and save_as is not None and not self.stage_dir("dataset").exists():
            check_dataset_target(save_as)
        ensure_writable(Path(self.cfg.cache_dir), "cache_dir")

    def run(self, stages=None) -> dict:
        """Run (or reuse) the stages; write the report and `summary.json`; return the summary.

        With `resume`, an interrupted stage continues from its last in-stage checkpoint; otherwise
        it starts over. Between stages a stop signal ends the run (finished stages are kept).
        """
        keep_freed_memory()  # process-wide: faster CQL updates (opt out: CQLSAC_MALLOC_TUNING=0)
        plan = self.plan(stages)
        self.check(plan)
        self.claim_run_dir()
        atomic_write(self.run_dir / "config.yaml", self.cfg.to_yaml())
        print(f"run directory: {self.run_dir}")
        self.prepare(plan)
        return report.write(self)

    def prepare(self, plan: list[str]) -> None:
        """Run or reuse the stages of `plan` in its order, each under its folder's lock, into `outputs`."""
        for name in plan:
            stop_if_requested()
            folder = self.stage_dir(name)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with stage_lock(folder, name):
                    self.outputs[name] = self.run_or_reuse(name, folder)
            finally:
                remove_if_unused(folder)

    def context(self, name: str) -> StageContext:
        """What stage `name` works with (its inputs must have finished): the wiring a stage, an
        experiment or a notebook builds agents, replay, collectors and evaluations from."""
        stage = self.table[name]
        inputs = {}
        for source in stage.inputs:
            outputs = self.outputs.get(source) or self.finished_outputs(source)
            if outputs is None:
                raise ConfigError(f"stage {source!r} has not finished for this config; run it first "
                                  f"(cqlsac run ... stages=[{source}])")
            inputs[source] = outputs
        return StageContext(name=name, cfg=ConfigView(self.cfg, stage.reads, name), dir=self.stage_dir(name),
                            key=self.stage_key(name), seed=self.stage_seed(name), inputs=inputs, log=self.log,
                            resume=self.resume)

    def run_or_reuse(self, name: str, folder: Path) -> dict:
        """The outputs of stage `name`: those it wrote for this config before, else those of a run now."""
        finished = self.finished_outputs(name)
        if finished is not None:
            print(f"[{name}] reusing {folder}")
            return finished
        ctx = self.context(name)
        stage = self.table[name]
        torch.manual_seed(self.torch_seed(name))
        start = time.perf_counter()
        outputs = stage.run(ctx)
        seconds = round(ctx.seconds_before() + time.perf_counter() - start, 2)
        self.stage_seconds[name] = seconds
        finish(folder, {**outputs, "seconds": seconds})
        return finished_outputs(folder)

    def torch_seed(self, name: str) -> int:
        """torch's seed at the start of stage `name`: each stage draws its own stream, whatever ran before it."""
        return self.stage_seed(name) + 1000 * STAGE_NAMES.index(name)

    def copy_final_policy(self) -> Path | None:
        """The fine-tuned policy, copied into the run directory (what `cqlsac eval RUN_DIR` evaluates)."""
        source = self.outputs.get("finetune", {}).get("policy")
        if source is None:
            return None
        target = self.run_dir / "policy.pt"
        atomic_write(target, Path(source).read_bytes())
        return target


def compute_offline_together(pipes: list[Pipeline], compile: bool = True) -> int:
    """The unfinished offline stages of `pipes` (runs whose offline settings are the same; seeds and
    datasets may differ), computed as one vectorised update of all their agents
    (`stages.run_offline_together`) into each run's own stage folder; returns how many. The stages
    they read are run (or reused) first, one run after another. Each pipeline's later `run`
    reuses its offline stage."""
    from contextlib import ExitStack

    todo = [p for p in pipes if "offline" in p.table and p.finished_outputs("offline") is None]
    if len(todo) < 2:
        return 0
    reads = todo[0].table["offline"].reads
    if any(read_values(p.cfg, reads) != read_values(todo[0].cfg, reads) for p in todo):
        raise ConfigError("offline stages computed together must share every offline setting but the seed")
    for pipe in todo:
        pipe.prepare([name for name in pipe.plan(["offline"]) if name != "offline"])
    with ExitStack() as locks:
        for pipe in todo:
            folder = pipe.stage_dir("offline")
            folder.mkdir(parents=True, exist_ok=True)
            locks.enter_context(stage_lock(folder, "offline"))
        todo = [p for p in todo if p.finished_outputs("offline") is None]  # another run may have finished some
        start = time.perf_counter()
        outputs = run_offline_together([p.context("offline") for p in todo], [p.torch_seed("offline") for p in todo],
                                       compile)
        seconds = round((time.perf_counter() - start) / max(len(todo), 1), 2)
        for pipe, out in zip(todo, outputs):
            finish(pipe.stage_dir("offline"), {**out, "seconds": seconds, "computed_with": len(todo)})
    return len(todo)

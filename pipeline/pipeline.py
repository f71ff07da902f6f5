"""The declarative CQL-SAC pipeline: pretrain -> dataset -> offline -> finetune -> evaluate.

Each stage declares the stages it reads and the config sections it depends on. Its outputs go to
`cache_dir/<stage>-<hash>/`, the hash covering those sections and the upstream hashes, and a stage
whose outputs exist is not run again: changing only `finetune.*` reruns finetune and evaluate.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gymnasium as gym
import torch
from tensordict import TensorDict
from torchrl.record.loggers import CSVLogger, TensorboardLogger

from cqlsac.components.allocator import keep_freed_memory
from cqlsac.components.collector import make_collector
from cqlsac.components.cql_loss import CQLSACLoss, LossConfig
from cqlsac.components.envs import make_env
from cqlsac.components.networks import NetworkConfig, action_bounds, make_actor, make_critics
from cqlsac.components.replay import MixedReplay, make_online_buffer
from cqlsac.components.update import make_optimizer
from cqlsac.datasets import check_spaces, dataset_fingerprint, is_local, load_offline_replay, normalized_score
from cqlsac.pipeline import report
from cqlsac.pipeline.checkpoints import atomic_write_text, load_agent, load_policy, save_agent, save_policy
from cqlsac.pipeline.config import STAGES, ConfigError, PipelineConfig, config_hash
from cqlsac.pipeline.dataset_creation import create_dataset, write_replay_dataset
from cqlsac.pipeline.training import (
    STATE_SUFFIX,
    CurveRecord,
    EpisodeAccumulator,
    OnlineRecord,
    Supervisor,
    evaluate_policy,
    stop_if_requested,
    train_offline,
    train_online,
)

STAGE_SEED_OFFSET = {name: 1000 * i for i, name in enumerate(STAGES)}
SAC_BASELINE_SEED_OFFSET = 1000 * len(STAGES)
OUTPUTS = "outputs.json"  # written last by a stage that finished: its presence marks the stage done


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    sections: Callable[[PipelineConfig], tuple]
    run: Callable[["Pipeline", Path], dict]
    # Raised when the stage computes something else for the same config, so that outputs cached by
    # older code are not reused (version 1 adds nothing to the cache key).
    version: int = 1


def atomic_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def ensure_writable(folder: Path, key: str) -> None:
    """Create `folder` and write a probe file in it, so an unusable `key` fails before any training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {folder} ({exc.strerror or exc}); "
                          f"set {key}=DIR to a writable folder") from None


@contextmanager
def stage_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold the lock of one stage folder: two runs that need the same stage do not write it at once;
    the second waits, then reuses what the first wrote. The OS drops the lock if the holder dies.

    The lock file is opened read-only, so a user who may only read a shared cache can still lock
    it (or, where the file cannot be made, reuse finished stages unlocked). A stop signal ends the wait.
    """
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except PermissionError:
        yield
        return
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    print(f"[{name}] waiting for another run that is computing {folder}")
                    announced = True
                stop_if_requested()
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


class Pipeline:
    """Wires components from a `PipelineConfig` and runs the named stages in dependency order."""

    def __init__(self, cfg: PipelineConfig, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.resume = resume  # continue interrupted stages from their in-stage checkpoints
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / f"{stamp}-{config_hash(cfg)[:6]}"
        self.outputs: dict[str, dict] = {}
        self.stage_seconds: dict[str, float] = {}
        self._hashes: dict[str, str] = {}
        self._logger = None

    @classmethod
    def from_yaml(cls, path=None, overrides=(), run_dir=None) -> "Pipeline":
        return cls(PipelineConfig.from_yaml(path, list(overrides)), run_dir)

    @classmethod
    def resumed(cls, run_dir: str | Path) -> "Pipeline":
        """The pipeline of an interrupted run, from its `config.yaml`; it continues where the run stopped."""
        config = Path(run_dir) / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml in it); pass the folder "
                              "that `cqlsac run` printed as its run directory")
        return cls(PipelineConfig.from_yaml(config), run_dir, resume=True)

    # --- wiring ---------------------------------------------------------------------------
    def env(self, seed: int | None = None):
        return make_env(self.cfg.env.id, seed=seed, env_kwargs=self.cfg.env.kwargs)

    def new_agent(self, loss_cfg, network: NetworkConfig | None = None):
        """Fresh actor, critics, loss for the env's specs (networks from `network`, else the config's)."""
        network = network or self.cfg.network
        env = self.env()
        obs_spec, act_spec = env.observation_spec["observation"], env.action_spec
        env.close()
        actor = make_actor(obs_spec, act_spec, network)
        critic = make_critics(obs_spec, act_spec, network)
        return CQLSACLoss(actor, critic, loss_cfg)

    def check_env(self) -> None:
        """Make the env once, so an unknown id, bad kwargs or discrete actions fail before any output is written."""
        try:
            env = self.env()
        except (TypeError, gym.error.Error) as exc:
            raise ConfigError(f"env.kwargs {self.cfg.env.kwargs} do not work with {self.cfg.env.id} "
                              f"({str(exc).splitlines()[0]}); fix or remove env.kwargs") from None
        try:
            action_bounds(env.action_spec)
        except TypeError as exc:
            raise ConfigError(f"env.id {self.cfg.env.id}: {exc}; pick an env with continuous actions "
                              "(LunarLander-v3 has them with env.kwargs: {continuous: true})") from None
        finally:
            env.close()

    def supervisor(self, stage: str, part: str, loss, optimizer,
                   record: OnlineRecord | CurveRecord | None = None) -> Supervisor:
        """The supervisor of one training loop of `stage`, checkpointing to `<stage dir>/<part>.state.pt`."""
        offline = stage == "offline"
        every = self.cfg.checkpoints.offline_every if offline else self.cfg.checkpoints.online_every
        return Supervisor(part, "update" if offline else "frame", self.stage_dir(stage) / f"{part}{STATE_SUFFIX}",
                          f"{self.stage_hash(stage)}/{part}", loss, optimizer, every, self.cfg.q_value_bound,
                          self.resume, record, on_resume=lambda step: self.drop_logs_after(part, step))

    def collectors(self, actor, frames_per_batch: int, total_frames: int, seed: int, init_random_frames: int = 0):
        """`frames_done -> Collector` for the rest of an online loop.

        A resumed loop cannot restore its env, so it carries on with a fresh collector for the
        frames still to collect, seeded apart from the first one so it does not replay its episodes.
        """
        def new_collector(frames_done: int):
            return make_collector(self.env, actor, frames_per_batch=frames_per_batch,
                                  total_frames=total_frames - frames_done,
                                  init_random_frames=max(init_random_frames - frames_done, 0), seed=seed + frames_done)
        return new_collector

    def evaluation_returns(self, actor, episodes: int) -> list[float]:
        """Returns of `episodes` deterministic episodes; every evaluation of a run starts from `evaluate.seed`."""
        return evaluate_policy(actor, self.cfg.env.id, self.cfg.env.kwargs, episodes, self.cfg.evaluate.seed)

    def evaluate(self, actor, episodes: int) -> float:
        returns = self.evaluation_returns(actor, episodes)
        return sum(returns) / len(returns)

    def log(self, prefix: str, metrics, step: int) -> None:
        for key, value in metrics.items():
            self.logger.log_scalar(f"{prefix}/{key}", float(value), step=step)

    def drop_logs_after(self, prefix: str, step: int) -> None:
        """Drop the CSV log rows of `prefix` after `step`, which a resumed loop logs again.

        A last row cut short by a kill goes too.
        """
        for path in (self.run_dir / "logs" / "scalars" / prefix).glob("*.csv"):
            rows = path.read_text().splitlines(keepends=True)
            atomic_write_text(path, "".join(row for row in rows
                                            if row.endswith("\n") and float(row.split(",", 1)[0]) <= step))

    @property
    def logger(self):
        if self._logger is None:
            logger_cls = TensorboardLogger if self.cfg.logger == "tensorboard" else CSVLogger
            self._logger = logger_cls(exp_name="logs", log_dir=str(self.run_dir))
        return self._logger

    # --- orchestration --------------------------------------------------------------------
    def stage_hash(self, name: str) -> str:
        if name not in self._hashes:
            stage = STAGE_TABLE[name]
            versioned = name if stage.version == 1 else f"{name}-v{stage.version}"
            parts = [*stage.sections(self.cfg), *[self.stage_hash(i) for i in self.inputs_of(stage)]]
            if "dataset" in stage.inputs and self.cfg.dataset.name is not None:
                # A dataset re-created under the same name is other data: what read it runs again.
                parts.append(dataset_fingerprint(self.cfg.dataset.name))
            self._hashes[name] = config_hash(versioned, self.cfg.seed, *parts)
        return self._hashes[name]

    def inputs_of(self, stage: Stage) -> tuple[str, ...]:
        # A named dataset replaces the pretrain and dataset stages.
        if self.cfg.dataset.name is not None:
            return tuple(i for i in stage.inputs if i not in ("pretrain", "dataset"))
        return stage.inputs

    def plan(self, stages=None) -> list[str]:
        """The stages to run, with the stages they need, in dependency order."""
        wanted = list(stages or self.cfg.stages)
        order: list[str] = []

        def visit(name):
            if name in order:
                return
            for dep in self.inputs_of(STAGE_TABLE[name]):
                visit(dep)
            order.append(name)

        for name in wanted:
            if self.cfg.dataset.name is not None and name in ("pretrain", "dataset"):
                continue
            visit(name)
        return order

    def stage_dir(self, name: str) -> Path:
        # Absolute, so that the paths stages record in their outputs work from any working directory.
        return Path(self.cfg.cache_dir).resolve() / f"{name}-{self.stage_hash(name)}"

    def finished_outputs(self, name: str) -> dict | None:
        """What stage `name` wrote when it finished for this config; None if it has not finished.

        A dataset stage whose Minari dataset is no longer in the local store (deleted, or another
        MINARI_DATASETS_PATH) has not finished: it runs again.
        """
        done = self.stage_dir(name) / OUTPUTS
        if not done.is_file():
            return None
        outputs = json.loads(done.read_text())
        if name == "dataset" and not is_local(outputs["dataset_id"]):
            return None
        return outputs

    def run(self, stages=None) -> dict:
        """Run (or reuse) the stages; write the report and `summary.json`; return the summary.

        With `resume`, an interrupted stage continues from its last in-stage checkpoint; otherwise
        it starts over. Between stages a stop signal ends the run (finished stages are kept).
        """
        keep_freed_memory()  # process-wide: ~1.2x faster CQL updates (opt out: CQLSAC_MALLOC_TUNING=0)
        self.check_env()
        ensure_writable(self.run_dir, "output_dir")
        ensure_writable(Path(self.cfg.cache_dir), "cache_dir")
        atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        print(f"run directory: {self.run_dir}")
        for name in self.plan(stages):
            stop_if_requested()
            out_dir = self.stage_dir(name)
            out_dir.mkdir(parents=True, exist_ok=True)
            with stage_lock(out_dir, name):
                self.outputs[name] = self.run_or_reuse(name, out_dir)
        summary = report.write(self)
        return summary

    def run_or_reuse(self, name: str, out_dir: Path) -> dict:
        """The outputs of stage `name`: those it wrote for this config before, else those of a run now."""
        finished = self.finished_outputs(name)
        if finished is not None:
            print(f"[{name}] reusing {out_dir}")
            return finished
        torch.manual_seed(self.cfg.seed + STAGE_SEED_OFFSET[name])
        start = time.perf_counter()
        outputs = STAGE_TABLE[name].run(self, out_dir)
        self.stage_seconds[name] = round(time.perf_counter() - start, 2)
        atomic_json(out_dir / OUTPUTS, outputs)
        for state in out_dir.glob(f"*{STATE_SUFFIX}"):
            state.unlink()
        return outputs

    # --- data sources ---------------------------------------------------------------------
    def offline_replay(self, batch_size: int | None):
        dataset_id = self.cfg.dataset.name or self.outputs["dataset"]["dataset_id"]
        gamma = self.cfg.offline.loss.gamma
        replay, info = load_offline_replay(dataset_id, batch_size=batch_size, gamma=gamma)
        env = self.env()
        check_spaces(info, env)
        env.close()
        self.warn_if_recorded_elsewhere(info)
        return replay, info

    def warn_if_recorded_elsewhere(self, info) -> None:
        """Warn when the dataset was recorded on another env id or kwargs: its spaces may match while
        its dynamics differ (e.g. Pendulum with another `g`), so its policy is trained on one task and
        evaluated on another."""
        if info.env_spec is None:
            return
        env = gym.make(self.cfg.env.id, **self.cfg.env.kwargs)  # its spec as gym.make settles it
        ours, recorded = env.spec, info.env_spec
        env.close()
        if (ours.id, ours.kwargs, ours.max_episode_steps) != (recorded.id, recorded.kwargs, recorded.max_episode_steps):
            warnings.warn(f"dataset {info.dataset_id!r} was recorded on {recorded.id} with kwargs {recorded.kwargs} "
                          f"and a time limit of {recorded.max_episode_steps} steps, but the pipeline runs {ours.id} "
                          f"with kwargs {ours.kwargs} and {ours.max_episode_steps}", stacklevel=2)


# --- the stages ---------------------------------------------------------------------------
def run_pretrain(pipe: Pipeline, out: Path) -> dict:
    """Online SAC from scratch; saves a policy checkpoint at every evaluation and its replay data."""
    cfg = pipe.cfg
    loss = pipe.new_agent(LossConfig(gamma=cfg.offline.loss.gamma, cql_weight=0.0))
    optimizer = make_optimizer(loss, cfg.pretrain.optim)
    pcfg = cfg.pretrain
    buffer = make_online_buffer(pcfg.frames)
    checkpoints = []
    supervisor = pipe.supervisor("pretrain", "pretrain", loss, optimizer, OnlineRecord(buffer, checkpoints))

    def on_eval(frames, mean_return):
        path = out / f"policy_{frames:08d}.pt"
        save_policy(path, loss.actor_network, cfg.env.id, cfg.network, cfg.env.kwargs, mean_return=mean_return,
                    frames=frames)
        checkpoints.append({"frames": frames, "return": mean_return, "path": str(path)})
        pipe.logger.log_scalar("pretrain/eval_return", mean_return, step=frames)

    new_collector = pipe.collectors(loss.actor_network, pcfg.frames_per_batch, pcfg.frames, cfg.seed,
                                    pcfg.init_random_frames)
    train_online(loss, optimizer, pcfg.optim.tau, new_collector,
                 add=lambda data: buffer.extend(data.reshape(-1)),
                 sample=lambda progress: buffer.sample(pcfg.batch_size),
                 can_update=lambda frames: frames >= pcfg.init_random_frames,
                 total_frames=pcfg.frames, utd_ratio=pcfg.utd_ratio,
                 evaluate=lambda: pipe.evaluate(loss.actor_network, pcfg.eval_episodes),
                 eval_every=pcfg.eval_every, on_eval=on_eval, log=pipe.log, supervisor=supervisor, desc="pretrain")
    replay_path = out / "replay"
    shutil.rmtree(replay_path, ignore_errors=True)
    buffer[:].exclude("collector", "loc", "scale").memmap(replay_path)
    random_return = pipe.evaluate(None, pcfg.eval_episodes)
    return {"checkpoints": checkpoints, "replay": str(replay_path), "random_return": random_return}


def pick_medium(checkpoints: list[dict], random_return: float, expert_return: float, level: float,
                warmup_frames: int) -> dict:
    """The medium behaviour policy, as D4RL made it: training stopped early at `level` of the way
    from random to expert.

    Among the trained checkpoints up to the first one that reaches that return, the one nearest to
    it. A later checkpoint with that return is a trained policy that has collapsed for a while,
    which covers the state space quite differently from a partly trained one; a checkpoint within
    the `warmup_frames` of random actions is the untrained network.
    """
    trained = [c for c in checkpoints if c["frames"] > warmup_frames] or checkpoints
    target = random_return + level * (expert_return - random_return)
    reached = next((i for i, c in enumerate(trained) if c["return"] >= target), len(trained) - 1)
    return min(trained[: reached + 1], key=lambda c: abs(c["return"] - target))


def run_dataset(pipe: Pipeline, out: Path) -> dict:
    """D^beta from the pretrained behaviour policies, written as a Minari dataset (D4RL presets).

    expert = the best pretrain checkpoint; medium = see `pick_medium`; medium-replay = the pretrain
    replay up to medium.
    """
    cfg, dcfg, pretrain = pipe.cfg, pipe.cfg.dataset, pipe.outputs["pretrain"]
    env_slug = cfg.env.id.lower().replace("-", "_")
    dataset_id = f"cqlsac/{env_slug}/{dcfg.preset}_{pipe.stage_hash('dataset')[:8]}-v0"
    checkpoints = pretrain["checkpoints"]
    expert = max(checkpoints, key=lambda c: c["return"])
    medium = pick_medium(checkpoints, pretrain["random_return"], expert["return"], dcfg.medium_level,
                         cfg.pretrain.init_random_frames)
    common = dict(expert=expert["path"] if dcfg.reference_scores else None, seed=cfg.seed, overwrite=True)
    if dcfg.preset == "medium-replay":
        replay = TensorDict.load_memmap(pretrain["replay"])[: medium["frames"]]
        write_replay_dataset(dataset_id, replay, cfg.env.id, cfg.env.kwargs, **common)
    else:
        policies = {"random": ["random"], "medium": [medium["path"]], "expert": [expert["path"]],
                    "medium-expert": [medium["path"], expert["path"]]}[dcfg.preset]
        create_dataset(dataset_id, policies, dcfg.steps, env_id=cfg.env.id, env_kwargs=cfg.env.kwargs,
                       preset=dcfg.preset, **common)
    return {"dataset_id": dataset_id, "medium": medium, "expert": expert}


def run_offline(pipe: Pipeline, out: Path) -> dict:
    """CQL-SAC on the offline replay for `offline.updates` updates."""
    ocfg = pipe.cfg.offline
    replay, info = pipe.offline_replay(ocfg.batch_size)
    loss = pipe.new_agent(ocfg.loss)
    optimizer = make_optimizer(loss, ocfg.optim)
    keys = loss.in_keys
    curve = CurveRecord()  # for the report, which cannot read the logs of a run that reused this stage
    supervisor = pipe.supervisor("offline", "offline", loss, optimizer, curve)

    def log(prefix, metrics, step):
        pipe.log(prefix, metrics, step)
        curve.add(step, metrics)

    train_offline(loss, optimizer, ocfg.optim.tau, lambda: replay.sample().select(*keys), ocfg.updates,
                  log, ocfg.log_every, supervisor)
    mean_return = pipe.evaluate(loss.actor_network, pipe.cfg.evaluate.episodes)
    pipe.logger.log_scalar("offline/eval_return", mean_return, step=ocfg.updates)
    save_agent(out / "agent.pt", loss)
    save_policy(out / "policy.pt", loss.actor_network, pipe.cfg.env.id, pipe.cfg.network, pipe.cfg.env.kwargs,
                mean_return=mean_return)
    return {"agent": str(out / "agent.pt"), "policy": str(out / "policy.pt"), "eval_return": mean_return,
            "dataset_id": info.dataset_id, "dataset_mean_return": info.mean_return, "curve": curve.points}


def run_finetune(pipe: Pipeline, out: Path) -> dict:
    """Offline-online combined training from the offline agent, and SAC from scratch as the baseline."""
    cfg, fcfg = pipe.cfg, pipe.cfg.finetune
    loss_cfg = dataclasses.replace(
        cfg.offline.loss,
        cql_weight=cfg.offline.loss.cql_weight if fcfg.cql_weight is None else fcfg.cql_weight,
        calibrated=fcfg.calibrated or cfg.offline.loss.calibrated)
    loss = pipe.new_agent(loss_cfg)
    load_agent(pipe.outputs["offline"]["agent"], loss)
    optimizer = make_optimizer(loss, fcfg.optim)
    offline, _ = pipe.offline_replay(None)  # MixedReplay asks for its own share of each batch
    keys = loss.in_keys + ["mc_return"] if "mc_return" not in loss.in_keys else loss.in_keys
    online = make_online_buffer(fcfg.frames)
    end = fcfg.offline_fraction_end if fcfg.mixing == "annealed" else None
    mixed = MixedReplay(offline, online, fcfg.batch_size, keys, fcfg.offline_fraction, end,
                        merged=fcfg.mixing == "merged")
    accumulator = EpisodeAccumulator(loss_cfg.gamma, keys)

    def add(data):
        completed = accumulator.add(data)
        if completed is not None:
            online.extend(completed)

    def evaluate():
        return pipe.evaluate(loss.actor_network, fcfg.eval_episodes)

    evals = []
    record = OnlineRecord(online, evals, accumulator)
    supervisor = pipe.supervisor("finetune", "finetune", loss, optimizer, record)
    if not supervisor.resuming:  # a resumed stage gets this point back from its checkpoint
        # The offline policy under the same protocol as the points after it (not the offline stage's own).
        evals.append((0, evaluate()))
    new_collector = pipe.collectors(loss.actor_network, fcfg.frames_per_batch, fcfg.frames, cfg.seed + 1)

    def on_eval(frames, mean_return):
        evals.append((frames, mean_return))
        pipe.logger.log_scalar("finetune/eval_return", mean_return, step=frames)

    train_online(loss, optimizer, fcfg.optim.tau, new_collector, add=add, sample=mixed.sample,
                 can_update=lambda frames: True, total_frames=fcfg.frames, utd_ratio=fcfg.utd_ratio,
                 evaluate=evaluate, eval_every=fcfg.eval_every, on_eval=on_eval, log=pipe.log, supervisor=supervisor,
                 desc="finetune")
    save_policy(out / "policy.pt", loss.actor_network, cfg.env.id, cfg.network, cfg.env.kwargs)
    outputs = {"policy": str(out / "policy.pt"), "evals": evals}
    if fcfg.sac_baseline:
        outputs["sac_baseline_evals"] = run_sac_baseline(pipe, out)
    return outputs


def run_sac_baseline(pipe: Pipeline, out: Path) -> list:
    """SAC from scratch for the fine-tuning budget: the curve the fine-tuned agent is compared with.

    Seeded on its own, so that its curve does not depend on how much randomness the fine-tuning
    before it drew (which varies with the fine-tuning settings).
    """
    cfg, fcfg = pipe.cfg, pipe.cfg.finetune
    torch.manual_seed(cfg.seed + SAC_BASELINE_SEED_OFFSET)
    network = dataclasses.replace(cfg.network, critic_layer_norm=fcfg.sac_baseline_critic_layer_norm)
    loss = pipe.new_agent(LossConfig(gamma=cfg.offline.loss.gamma, cql_weight=0.0), network)
    optimizer = make_optimizer(loss, cfg.pretrain.optim)
    buffer = make_online_buffer(fcfg.frames)
    evals = []
    supervisor = pipe.supervisor("finetune", "sac-baseline", loss, optimizer, OnlineRecord(buffer, evals))
    warmup = min(cfg.pretrain.init_random_frames, fcfg.frames // 2)
    new_collector = pipe.collectors(loss.actor_network, fcfg.frames_per_batch, fcfg.frames, cfg.seed + 2, warmup)
    train_online(loss, optimizer, cfg.pretrain.optim.tau, new_collector,
                 add=lambda data: buffer.extend(data.reshape(-1)),
                 sample=lambda progress: buffer.sample(fcfg.batch_size),
                 can_update=lambda frames: frames >= warmup, total_frames=fcfg.frames, utd_ratio=fcfg.utd_ratio,
                 evaluate=lambda: pipe.evaluate(loss.actor_network, fcfg.eval_episodes),
                 eval_every=fcfg.eval_every, on_eval=lambda frames, r: evals.append((frames, r)),
                 log=pipe.log, supervisor=supervisor, desc="sac-baseline")
    return evals


def run_evaluate(pipe: Pipeline, out: Path) -> dict:
    """The final policy, deterministic, over `evaluate.episodes` seeded episodes; raw and normalised."""
    policy = pipe.outputs["finetune"]["policy"]
    actor, _ = load_policy(policy)
    returns = pipe.evaluation_returns(actor, pipe.cfg.evaluate.episodes)
    mean_return = sum(returns) / len(returns)
    _, info = pipe.offline_replay(1)
    has_scores = info.ref_min_score is not None and info.ref_max_score is not None
    return {"policy": policy, "returns": returns, "mean_return": mean_return,
            "normalized_score": normalized_score(mean_return, info) if has_scores else None}


STAGE_TABLE = {
    # `offline.loss.gamma` is pretraining's discount too; `evaluate.seed` picks the episodes that
    # score its checkpoints (and so the medium and expert policies).
    "pretrain": Stage("pretrain", (),
                      lambda c: (c.env, c.network, c.pretrain, c.offline.loss.gamma, c.evaluate.seed), run_pretrain),
    # v2: the medium policy is stopped early (`pick_medium`).
    "dataset": Stage("dataset", ("pretrain",), lambda c: (c.env, c.dataset), run_dataset, version=2),
    "offline": Stage("offline", ("dataset",), lambda c: (c.env, c.network, c.dataset, c.offline, c.evaluate),
                     run_offline),
    # v2: SAC from scratch is seeded on its own. v3: the offline policy's point of the fine-tuning
    # curve comes from the fine-tuning evaluation protocol. The pretrain settings SAC from scratch
    # uses are hashed here too, as a named dataset drops the pretrain stage's hash from the chain.
    "finetune": Stage("finetune", ("offline",),
                      lambda c: (c.env, c.finetune, c.pretrain.optim, c.pretrain.init_random_frames), run_finetune,
                      version=3),
    "evaluate": Stage("evaluate", ("finetune",), lambda c: (c.env, c.evaluate), run_evaluate),
}

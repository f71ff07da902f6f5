"""The stages of the pipeline and the one table that declares them.

Each stage is a function of a `StageContext` that returns its outputs (a JSON-able dict). Its
table entry names the stages it reads and the config fields it reads (`reads`): its cache key is
made of exactly those, and the context's config refuses any other field (`cache.ConfigView`).
`stage_table(cfg)` is the one place that knows about a named dataset: it replaces the pretrain
and dataset stages with a stage that only describes that dataset.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType
from tqdm.auto import tqdm

from cqlsac.components.checkpoints import load_agent, load_policy, save_agent
from cqlsac.components.collector import EpisodeReturns
from cqlsac.components.config import LossConfig, NetworkConfig
from cqlsac.components.replay import EpisodeAccumulator, MixedReplay, OnlineReplay, make_online_buffer
from cqlsac.components.update import Agent
from cqlsac.components.vectorised import VectorisedAgents
from cqlsac.datasets import (
    create_dataset,
    dataset_files_digest,
    is_local,
    normalized,
    reference_scores_of,
    write_replay_dataset,
)
from cqlsac.pipeline.config import ConfigError, OnlineConfig, PipelineConfig, finetune_loss
from cqlsac.pipeline.loops import train_offline, train_online
from cqlsac.pipeline.supervision import CurveRecord, OnlineRecord

if TYPE_CHECKING:
    from cqlsac.pipeline.pipeline import StageContext


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    inputs: tuple[str, ...] = ()
    # Dotted config paths the stage reads; its cache key covers exactly these (and the seed).
    reads: tuple[str, ...] = ()
    # Raised when the stage computes something else for the same config, so that outputs cached by
    # older code are not reused (version 1 adds nothing to the key).
    version: int = 1
    # Data outside the cache that the stage reads, as a digest for the key (a named dataset's files).
    data_digest: Callable[[PipelineConfig], str] | None = None
    # Whether finished outputs can still be used (e.g. their Minari dataset is still in the store).
    intact: Callable[[dict], bool] = lambda outputs: True
    # Added to the run's seed for this stage (the baseline may run on other seeds than the agent).
    seed_offset: Callable[[PipelineConfig], int] = lambda cfg: 0


# --- online SAC: pretraining and the baseline -------------------------------------------------
def train_sac(ctx: StageContext, schedule: OnlineConfig, network: NetworkConfig, collector_seed: int,
              evaluate_at_start: bool = False) -> tuple[Agent, OnlineReplay, list[dict]]:
    """Online SAC from scratch (the loss with CQL weight 0): a policy checkpoint at every evaluation.

    Returns the agent, its replay data, the evaluations as checkpoint records (frames, return,
    path) and the training episodes (frames at their end, return, length); with
    `evaluate_at_start`, the untrained policy is evaluated at frame 0 too. The temperature's target
    entropy is the offline loss's (null: the action family's default).
    """
    loss = ctx.cfg.offline.loss
    agent = ctx.agent(LossConfig(gamma=loss.gamma, cql_weight=0.0, target_entropy=loss.target_entropy),
                      schedule.optim, network)
    data = OnlineReplay(schedule.frames, schedule.batch_size, warmup_frames=schedule.init_random_frames)
    checkpoints: list[dict] = []
    episodes = EpisodeReturns()
    supervisor = ctx.supervisor(agent, OnlineRecord(data, checkpoints, episodes))

    def evaluate() -> float:
        return ctx.mean_return(agent.actor, schedule.eval_episodes)

    def keep(frames: int, mean_return: float) -> None:
        path = ctx.dir / f"policy_{frames:08d}.pt"
        ctx.save_policy(path, agent.actor, network, mean_return=mean_return, frames=frames)
        checkpoints.append({"frames": frames, "return": mean_return, "path": str(path)})
        ctx.log.scalar(f"{ctx.name}/eval_return", mean_return, frames)

    if evaluate_at_start and not supervisor.resuming:
        keep(0, evaluate())
    for frames, mean_return in train_online(agent, data, ctx.collector_after(agent.actor, schedule, collector_seed),
                                            schedule=schedule, evaluate=evaluate, log=ctx.log,
                                            supervisor=supervisor, desc=ctx.name, episodes=episodes):
        keep(frames, mean_return)
    return agent, data, checkpoints, episodes.completed


def run_pretrain(ctx: StageContext) -> dict:
    """Online SAC from scratch: the behaviour policies (a checkpoint per evaluation) and its replay data."""
    cfg = ctx.cfg
    _, data, checkpoints, episodes = train_sac(ctx, cfg.pretrain, cfg.network, collector_seed=ctx.seed)
    replay = ctx.dir / "replay"
    shutil.rmtree(replay, ignore_errors=True)
    data.buffer[:].exclude("loc", "scale").memmap(replay)  # trajectory ids kept: medium-replay splits episodes by them
    random_return = ctx.mean_return(None, cfg.pretrain.eval_episodes)
    return {"checkpoints": checkpoints, "replay": str(replay), "random_return": random_return,
            "episodes": episodes}


def run_baseline(ctx: StageContext) -> dict:
    """SAC from scratch on its own budget and seed: the curve the fine-tuned agent is compared with."""
    cfg = ctx.cfg
    network = NetworkConfig(actor_hidden=cfg.network.actor_hidden, critic_hidden=cfg.network.critic_hidden,
                            activation=cfg.network.activation, scale_lb=cfg.network.scale_lb,
                            num_critics=cfg.baseline.num_critics, critic_layer_norm=cfg.baseline.critic_layer_norm)
    _, _, checkpoints, episodes = train_sac(ctx, cfg.baseline, network, collector_seed=ctx.seed + 2,
                                            evaluate_at_start=True)
    return {"evals": [(c["frames"], c["return"]) for c in checkpoints], "checkpoints": checkpoints,
            "policy": checkpoints[-1]["path"], "episodes": episodes}


# --- the dataset --------------------------------------------------------------------------------
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


def describe_dataset(dataset_id: str) -> dict:
    """What the stages after the dataset read of it: its id and normalisation bounds."""
    return {"dataset_id": dataset_id, **reference_scores_of(dataset_id)}


def run_dataset(ctx: StageContext) -> dict:
    """D^beta from the pretrained behaviour policies, written as a Minari dataset (D4RL presets).

    expert = the best pretrain checkpoint; medium = see `pick_medium`; medium-replay = the pretrain
    replay up to medium. A best checkpoint that does not beat random play (pretraining too short)
    gives a dataset without normalisation bounds.
    """
    cfg, dcfg, pretrain = ctx.cfg, ctx.cfg.dataset, ctx.inputs["pretrain"]
    dataset_id = dataset_target(cfg, ctx.key)  # under the stage's lock, so no run of this stage writes it meanwhile
    checkpoints = pretrain["checkpoints"]
    expert = max(checkpoints, key=lambda c: c["return"])
    medium = pick_medium(checkpoints, pretrain["random_return"], expert["return"], dcfg.medium_level,
                         cfg.pretrain.init_random_frames)
    common = dict(expert=expert["path"] if dcfg.reference_scores else None, seed=ctx.seed, overwrite=False,
                  allow_weak_expert=True)
    if dcfg.preset == "medium-replay":
        replay = TensorDict.load_memmap(pretrain["replay"])[: medium["frames"]]
        write_replay_dataset(dataset_id, replay, cfg.env.id, cfg.env.kwargs, **common)
    else:
        policies = {"random": ["random"], "medium": [medium["path"]], "expert": [expert["path"]],
                    "medium-expert": [medium["path"], expert["path"]], "final": [checkpoints[-1]["path"]]}[dcfg.preset]
        create_dataset(dataset_id, policies, dcfg.steps, env_id=cfg.env.id, env_kwargs=cfg.env.kwargs,
                       preset=dcfg.preset, **common)
    print(f"[dataset] wrote {dataset_id}; train on it again with dataset.name={dataset_id}")
    return {**describe_dataset(dataset_id), "medium": medium, "expert": expert}


def use_named_dataset(ctx: StageContext) -> dict:
    """A dataset from the local Minari store, by name (`dataset.name`)."""
    return describe_dataset(ctx.cfg.dataset.name)


def dataset_target(cfg: PipelineConfig, key: str) -> str:
    """The id the dataset stage writes to, never one the local store holds: `dataset.save_as` (refused if
    taken), else `cqlsac/<env>/<preset>_<key>-v0`, or the next free version where the same config made
    one before (with a cache since cleared: the data it held then may differ from what a run makes now)."""
    if cfg.dataset.save_as is not None:
        check_dataset_target(cfg.dataset.save_as)
        return cfg.dataset.save_as
    env_slug = cfg.env.id.lower().replace("-", "_")
    version = 0
    while is_local(f"cqlsac/{env_slug}/{cfg.dataset.preset}_{key[:8]}-v{version}"):
        version += 1
    return f"cqlsac/{env_slug}/{cfg.dataset.preset}_{key[:8]}-v{version}"


def check_dataset_target(dataset_id: str) -> None:
    """An id the local store holds already (no dataset is ever written over) is a `ConfigError`; a
    malformed one a `DatasetError`."""
    if is_local(dataset_id):
        raise ConfigError(f"dataset {dataset_id} is already in the local Minari store, and the dataset stage would "
                          f"write over it: train on it with dataset.name={dataset_id}, set another dataset.save_as, "
                          f"or delete it first (minari delete {dataset_id})")


def dataset_is_local(outputs: dict) -> bool:
    """A dataset stage whose Minari dataset left the local store (deleted, another MINARI_DATASETS_PATH) runs again."""
    return is_local(outputs["dataset_id"])


# --- offline, fine-tuning, evaluation ---------------------------------------------------------
def offline_agent(ctx: StageContext):
    """The offline stage's fresh agent and its batch source, drawn from torch's RNG in a run's order."""
    ocfg = ctx.cfg.offline
    replay, info = ctx.offline_replay(ocfg.batch_size)
    agent = ctx.agent(ocfg.loss, ocfg.optim)
    keys = agent.loss.in_keys
    return agent, (lambda: replay.sample().select(*keys)), info


def offline_outputs(ctx: StageContext, agent: Agent, info, curve: list) -> dict:
    """Evaluate and save the trained offline agent; the stage's outputs."""
    mean_return = ctx.mean_return(agent.actor, ctx.cfg.evaluate.episodes)
    ctx.log.scalar("offline/eval_return", mean_return, ctx.cfg.offline.updates)
    save_agent(ctx.dir / "agent.pt", agent.loss, agent.optimizer)
    ctx.save_policy(ctx.dir / "policy.pt", agent.actor, ctx.cfg.network, mean_return=mean_return)
    return {"agent": str(ctx.dir / "agent.pt"), "policy": str(ctx.dir / "policy.pt"), "eval_return": mean_return,
            "dataset_id": info.dataset_id, "dataset_mean_return": info.mean_return, "curve": curve}


def run_offline(ctx: StageContext) -> dict:
    """CQL-SAC on the offline replay for `offline.updates` updates."""
    ocfg = ctx.cfg.offline
    agent, sample, info = offline_agent(ctx)
    curve = CurveRecord(ctx.log)  # for the report, which cannot read the logs of a run that reused this stage
    train_offline(agent, sample, updates=ocfg.updates, log=curve, log_every=ocfg.log_every,
                  supervisor=ctx.supervisor(agent, curve, unit="update"))
    return offline_outputs(ctx, agent, info, curve.points)


def run_offline_together(ctxs: list[StageContext], torch_seeds: list[int], compile: bool = True) -> list[dict]:
    """The offline stages of runs that differ in their seed only, as one vectorised update of all
    their agents (`components/vectorised.py`); each agent draws its batches and noise from its own
    copy of torch's RNG, seeded as its run's stage would be, so its numbers are its run's up to
    float rounding. Nothing is checkpointed mid-way: an interrupted computation starts over. The
    vectorised step is compiled unless `compile` is false (eager vmap is slower than the runs one
    after another; the compile itself takes a minute or so)."""
    ocfg = ctxs[0].cfg.offline
    agents, samples, infos, curves, streams = [], [], [], [], []
    for ctx, seed in zip(ctxs, torch_seeds):
        torch.manual_seed(seed)
        agent, sample, info = offline_agent(ctx)
        agents.append(agent)
        samples.append(sample)
        infos.append(info)
        curves.append(CurveRecord(ctx.log))
        streams.append(torch.get_rng_state())
    together = VectorisedAgents(agents, compile=compile)
    watchers = [ctx.supervisor(agent, unit="update") for ctx, agent in zip(ctxs, agents)]  # divergence checks only
    for step in tqdm(range(1, ocfg.updates + 1), desc=f"offline x{len(ctxs)}", mininterval=2.0):
        batches, noises = [], []
        for k, agent in enumerate(agents):
            torch.set_rng_state(streams[k])
            batches.append(samples[k]())
            noises.append(agent.loss.draw_noise(ocfg.batch_size))
            streams[k] = torch.get_rng_state()
        out = together.update(torch.stack(batches), {key: torch.stack([n[key] for n in noises]) for key in noises[0]})
        if step % ocfg.log_every == 0 or step == ocfg.updates:
            for k, (watcher, curve) in enumerate(zip(watchers, curves)):
                metrics = TensorDict({key: value[k] for key, value in out.items()}, [])
                watcher.check(metrics, step)
                if step % ocfg.log_every == 0:
                    curve.log("offline", metrics, step)
    for watcher in watchers:
        watcher.settle()
    together.write_back()
    return [offline_outputs(ctx, agent, info, curve.points)
            for ctx, agent, info, curve in zip(ctxs, agents, infos, curves)]


def run_finetune(ctx: StageContext) -> dict:
    """Offline-online combined training from the offline agent, or from scratch (`finetune.start`)."""
    cfg, fcfg = ctx.cfg, ctx.cfg.finetune
    loss_cfg = finetune_loss(cfg.offline.loss, fcfg)
    agent = ctx.agent(loss_cfg, fcfg.optim)
    if fcfg.start == "offline":
        load_agent(ctx.inputs["offline"]["agent"], agent.loss, agent.optimizer if fcfg.keep_optimizer else None)
    offline, _ = ctx.offline_replay(None)  # MixedReplay asks for its own share of each batch
    keys = agent.loss.in_keys + ["mc_return"] if "mc_return" not in agent.loss.in_keys else agent.loss.in_keys
    end = fcfg.offline_fraction_end if fcfg.mixing == "annealed" else None
    data = MixedReplay(offline, make_online_buffer(fcfg.frames), fcfg.batch_size, keys, fcfg.offline_fraction, end,
                       merged=fcfg.mixing == "merged", episodes=EpisodeAccumulator(loss_cfg.gamma, keys),
                       warmup_frames=fcfg.warmup_frames)
    evals: list = []
    episodes = EpisodeReturns()
    supervisor = ctx.supervisor(agent, OnlineRecord(data, evals, episodes))

    def evaluate() -> float:
        return ctx.mean_return(agent.actor, fcfg.eval_episodes)

    if not supervisor.resuming:  # a resumed stage gets this point back from its checkpoint
        # The offline policy under the same protocol as the points after it (not the offline stage's own).
        evals.append((0, evaluate()))
    for frames, mean_return in train_online(agent, data, ctx.collector_after(agent.actor, fcfg, ctx.seed + 1),
                                            schedule=fcfg, evaluate=evaluate, log=ctx.log, supervisor=supervisor,
                                            desc="finetune", episodes=episodes):
        evals.append((frames, mean_return))
        ctx.log.scalar("finetune/eval_return", mean_return, frames)
    ctx.save_policy(ctx.dir / "policy.pt", agent.actor, cfg.network)
    return {"policy": str(ctx.dir / "policy.pt"), "evals": evals, "episodes": episodes.completed}


def run_evaluate(ctx: StageContext) -> dict:
    """The final policy, deterministic (or sampling with `evaluate.sample_actions`), over
    `evaluate.episodes` seeded episodes; raw and normalised."""
    ecfg = ctx.cfg.evaluate
    policy = ctx.inputs["finetune"]["policy"]
    actor, _ = load_policy(policy)
    exploration = ExplorationType.RANDOM if ecfg.sample_actions else ExplorationType.DETERMINISTIC
    returns = ctx.evaluation_returns(actor, ecfg.episodes, exploration)
    mean_return = sum(returns) / len(returns)
    bounds = ctx.inputs["dataset"]
    has_scores = bounds["ref_min_score"] is not None and bounds["ref_max_score"] is not None
    return {"policy": policy, "returns": returns, "mean_return": mean_return,
            "normalized_score": normalized(mean_return, bounds["ref_min_score"], bounds["ref_max_score"])
            if has_scores else None, "lowest_window_mean": lowest_window_mean(returns, WINDOW)}


WINDOW = 100  # episodes per window of the seed's stability claim


def lowest_window_mean(returns: list[float], window: int) -> float | None:
    """The lowest mean of `window` consecutive returns (None with fewer returns)."""
    if len(returns) < window:
        return None
    sums = [sum(returns[:window])]
    for i in range(window, len(returns)):
        sums.append(sums[-1] + returns[i] - returns[i - window])
    return min(sums) / window


# --- the table --------------------------------------------------------------------------------
STAGES = (
    # `offline.loss.gamma` and `.target_entropy` are SAC's too; `evaluate.seed` picks the episodes
    # that score its checkpoints (and so the medium and expert policies).
    Stage("pretrain", run_pretrain,
          reads=("env", "network", "pretrain", "offline.loss.gamma", "offline.loss.target_entropy", "evaluate.seed",
                 "compile")),
    # v2: the medium policy is stopped early (`pick_medium`).
    Stage("dataset", run_dataset, inputs=("pretrain",),
          reads=("env", "dataset.preset", "dataset.steps", "dataset.medium_level", "dataset.reference_scores",
                 "dataset.save_as", "pretrain.init_random_frames"),
          version=2, intact=dataset_is_local),
    # v2: its agent.pt holds the optimiser's state too (finetune.keep_optimizer).
    Stage("offline", run_offline, inputs=("dataset",), reads=("env", "network", "offline", "evaluate", "compile"),
          version=2),
    # v3: the offline policy's point of the fine-tuning curve comes from the fine-tuning evaluation protocol.
    Stage("finetune", run_finetune, inputs=("offline", "dataset"),
          reads=("env", "network", "offline.loss", "finetune", "evaluate.seed", "compile"), version=3),
    Stage("evaluate", run_evaluate, inputs=("finetune", "dataset"), reads=("env", "evaluate")),
    # Its own critics (`baseline.*`): recipes that change the agent's ensemble leave SAC from scratch alone.
    Stage("baseline", run_baseline,
          reads=("env", "network.actor_hidden", "network.critic_hidden", "network.activation", "network.scale_lb",
                 "baseline", "offline.loss.gamma", "offline.loss.target_entropy", "evaluate.seed", "compile"),
          seed_offset=lambda cfg: cfg.baseline.seed_offset),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
NAMED_DATASET = Stage("dataset", use_named_dataset, reads=("dataset.name",),
                      data_digest=lambda cfg: dataset_files_digest(cfg.dataset.name), intact=dataset_is_local)


def stage_table(cfg: PipelineConfig) -> dict[str, Stage]:
    """The stages of this config by name: with `dataset.name`, the named dataset stands in for the
    pretrain and dataset stages; fine-tuning from scratch reads no offline stage. Unknown names in
    `cfg.stages` are a `ConfigError`."""
    unknown = [name for name in cfg.stages if name not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; the stages are {list(STAGE_NAMES)}")
    table = {stage.name: stage for stage in STAGES}
    if cfg.finetune.start == "scratch":  # a fresh agent: the offline stage is not read
        table["finetune"] = dataclasses.replace(table["finetune"], inputs=("dataset",))
    if cfg.dataset.name is not None:
        del table["pretrain"]
        table["dataset"] = NAMED_DATASET
    return table


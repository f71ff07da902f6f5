"""The training loops around `Agent.update`: offline updates, and online collection + updates + evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from tensordict import TensorDictBase
from torchrl.collectors import Collector
from tqdm.auto import tqdm

from cqlsac.components.collector import EpisodeReturns
from cqlsac.components.update import Agent
from cqlsac.pipeline.config import OnlineConfig
from cqlsac.pipeline.supervision import Supervisor, stop_requested


class OnlineData(Protocol):
    """Where collected frames go and batches come from (`OnlineReplay`, `MixedReplay`)."""

    def add(self, frames: TensorDictBase) -> None: ...
    def ready(self, frames_collected: int) -> bool: ...
    def sample(self, progress: float) -> TensorDictBase: ...


class MetricsLog(Protocol):
    def log(self, prefix: str, metrics: TensorDictBase, step: int) -> None: ...


def train_offline(agent: Agent, sample: Callable[[], TensorDictBase], *, updates: int, log: MetricsLog,
                  log_every: int, supervisor: Supervisor, desc: str = "offline") -> None:
    """`updates` updates on batches from `sample`, carrying on from the supervisor's checkpoint."""
    start = supervisor.restore().get("step", 0)
    for step in tqdm(range(start, updates), desc=desc, mininterval=2.0, initial=start, total=updates):
        metrics = agent.update(sample())
        supervisor.check(metrics, step + 1)
        if (step + 1) % log_every == 0:
            log.log(desc, metrics, int(agent.loss.update_count))
        supervisor.tick(step + 1, lambda: {}, final=step + 1 == updates)


def train_online(agent: Agent, data: OnlineData, collector_after: Callable[[int], Collector], *,
                 schedule: OnlineConfig, evaluate: Callable[[], float], log: MetricsLog, supervisor: Supervisor,
                 desc: str, episodes: EpisodeReturns | None = None) -> Iterator[tuple[int, float]]:
    """Collect into `data`, update `schedule.utd_ratio` times per new frame once `data` is ready,
    evaluate every `schedule.eval_every` frames; yields `(frames, mean return)` at each evaluation.
    `episodes` records the returns of the training episodes.

    `collector_after(frames)` makes a collector for the frames still to collect after `frames` (a
    resumed stage cannot restore the env, so it carries on with a fresh collector). What the
    caller does with an evaluation is in the checkpoint that follows it.
    """
    restored = supervisor.restore()
    frames, last_eval = restored.get("step", 0), restored.get("last_eval", 0)
    next_eval, owed_updates = restored.get("next_eval", schedule.eval_every), restored.get("owed_updates", 0.0)
    total = schedule.frames

    def progress() -> dict:
        return {"next_eval": next_eval, "owed_updates": owed_updates, "last_eval": last_eval}

    def settle() -> Iterator[tuple[int, float]]:
        """The updates and the evaluation that the frames collected so far call for, then a checkpoint if due."""
        nonlocal owed_updates, next_eval, last_eval
        metrics = None
        while owed_updates >= 1:
            metrics = agent.update(data.sample(frames / total))
            owed_updates -= 1
            supervisor.check(metrics, frames)
            if stop_requested():
                supervisor.tick(frames, progress)
        if metrics is not None:
            log.log(desc, metrics, frames)
        if frames > last_eval and (frames >= next_eval or frames >= total):
            yield frames, evaluate()
            last_eval, next_eval = frames, next_eval + schedule.eval_every
        supervisor.tick(frames, progress, final=frames >= total)

    with tqdm(total=total, initial=frames, desc=desc, mininterval=2.0) as bar:
        yield from settle()  # a resumed loop first finishes what its last batch still owed
        if frames >= total:
            return
        collector = collector_after(frames)
        for batch in collector:
            frames += batch.numel()
            bar.update(batch.numel())
            data.add(batch)
            if episodes is not None:
                episodes.add(batch, frames)
            if data.ready(frames):
                owed_updates += schedule.utd_ratio * batch.numel()
            yield from settle()
        collector.shutdown()

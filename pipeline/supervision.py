"""Supervision of the training loops: stop signals, divergence checks, checkpoints and what they record.

A `Supervisor` watches every loop between updates: it stops at a NaN/Inf, warns once when Q-values
explode, saves periodic checkpoints and, on SIGINT/SIGTERM, saves one more and stops the run.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
from tensordict import TensorDict, TensorDictBase

from cqlsac.components.checkpoints import atomic_torch_save, load_training_state, read_checkpoint, save_training_state
from cqlsac.components.collector import EpisodeReturns
from cqlsac.components.update import Agent

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it
ROWS = "cqlsac-replay-rows"
STATE_SUFFIX = ".state.pt"  # training states and their replay chunks; the pipeline removes them once a stage is done
WATCHED = ("loss_actor", "loss_qvalue", "loss_alpha", "loss_alpha_prime", "q_data", "td_target")
READ_EVERY = 64  # checks between host reads of the watched values: one device sync per read, not one per update


class Interrupted(Exception):
    """A stop signal arrived; the interrupted stage saved its checkpoint at `checkpoint` (None between stages)."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.signum]


class DivergenceError(ArithmeticError):
    """A loss or Q-value became NaN/Inf: the stage stops, its last good checkpoint is kept."""


class QValueWarning(UserWarning):
    """Mean Q-values passed `q_value_bound`: the critics are probably diverging."""


_stop_signal: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGINT/SIGTERM ask the running loop to save a checkpoint and stop.

    The first signal only sets a flag, so the current update finishes and the checkpoint is
    consistent; the handlers are then put back, so a second signal stops at once.
    """
    global _stop_signal
    previous = {signum: signal.getsignal(signum) for signum in EXIT_STATUS}

    def request_stop(signum, frame):
        global _stop_signal
        _stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current update and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr)
        for other, handler in previous.items():
            signal.signal(other, handler)

    for signum in EXIT_STATUS:
        signal.signal(signum, request_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop_signal = None


def stop_requested() -> bool:
    """Whether a stop signal arrived."""
    return _stop_signal is not None


def stop_if_requested(checkpoint: Path | None = None) -> None:
    """Raise `Interrupted` if a stop signal arrived."""
    if _stop_signal is not None:
        raise Interrupted(_stop_signal, checkpoint)


class Supervisor:
    """Divergence checks, periodic checkpoints and stop signals for one training loop.

    `step` counts the loop's `unit`: updates (offline) or collected frames (online); a checkpoint
    is saved to `path` every `every` steps, at the end, and when a stop signal arrives, tied to
    the stage's `config_key`. `record` (an `OnlineRecord` or a `CurveRecord`) holds what the stage
    gathered besides the networks; `on_resume(step)` drops what the interrupted run logged after
    the checkpoint it resumes from. `seconds` is the loop's compute time, across resumes.
    """

    def __init__(self, agent: Agent | None, *, name: str, unit: str, path: Path, config_key: str, every: int,
                 q_bound: float, resume: bool, record: OnlineRecord | CurveRecord | None = None,
                 on_resume: Callable[[int], None] = lambda step: None):
        self.agent, self.name, self.unit, self.path, self.config_key = agent, name, unit, path, config_key
        self.every, self.q_bound, self.resume = every, q_bound, resume
        self.record, self.on_resume = record, on_resume
        self.next_save = every
        self.saved_step: int | None = None
        self.q_exceeded_at: int | None = None
        self.pending: list[tuple[int, TensorDictBase]] = []  # (step, metrics) not read yet
        self.started, self.seconds_before = time.perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        """Compute time of the loop so far, including the runs it resumed from (up to their checkpoints)."""
        return self.seconds_before + time.perf_counter() - self.started

    @property
    def resuming(self) -> bool:
        """Whether `restore` will continue from a checkpoint."""
        return self.resume and self.path.is_file()

    def restore(self) -> dict:
        """The saved progress when resuming from a checkpoint (networks, optimizer, RNG restored), else {}."""
        if not self.resuming:
            if self.path.is_file():
                print(f"[{self.name}] starting over: the checkpoint an interrupted run left at {self.path} will be "
                      "replaced (`cqlsac run --resume RUN_DIR` continues that run instead)")
            return {}
        progress = load_training_state(self.path, self.config_key, self.agent.loss, self.agent.optimizer)
        record = progress.pop("record", None)
        self.seconds_before = progress.pop("seconds", 0.0)
        self.started = time.perf_counter()
        if self.record is not None:
            self.record.load_state_dict(record, self.path)
        self.saved_at(progress["step"])
        self.on_resume(progress["step"])
        print(f"[{self.name}] resuming from {self.path} at {self.unit} {progress['step']}")
        return progress

    def check(self, metrics: TensorDictBase, step: int) -> None:
        """Keep this update's metrics where they were computed; `settle` reads the watched ones every
        `READ_EVERY` checks and before each checkpoint, so that a GPU update is not synced at every step."""
        self.pending.append((step, metrics))
        if len(self.pending) >= READ_EVERY:
            self.settle()

    def settle(self) -> None:
        """Read the watched values kept since the last read in one host transfer: stop at a non-finite
        loss or Q-value, naming the step where it began; warn once when the mean Q-value passes the bound."""
        if not self.pending:
            return
        zero = self.pending[0][1]["q_data"].new_zeros(())  # for losses an update did not compute (critic-only)
        flat = torch.stack([metrics.get(key, zero) for _, metrics in self.pending for key in WATCHED])
        steps, rows = [step for step, _ in self.pending], flat.view(len(self.pending), len(WATCHED)).tolist()
        self.pending.clear()
        for step, row in zip(steps, rows):
            values = dict(zip(WATCHED, row))
            bad = [key for key, value in values.items() if not math.isfinite(value)]
            if bad:
                self.diverged(f"{', '.join(bad)} became NaN/Inf at {self.unit} {step}")
            q = values["q_data"]
            if self.q_exceeded_at is None and abs(q) > self.q_bound:
                self.q_exceeded_at = step
                warnings.warn(QValueWarning(
                    f"[{self.name}] mean Q-value {q:.4g} passed q_value_bound={self.q_bound:g} at {self.unit} {step}: "
                    "the critics are probably diverging; lower the critic learning rate or raise the CQL weight"),
                    stacklevel=3)

    def diverged(self, what: str) -> NoReturn:
        kept = ("no checkpoint was saved before it" if self.saved_step is None else
                f"the last good checkpoint ({self.unit} {self.saved_step}) is kept at {self.path}")
        raise DivergenceError(f"[{self.name}] training diverged: {what}; {kept}; lower the learning rates "
                              "(e.g. offline.optim.critic_lr) or the CQL weight and run again")

    def tick(self, step: int, progress: Callable[[], dict], final: bool = False) -> None:
        """Save when due, at the end or on a stop signal; then stop if a signal asked for it."""
        if final or stop_requested() or step >= self.next_save:
            self.settle()  # a checkpoint holds no weights past a NaN
            self.save(step, progress())
        stop_if_requested(self.path)

    def save(self, step: int, progress: dict) -> None:
        loss = self.agent.loss
        if not all(torch.isfinite(p).all() for p in loss.parameters()):
            self.diverged(f"non-finite weights at {self.unit} {step}")
        if self.record is not None:
            progress["record"] = self.record.state_dict(self.path)
        save_training_state(self.path, self.config_key, loss, self.agent.optimizer,
                            {"step": step, "seconds": self.seconds, **progress})
        self.saved_at(step)

    def saved_at(self, step: int) -> None:
        """Note the checkpoint at `step`; the next one is due at the next multiple of `every`."""
        self.saved_step = step
        self.next_save = step - step % self.every + self.every


class CurveRecord:
    """Points (update, q_data, cql_gap) an offline loop logged, kept in its checkpoints so that a
    resumed stage still reports its whole curve. It logs as the log it wraps does, and keeps the points."""

    def __init__(self, log):
        self.inner = log
        self.points: list[tuple[int, float, float]] = []

    def log(self, prefix: str, metrics: TensorDictBase, step: int) -> None:
        self.inner.log(prefix, metrics, step)
        self.points.append((step, metrics["q_data"].item(), metrics["cql_gap"].item()))

    def state_dict(self, state_path: Path) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict, state_path: Path) -> None:
        self.points[:] = [tuple(point) for point in state["points"]]


def rows_state(rows: TensorDictBase) -> dict:
    """Transitions as plain tensors, for a checkpoint (`torch.load(weights_only=True)` reads them).
    They are copied out first: a slice of a replay buffer is a view, and `torch.save` would write the
    whole storage behind it."""
    return {"kind": ROWS, "size": rows.shape[0], "data": rows.clone().to_dict()}


def rows_from_state(state: dict) -> TensorDict:
    return TensorDict(state["data"], batch_size=[state["size"]])


class OnlineRecord:
    """What an online stage gathered and a resume must not lose: replay rows, evaluations, unfinished episodes.

    `data` is the loop's online data (`OnlineReplay` or `MixedReplay`): its growing `buffer` and
    its `pending` steps. Replay rows are saved in chunks next to the training state, each
    checkpoint writing only the rows added since the last one, so checkpoints of a long run do not
    rewrite its whole buffer.
    """

    def __init__(self, data, evals: list, episodes: EpisodeReturns | None = None):
        self.data, self.evals, self.episodes = data, evals, episodes
        self.chunks: list[str] = []  # file names of the saved rows, in order
        self.saved_rows = 0

    def state_dict(self, state_path: Path) -> dict:
        """Save the rows added since the last call as a chunk beside `state_path`; the rest as a dict."""
        buffer = self.data.buffer
        start, end = self.saved_rows, len(buffer)
        if end > start:
            # A chunk written by a run that was killed before its state file is simply overwritten.
            name = f"{state_path.name.removesuffix(STATE_SUFFIX)}.rows-{self.saved_rows:010d}{STATE_SUFFIX}"
            atomic_torch_save(rows_state(buffer[start:end]), state_path.with_name(name))
            self.chunks.append(name)
            self.saved_rows = end
        pending = {str(env): rows_state(torch.cat(steps)) for env, steps in self.data.pending.items() if steps}
        episodes = self.episodes.state_dict() if self.episodes is not None else None
        return {"chunks": list(self.chunks), "evals": list(self.evals), "pending": pending, "episodes": episodes}

    def load_state_dict(self, state: dict, state_path: Path) -> None:
        for name in state["chunks"]:
            rows = rows_from_state(read_checkpoint(state_path.with_name(name), ROWS,
                                                   f"delete {state_path} to restart this stage from scratch"))
            self.data.buffer.extend(rows)
            self.saved_rows += rows.shape[0]
        self.chunks = list(state["chunks"])
        self.evals[:] = state["evals"]
        self.data.pending = {int(env): [rows_from_state(rows)] for env, rows in state["pending"].items()}
        if self.episodes is not None:
            self.episodes.load_state_dict(state["episodes"])

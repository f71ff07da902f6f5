"""Training loops around `update_step`: offline updates, online collection + updates, evaluation.

A `Supervisor` watches every loop between updates: it stops at a NaN/Inf, warns once when Q-values
explode, saves periodic checkpoints and, on SIGINT/SIGTERM, saves one more and stops the run.
"""

from __future__ import annotations

import math
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.envs import make_env
from cqlsac.components.update import update_step
from cqlsac.datasets.offline import discounted_returns
from cqlsac.pipeline.checkpoints import atomic_torch_save, load_training_state, read_checkpoint, save_training_state

MetricsLog = Callable[[str, TensorDictBase, int], None]
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it
ROWS = "cqlsac-replay-rows"
STATE_SUFFIX = ".state.pt"  # training states and their replay chunks; the pipeline removes them once a stage is done
WATCHED = ("loss_actor", "loss_qvalue", "loss_alpha", "loss_alpha_prime", "q_data", "td_target")


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


def stop_if_requested(checkpoint: Path | None = None) -> None:
    """Raise `Interrupted` if a stop signal arrived."""
    if _stop_signal is not None:
        raise Interrupted(_stop_signal, checkpoint)


class Supervisor:
    """Divergence checks, periodic checkpoints and stop signals for one training loop.

    `step` counts the loop's `unit`: updates (offline) or collected frames (online); a checkpoint
    is saved every `every` steps, at the end, and when a stop signal arrives. `record` (an
    `OnlineRecord` or a `CurveRecord`) holds what the stage gathered besides the networks; `on_resume(step)` drops
    what the interrupted run logged after the checkpoint it resumes from.
    """

    def __init__(self, name: str, unit: str, path: Path, fingerprint: str, loss: CQLSACLoss, optimizer, every: int,
                 q_bound: float, resume: bool, record: OnlineRecord | CurveRecord | None = None,
                 on_resume: Callable[[int], None] = lambda step: None):
        self.name, self.unit, self.path, self.fingerprint = name, unit, path, fingerprint
        self.on_resume = on_resume
        self.loss, self.optimizer, self.record = loss, optimizer, record
        self.every, self.q_bound, self.resume = every, q_bound, resume
        self.next_save = every
        self.saved_step: int | None = None
        self.q_exceeded_at: int | None = None

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
        progress = load_training_state(self.path, self.fingerprint, self.loss, self.optimizer)
        record = progress.pop("record", None)
        if self.record is not None:
            self.record.load_state_dict(record, self.path)
        self.saved_at(progress["step"])
        self.on_resume(progress["step"])
        print(f"[{self.name}] resuming from {self.path} at {self.unit} {progress['step']}")
        return progress

    def check(self, metrics: TensorDictBase, step: int) -> None:
        """Stop at a non-finite loss or Q-value; warn once when the mean Q-value passes the bound."""
        # One host transfer for all watched values (a single device sync on CUDA).
        keys = [key for key in WATCHED if key in metrics.keys()]
        values = dict(zip(keys, torch.stack([metrics[key] for key in keys]).tolist()))
        bad = [key for key, value in values.items() if not math.isfinite(value)]
        if bad:
            self.diverged(f"{', '.join(bad)} became NaN/Inf at {self.unit} {step}")
        q = values["q_data"]
        if self.q_exceeded_at is None and abs(q) > self.q_bound:
            self.q_exceeded_at = step
            warnings.warn(QValueWarning(
                f"[{self.name}] mean Q-value {q:.4g} passed q_value_bound={self.q_bound:g} at {self.unit} {step}: the "
                "critics are probably diverging; lower the critic learning rate or raise the CQL weight"),
                stacklevel=2)

    def diverged(self, what: str) -> NoReturn:
        kept = ("no checkpoint was saved before it" if self.saved_step is None else
                f"the last good checkpoint ({self.unit} {self.saved_step}) is kept at {self.path}")
        raise DivergenceError(f"[{self.name}] training diverged: {what}; {kept}; lower the learning rates "
                              "(e.g. offline.optim.critic_lr) or the CQL weight and run again")

    def tick(self, step: int, progress: Callable[[], dict], final: bool = False) -> None:
        """Save when due, at the end or on a stop signal; then stop if a signal asked for it."""
        if final or _stop_signal is not None or step >= self.next_save:
            self.save(step, progress())
        stop_if_requested(self.path)

    def save(self, step: int, progress: dict) -> None:
        if not all(torch.isfinite(p).all() for p in self.loss.parameters()):
            self.diverged(f"non-finite weights at {self.unit} {step}")
        if self.record is not None:
            progress["record"] = self.record.state_dict(self.path)
        save_training_state(self.path, self.fingerprint, self.loss, self.optimizer, {"step": step, **progress})
        self.saved_at(step)

    def saved_at(self, step: int) -> None:
        """Note the checkpoint at `step`; the next one is due at the next multiple of `every`."""
        self.saved_step = step
        self.next_save = step - step % self.every + self.every


def evaluate_policy(actor, env_id: str, env_kwargs: dict, episodes: int, seed: int) -> list[float]:
    """Returns of the deterministic policy (squashed mean) over `episodes` episodes with seeds seed, seed+1, ..."""
    env = make_env(env_id, env_kwargs=env_kwargs)
    returns = []
    for episode in range(episodes):
        env.set_seed(seed + episode)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            rollout = env.rollout(max_steps=1_000_000, policy=actor)
        returns.append(rollout["next", "reward"].sum().item())
    env.close()
    return returns


def train_offline(loss: CQLSACLoss, optimizer, tau: float, sample: Callable[[], TensorDictBase], updates: int,
                  log: MetricsLog, log_every: int, supervisor: Supervisor, desc: str = "offline") -> None:
    """`updates` CQL-SAC updates on batches from `sample`, carrying on from the supervisor's checkpoint."""
    start = supervisor.restore().get("step", 0)
    for step in tqdm(range(start, updates), desc=desc, mininterval=2.0, initial=start, total=updates):
        metrics = update_step(loss, optimizer, sample(), tau)
        supervisor.check(metrics, step + 1)
        if (step + 1) % log_every == 0:
            log(desc, metrics, int(loss.update_count))
        supervisor.tick(step + 1, lambda: {}, final=step + 1 == updates)


def train_online(loss: CQLSACLoss, optimizer, tau: float, new_collector: Callable[[int], Collector],
                 add: Callable[[TensorDictBase], None], sample: Callable[[float], TensorDictBase],
                 can_update: Callable[[int], bool], total_frames: int, utd_ratio: float,
                 evaluate: Callable[[], float], eval_every: int, on_eval: Callable[[int, float], None],
                 log: MetricsLog, supervisor: Supervisor, desc: str) -> None:
    """Collect, store, update `utd_ratio` times per new frame, evaluate every `eval_every` frames.

    `new_collector(frames)` makes a collector for the frames still to collect after `frames` (a
    resumed stage cannot restore the env, so it carries on with a fresh collector);
    `sample(progress)` gets the fraction of frames collected so far (for annealed mixing);
    `can_update(frames)` gates the first updates (random warm-up frames).
    """
    restored = supervisor.restore()
    frames, last_eval = restored.get("step", 0), restored.get("last_eval", 0)
    next_eval, owed_updates = restored.get("next_eval", eval_every), restored.get("owed_updates", 0.0)

    def progress() -> dict:
        return {"next_eval": next_eval, "owed_updates": owed_updates, "last_eval": last_eval}

    def settle() -> None:
        """The updates and the evaluation that the frames collected so far call for, then a checkpoint if due."""
        nonlocal owed_updates, next_eval, last_eval
        metrics = None
        while owed_updates >= 1:
            metrics = update_step(loss, optimizer, sample(frames / total_frames), tau)
            owed_updates -= 1
            supervisor.check(metrics, frames)
            if _stop_signal is not None:
                supervisor.tick(frames, progress)
        if metrics is not None:
            log(desc, metrics, frames)
        if frames > last_eval and (frames >= next_eval or frames >= total_frames):
            on_eval(frames, evaluate())
            last_eval, next_eval = frames, next_eval + eval_every
        supervisor.tick(frames, progress, final=frames >= total_frames)

    with tqdm(total=total_frames, initial=frames, desc=desc, mininterval=2.0) as bar:
        settle()  # a resumed loop first finishes what its last batch still owed
        if frames >= total_frames:
            return
        collector = new_collector(frames)
        for data in collector:
            frames += data.numel()
            bar.update(data.numel())
            add(data)
            if can_update(frames):
                owed_updates += utd_ratio * data.numel()
            settle()
        collector.shutdown()


class EpisodeAccumulator:
    """Holds online steps until their episode ends, then releases them with `mc_return` (Cal-QL's bound).

    The return-to-go of an online episode is only known once it has ended, so its transitions join
    the online buffer then, as in Cal-QL.
    """

    def __init__(self, gamma: float, keys: list):
        self.gamma, self.keys = gamma, keys
        self.pending: list[TensorDictBase] = []

    def add(self, data: TensorDictBase) -> TensorDictBase | None:
        """Store a batch of consecutive steps; return the completed episodes' transitions, if any."""
        data = data.reshape(-1).select(*self.keys, strict=False)
        done = data["next", "done"].reshape(-1)
        ends = torch.nonzero(done).reshape(-1).tolist()
        if not ends:
            self.pending.append(data)
            return None
        completed, start = [], 0
        for end in ends:
            episode = torch.cat([*self.pending, data[start:end + 1]])
            self.pending, start = [], end + 1
            rewards = episode["next", "reward"].reshape(-1).double().numpy()
            episode["mc_return"] = torch.as_tensor(
                discounted_returns(rewards, self.gamma), dtype=torch.float32).unsqueeze(-1)
            completed.append(episode)
        if start < data.shape[0]:
            self.pending.append(data[start:])
        return torch.cat(completed)


class CurveRecord:
    """Points (update, q_data, cql_gap) an offline loop logged, kept in its checkpoints so that a
    resumed stage still reports its whole curve."""

    def __init__(self):
        self.points: list[tuple[int, float, float]] = []

    def add(self, step: int, metrics: TensorDictBase) -> None:
        self.points.append((step, metrics["q_data"].item(), metrics["cql_gap"].item()))

    def state_dict(self, state_path: Path) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict, state_path: Path) -> None:
        self.points[:] = [tuple(point) for point in state["points"]]


def rows_state(rows: TensorDictBase) -> dict:
    """Transitions as plain tensors, for a checkpoint (`torch.load(weights_only=True)` reads them)."""
    return {"kind": ROWS, "size": rows.shape[0], "data": rows.to_dict()}


def rows_from_state(state: dict) -> TensorDict:
    return TensorDict(state["data"], batch_size=[state["size"]])


class OnlineRecord:
    """What an online stage gathered and a resume must not lose: replay rows, evaluations, unfinished episodes.

    Replay rows are saved in chunks next to the training state, each checkpoint writing only the
    rows added since the last one, so checkpoints of a long run do not rewrite its whole buffer.
    """

    def __init__(self, buffer, evals: list, accumulator: EpisodeAccumulator | None = None):
        self.buffer, self.evals, self.accumulator = buffer, evals, accumulator
        self.chunks: list[str] = []  # file names of the saved rows, in order
        self.saved_rows = 0

    def state_dict(self, state_path: Path) -> dict:
        """Save the rows added since the last call as a chunk beside `state_path`; the rest as a dict."""
        start, end = self.saved_rows, len(self.buffer)
        if end > start:
            # A chunk written by a run that was killed before its state file is simply overwritten.
            name = f"{state_path.name.removesuffix(STATE_SUFFIX)}.rows-{self.saved_rows:010d}{STATE_SUFFIX}"
            atomic_torch_save(rows_state(self.buffer[start:end]), state_path.with_name(name))
            self.chunks.append(name)
            self.saved_rows = end
        pending = self.accumulator.pending if self.accumulator is not None else []
        return {"chunks": list(self.chunks), "evals": list(self.evals),
                "pending": rows_state(torch.cat(pending)) if pending else None}

    def load_state_dict(self, state: dict, state_path: Path) -> None:
        for name in state["chunks"]:
            rows = rows_from_state(read_checkpoint(state_path.with_name(name), ROWS,
                                                   f"delete {state_path} to restart this stage from scratch"))
            self.buffer.extend(rows)
            self.saved_rows += rows.shape[0]
        self.chunks = list(state["chunks"])
        self.evals[:] = state["evals"]
        if state["pending"] is not None:
            self.accumulator.pending = [rows_from_state(state["pending"])]

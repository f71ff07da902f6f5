"""Training loops around `update_step`: offline updates, online collection + updates, evaluation."""

from __future__ import annotations

from typing import Callable

import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.envs import make_env
from cqlsac.components.update import update_step
from cqlsac.datasets.offline import discounted_returns

MetricsLog = Callable[[str, TensorDictBase, int], None]


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
                  log: MetricsLog, log_every: int, desc: str = "offline") -> None:
    """`updates` CQL-SAC updates on batches from `sample`."""
    for step in tqdm(range(updates), desc=desc, mininterval=2.0):
        metrics = update_step(loss, optimizer, sample(), tau)
        if (step + 1) % log_every == 0:
            log(desc, metrics, int(loss.update_count))


def train_online(loss: CQLSACLoss, optimizer, tau: float, collector, add: Callable[[TensorDictBase], None],
                 sample: Callable[[float], TensorDictBase], can_update: Callable[[int], bool], total_frames: int,
                 utd_ratio: float, evaluate: Callable[[], float], eval_every: int,
                 on_eval: Callable[[int, float], None], log: MetricsLog, desc: str) -> None:
    """Collect, store, update `utd_ratio` times per new frame, evaluate every `eval_every` frames.

    `sample(progress)` gets the fraction of frames collected so far (for annealed mixing);
    `can_update(frames)` gates the first updates (random warm-up frames).
    """
    frames, next_eval, owed_updates = 0, eval_every, 0.0
    with tqdm(total=total_frames, desc=desc, mininterval=2.0) as bar:
        for data in collector:
            frames += data.numel()
            bar.update(data.numel())
            add(data)
            if can_update(frames):
                owed_updates += utd_ratio * data.numel()
                metrics = None
                while owed_updates >= 1:
                    metrics = update_step(loss, optimizer, sample(frames / total_frames), tau)
                    owed_updates -= 1
                if metrics is not None:
                    log(desc, metrics, frames)
            if frames >= next_eval or frames >= total_frames:
                on_eval(frames, evaluate())
                next_eval += eval_every
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


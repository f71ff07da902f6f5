"""Aggregate statistics over runs, as reviewers of RL results expect them (Agarwal et al., 2021, "Deep
RL at the edge of the statistical precipice"; the estimators of their `rliable` library, written
here because rliable 1.2 does not import with the pandas this environment resolves).

Scores are arrays `[runs, tasks]`: one row per run (seed), one column per task or per point of a
curve. Confidence intervals are percentile intervals of a stratified bootstrap: each replicate
draws runs with replacement within every task, as rliable's `StratifiedBootstrap` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Statistic = Callable[[np.ndarray], float]


def mean(scores: np.ndarray) -> float:
    """The mean over all runs and tasks."""
    return float(np.mean(scores))


def iqm(scores: np.ndarray) -> float:
    """The interquartile mean: the mean of the middle 50% of all run x task scores, the lowest and
    the highest `floor(n / 4)` cut (as `scipy.stats.trim_mean(x, 0.25)` on the flattened scores)."""
    values = np.sort(np.asarray(scores, dtype=float).ravel())
    cut = int(0.25 * values.size)
    return float(np.mean(values[cut:values.size - cut]))


def _batched_mean(resampled: np.ndarray) -> np.ndarray:
    return resampled.reshape(len(resampled), -1).mean(axis=1)


def _batched_iqm(resampled: np.ndarray) -> np.ndarray:
    values = np.sort(resampled.reshape(len(resampled), -1), axis=1)
    cut = int(0.25 * values.shape[1])
    return values[:, cut:values.shape[1] - cut].mean(axis=1)


# `mean` and `iqm` of every bootstrap replicate `[reps, runs, tasks]` at once: the same numbers as a
# call per replicate, without a Python loop of 10,000 calls (a sweep's report takes seconds, not minutes).
BATCHED: dict[Statistic, Callable[[np.ndarray], np.ndarray]] = {mean: _batched_mean, iqm: _batched_iqm}


def stratified_bootstrap_ci(scores: np.ndarray, statistic: Statistic, reps: int = 10_000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `statistic` over `reps` stratified bootstrap replicates of `scores` `[runs, tasks]`."""
    scores = np.asarray(scores, dtype=float)
    scores = scores[:, None] if scores.ndim == 1 else scores
    runs, tasks = scores.shape
    rng = np.random.RandomState(seed)
    draws = rng.randint(0, runs, size=(reps, runs, tasks))
    resampled = np.take_along_axis(scores[None], draws, axis=1)  # [reps, runs, tasks]
    batched = BATCHED.get(statistic)
    replicates = batched(resampled) if batched else np.array([statistic(replicate) for replicate in resampled])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def interval_estimate(scores: np.ndarray, statistic: Statistic, reps: int = 10_000, seed: int = 0) -> dict:
    """`{"point", "low", "high"}`: the statistic on the scores and its 95% stratified bootstrap interval."""
    low, high = stratified_bootstrap_ci(scores, statistic, reps, seed=seed)
    return {"point": statistic(np.asarray(scores, dtype=float)), "low": low, "high": high}


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + P(X = Y) / 2 for a random run of X and one of Y, averaged over tasks (the Mann-Whitney
    U statistic over n_x * n_y; scores `[runs, tasks]`)."""
    x, y = (np.asarray(a, dtype=float) for a in (x, y))
    x, y = (a[:, None] if a.ndim == 1 else a for a in (x, y))
    per_task = [np.mean((x[:, None, t] > y[None, :, t]) + 0.5 * (x[:, None, t] == y[None, :, t]))
                for t in range(x.shape[1])]
    return float(np.mean(per_task))


def probability_of_improvement_ci(x: np.ndarray, y: np.ndarray, reps: int = 2_000, seed: int = 0) -> dict:
    """`probability_of_improvement` with a 95% interval: runs of X and of Y resampled separately."""
    x, y = (np.asarray(a, dtype=float) for a in (x, y))
    x, y = (a[:, None] if a.ndim == 1 else a for a in (x, y))
    rng = np.random.RandomState(seed)
    replicates = []
    for _ in range(reps):
        xs = np.take_along_axis(x, rng.randint(0, x.shape[0], size=x.shape), axis=0)
        ys = np.take_along_axis(y, rng.randint(0, y.shape[0], size=y.shape), axis=0)
        replicates.append(probability_of_improvement(xs, ys))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"point": probability_of_improvement(x, y), "low": float(low), "high": float(high)}


def performance_profile(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The fraction of run x task scores above each threshold (a run score distribution)."""
    values = np.asarray(scores, dtype=float).ravel()
    return np.array([np.mean(values > tau) for tau in thresholds])

"""The aggregate estimators against values computed by hand on small arrays."""

import numpy as np
import pytest

from cqlsac.components.statistics import (
    interval_estimate,
    iqm,
    mean,
    performance_profile,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
)


def test_iqm_cuts_a_quarter_of_the_scores_at_each_end():
    assert iqm(np.arange(1, 9)) == 4.5  # 8 scores: 3, 4, 5, 6 remain
    assert iqm(np.array([10.0, 1, 2, 3, 4, 5, -10])) == 3.0  # 7 scores: floor(1.75) = 1 cut at each end
    assert iqm(np.array([1.0, 2.0, 9.0])) == 4.0  # fewer than 4 scores: nothing cut, the mean
    assert iqm(np.array([[1.0, 100.0], [2.0, 3.0]])) == 2.5  # runs x tasks flattened: 2 and 3 remain
    assert mean(np.array([[1.0, 2.0], [3.0, 6.0]])) == 3.0


def test_a_bootstrap_of_equal_scores_has_no_width():
    assert stratified_bootstrap_ci(np.full((5, 2), 7.0), iqm, reps=200) == (7.0, 7.0)


def test_bootstrap_percentiles_of_two_runs():
    # Replicates of the mean of two draws from {0, 1}: 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4;
    # the 2.5th and 97.5th percentiles are then 0 and 1.
    low, high = stratified_bootstrap_ci(np.array([[0.0], [1.0]]), mean, reps=4000, seed=3)
    assert (low, high) == (0.0, 1.0)
    estimate = interval_estimate(np.array([0.0, 1.0, 1.0, 1.0]), mean, reps=2000)
    assert estimate["point"] == 0.75 and estimate["low"] < 0.75 < estimate["high"] <= 1.0


def test_bootstrap_resamples_runs_within_each_task():
    # Each run scores 0 on one task and 10 on the other: resampling whole runs (rows) gives 5 every time.
    # Resampled within each task, the two tasks' draws are independent: both all-0 (or all-10) with
    # probability 1/16 each, above the 2.5% tails, so the interval spans [0, 10].
    scores = np.array([[0.0, 10.0], [10.0, 0.0]])
    low, high = stratified_bootstrap_ci(scores, mean, reps=4000, seed=1)
    assert (low, high) == (0.0, 10.0)


@pytest.mark.parametrize("statistic", [mean, iqm])
def test_the_batched_statistics_equal_one_call_per_replicate(statistic):
    """The fast path of the bootstrap (every replicate at once) gives the very numbers of the plain one."""
    scores = np.random.default_rng(2).normal(size=(7, 5)) * 100
    batched = stratified_bootstrap_ci(scores, statistic, reps=500, seed=4)
    plain = stratified_bootstrap_ci(scores, lambda replicate: statistic(replicate), reps=500, seed=4)  # not in BATCHED
    assert batched == plain


def test_probability_of_improvement_counts_ties_as_half():
    # Pairs: 1 vs 2 -> 0, 2 vs 2 -> 1/2, 3 vs 2 -> 1, each twice: 3 / 6.
    assert probability_of_improvement(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0])) == 0.5
    assert probability_of_improvement(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 1.0
    # Averaged over tasks: task 0 always better (1), task 1 always worse (0).
    assert probability_of_improvement(np.array([[5.0, 0.0]]), np.array([[1.0, 9.0]])) == 0.5
    estimate = probability_of_improvement_ci(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0]), reps=200)
    assert estimate == pytest.approx({"point": 1.0, "low": 1.0, "high": 1.0})

    # Resampled runs of X = {0, 1} against Y = {0.5}: replicates 0, 1/2, 1 with probabilities 1/4, 1/2,
    # 1/4, so the interval is [0, 1]; the same with the two runs on Y's side, which is resampled too.
    for x, y in (([0.0, 1.0], [0.5]), ([1.0], [0.0, 2.0])):
        estimate = probability_of_improvement_ci(np.array(x), np.array(y), reps=4000, seed=3)
        assert estimate == {"point": 0.5, "low": 0.0, "high": 1.0}, (x, y)


def test_performance_profile_is_the_fraction_above_each_threshold():
    profile = performance_profile(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.0, 2.0, 4.0]))
    assert profile.tolist() == [1.0, 0.5, 0.0]

"""Where the default pipeline spends its time, stage by stage.

Runs a pipeline (the default unless a config and overrides are given) in a fresh cache and splits
each stage's wall time into: updates (`Agent.update`), env steps (`EnvBase.step` inside the
collectors), policy calls of the collectors, evaluation (all of `evaluate_policy`, its own env
steps and policy calls included), and everything else (replay, checkpoints, logging, dataset
writing, process start-up of a stage). Timers wrap the public functions; nothing else changes.

    python benchmarks/pipeline_profile.py [CONFIG] [key=value ...]

Prints one table (seconds and shares per stage), the machine it ran on, and the run's returns in
full (dataset, offline, final, SAC from scratch), to compare with another commit's.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

from cqlsac.components import evaluation, update
from cqlsac.datasets import creation
from cqlsac.pipeline import Pipeline, PipelineConfig
from cqlsac.pipeline import pipeline as runner

TIMES: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
CURRENT = {"stage": None, "inside": None}  # `inside` keeps evaluation's own env steps out of "env steps"


@contextmanager
def timed(bucket: str):
    if CURRENT["inside"] is not None:  # nested in an outer measurement: counted there
        yield
        return
    CURRENT["inside"] = bucket
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[CURRENT["stage"]][bucket] += time.perf_counter() - start
        CURRENT["inside"] = None


def wrap(owner, name: str, bucket: str) -> None:
    original = getattr(owner, name)

    def measured(*args, **kwargs):
        with timed(bucket):
            return original(*args, **kwargs)

    setattr(owner, name, measured)


def instrument() -> None:
    from torchrl.envs import EnvBase

    wrap(update.Agent, "update", "updates")
    wrap(evaluation, "evaluate_policy", "evaluation")
    for user in (runner, creation):  # they imported the names before
        user.evaluate_policy = evaluation.evaluate_policy
    wrap(EnvBase, "step", "env steps")
    wrap(EnvBase, "reset", "env steps")
    original_collector = runner.make_collector

    def collector_with_timed_policy(env_factory, policy, **kwargs):
        if policy is not None:
            forward = policy.forward

            def timed_forward(*args, **kw):
                with timed("policy calls"):
                    return forward(*args, **kw)

            policy.forward = timed_forward  # the collector calls module.forward through __call__
        return original_collector(env_factory, policy, **kwargs)

    runner.make_collector = creation.make_collector = collector_with_timed_policy
    run_or_reuse = Pipeline.run_or_reuse

    def timed_stage(pipe, name, folder):
        CURRENT["stage"] = name
        start = time.perf_counter()
        try:
            return run_or_reuse(pipe, name, folder)
        finally:
            TIMES[name]["total"] = time.perf_counter() - start

    Pipeline.run_or_reuse = timed_stage


def main() -> None:
    args = sys.argv[1:]
    config = args.pop(0) if args and "=" not in args[0] else None
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MINARI_DATASETS_PATH", os.path.join(tmp, "minari"))
        os.environ.setdefault("CQLSAC_CACHE", os.path.join(tmp, "cache"))
        cfg = PipelineConfig.from_yaml(config, [*args, f"output_dir={tmp}/runs", f"cache_dir={tmp}/cache"])
        start = time.perf_counter()
        summary = Pipeline(cfg).run()
        wall = time.perf_counter() - start
    buckets = ["updates", "env steps", "policy calls", "evaluation"]
    print(f"\n{platform.processor() or platform.machine()} | {os.cpu_count()} cores | load {os.getloadavg()[0]:.2f}"
          f" | torch threads {__import__('torch').get_num_threads()} | wall {wall:.1f} s")
    print("| stage | total s | " + " | ".join(buckets) + " | everything else |")
    print("| --- | --- | " + " | ".join("---" for _ in buckets) + " | --- |")
    for stage, times in TIMES.items():
        total = times["total"]
        rest = total - sum(times[b] for b in buckets)
        cells = [f"{times[b]:.1f} ({times[b] / total:.0%})" for b in buckets + ["rest"]]
        cells[-1] = f"{rest:.1f} ({rest / total:.0%})"
        print(f"| {stage} | {total:.1f} | " + " | ".join(cells) + " |")
    # The run's own numbers, in full: a speed change that keeps the computation keeps them bit for bit.
    for key in ("dataset_mean_return", "offline_eval_return", "final_eval_return", "sac_final_return"):
        print(f"{key}: {summary.get(key)!r}")


if __name__ == "__main__":
    main()

"""How far each fine-tuning recipe is from issue 19's targets, over kept sweep records.

The targets: the dip after the switch under 0.10 of the expert - random range on every task, and
the online steps to SAC from scratch's final return at most 0.5 of SAC's on LunarLander continuous
and Hopper. Each is judged by the upper end of the 95% stratified bootstrap interval of the IQM over
seeds, the figure docs/results.md gives for the same sweep (same statistic, same resampling seed).

    python experiments/recipe_targets.py docs/records/A.json [B.json ...] \
        [--step-tasks lunarlander hopper] [--write docs/recipes.md]

A task is a record's config name. Prints a markdown table, one row per recipe: per task, `met`, or
by how much the upper end misses the target. Where seeds never reached SAC's final return (the report
counts them as their budget plus one evaluation interval), the miss is given as at least what it is
with those seeds at their budget, the least their fractions can be. With --write, the table replaces the lines between
`<!-- recipe-targets -->` and `<!-- /recipe-targets -->` in that file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cqlsac.components.checkpoints import atomic_write
from cqlsac.components.statistics import interval_estimate, iqm
from cqlsac.pipeline.config import ConfigError
from cqlsac.pipeline.sweep import load_record
from cqlsac.pipeline.sweep_report import dip, figure, settings, steps_to_sac_final

DIP_TARGET = 0.10
STEP_TARGET = 0.5
BEGIN, END = "<!-- recipe-targets -->", "<!-- /recipe-targets -->"


def never_reached(summary: dict) -> bool:
    """Fine-tuning never reached SAC from scratch's final return within its budget."""
    return "finetune_step_fraction" in summary and summary["finetune_step_fraction"] is None


def reached_by_budget(summary: dict) -> float | None:
    """`steps_to_sac_final` with a seed that never got there counted at its budget over SAC's: the
    least its true fraction can be, so an interval end from these bounds the true one from below."""
    if never_reached(summary):
        return summary["finetune_evals"][-1][0] / summary["sac_frames"]
    return steps_to_sac_final(summary)


def verdict(summaries: list[dict], key, target: float) -> str:
    """`met`, or how far the upper end of the IQM's interval lies above `target` (or at it, for the dip)."""
    values = figure(summaries, key)
    if values.size == 0:
        return "no offline policy" if key is dip and summaries else "-"
    if values.size == 1:
        return "one run"
    high = interval_estimate(values, iqm)["high"]
    if high < target or (high == target and key is not dip):  # the dip under the target, the steps at most
        return "met"
    never = sum(map(never_reached, summaries)) if key is steps_to_sac_final else 0
    if not never:
        return f"short by {high - target:.2f}"
    # The IQM and the bootstrap's percentiles only grow with any one value: never-reached seeds at
    # their budget give the least the upper end can be.
    least = interval_estimate(figure(summaries, reached_by_budget), iqm)["high"] - target
    bound = f"at least {least:.2f}" if least > 0 else "unknown"
    return f"short by {bound} (never on {never} of {len(summaries)} seeds)"


def table(records: list[dict], step_tasks: list[str]) -> list[str]:
    """One row per recipe; per task a dip column, and a step column for the tasks in `step_tasks`."""
    columns, cells = [], {}
    for record in records:
        task = record["spec"]["config"] or "default"
        columns.append(f"dip, {task}")
        if task in step_tasks:
            columns.append(f"steps, {task}")
        for label, summaries in settings(record):
            row = cells.setdefault(label, {})
            row[f"dip, {task}"] = verdict(summaries, dip, DIP_TARGET)
            if task in step_tasks:
                row[f"steps, {task}"] = verdict(summaries, steps_to_sac_final, STEP_TARGET)
    lines = [f"| recipe | {' | '.join(columns)} |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {label} | {' | '.join(row.get(c, '-') for c in columns)} |" for label, row in cells.items()]
    return lines


def replace_block(path: Path, lines: list[str]) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ConfigError(f"{path}: no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write(path, head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records", nargs="+", type=Path, help="sweep records (docs/records/*.json) or sweep directories")
    p.add_argument("--step-tasks", nargs="+", default=["lunarlander", "hopper"],
                   help="config names the step target applies to")
    p.add_argument("--write", type=Path, help="a markdown file with a recipe-targets block to replace")
    args = p.parse_args(argv)
    try:
        lines = table([load_record(path) for path in args.records], args.step_tasks)
        if args.write:
            replace_block(args.write, lines)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The report of a sweep, from what is on disk: per setting, the mean and interquartile mean of the
final and intermediate returns with 95% stratified bootstrap intervals, the probability that one
setting improves on another, and learning curves with interval bands (`cqlsac report SWEEP_DIR`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from cqlsac.components.checkpoints import atomic_write
from cqlsac.components.statistics import (
    interval_estimate,
    iqm,
    mean,
    performance_profile,
    probability_of_improvement_ci,
)
from cqlsac.pipeline.cache import ensure_writable
from cqlsac.pipeline.config import ConfigError
from cqlsac.pipeline.report import fmt, save_figure
from cqlsac.pipeline.sweep import dataset_digests, load_record, record_name, record_path

RECORDS = "records"  # beside a results page: the records its sections are made from


def at_budget_share(share: float):
    """The fine-tuning return at the evaluation nearest to `share` of its budget."""
    def value(summary: dict) -> float | None:
        evals = summary.get("finetune_evals")
        if not evals:
            return None
        target = share * evals[-1][0]
        return min(evals, key=lambda point: abs(point[0] - target))[1]
    return value


def dip(summary: dict) -> float | None:
    """How far fine-tuning falls below the offline policy it starts from after the switch, as a share of
    the expert - random range of the normalisation (0: it never falls below where it started). None for
    a fresh agent (recipes `seed`, `rlpd`): no offline policy, no switch, and a fall from an untrained
    policy's first evaluation says nothing about unlearning."""
    evals, low, high = summary.get("finetune_evals"), summary.get("ref_min_score"), summary.get("ref_max_score")
    if not evals or len(evals) < 2 or low is None or high is None or summary.get("offline_eval_return") is None:
        return None
    return max(0.0, evals[0][1] - min(r for _, r in evals[1:])) / (high - low)


def steps_to_sac_final(summary: dict) -> float | None:
    """Online steps to SAC from scratch's final return over SAC's budget; a run that never reached it
    counts as its whole budget plus one evaluation interval (a censored value above the others)."""
    if "finetune_step_fraction" not in summary:
        return None
    if summary["finetune_step_fraction"] is not None:
        return summary["finetune_step_fraction"]
    evals = summary["finetune_evals"]
    return (evals[-1][0] + evals[-1][0] - evals[-2][0]) / summary["sac_frames"]


def compute_minutes(summary: dict) -> float | None:
    """Minutes the run spent computing its stages (stages it reused from the cache cost nothing)."""
    seconds = summary.get("stage_seconds")
    return sum(seconds.values()) / 60 if seconds else None


def recipe_minutes(summary: dict) -> float | None:
    """Minutes of the stages that make the fine-tuned agent, offline training and fine-tuning, whether
    this run computed them or reused them from the cache: what a recipe costs, without the dataset and
    SAC from scratch that every recipe of a seed shares."""
    seconds = summary.get("stage_compute_seconds") or {}
    if seconds.get("finetune") is None:
        return None
    return sum(seconds.get(name) or 0.0 for name in ("offline", "finetune")) / 60


# Figures reported per setting: (what it is, its key in summary.json or a function of the summary[, digits]).
FIGURES = (("final return (fine-tuned policy)", "final_eval_return"),
           ("lowest mean of 100 consecutive final episodes", "final_lowest_window_mean"),
           ("fine-tuning return at 10% of its budget", at_budget_share(0.10)),
           ("fine-tuning return at 25% of its budget", at_budget_share(0.25)),
           ("fine-tuning return at 50% of its budget", at_budget_share(0.50)),
           ("the dip after the switch, as a share of the expert - random range (none for a fresh agent: no offline policy)",
            dip, 2),
           ("online steps to SAC's final return, over SAC's budget (never: budget + one interval)", steps_to_sac_final, 2),
           ("offline CQL policy", "offline_eval_return"),
           ("SAC from scratch, final", "sac_final_return"),
           ("dataset (behaviour policy)", "dataset_mean_return"),
           ("compute per run in minutes (the stages it ran; stages reused from the cache cost none)", compute_minutes),
           ("the recipe's compute in minutes: offline training and fine-tuning, computed or reused", recipe_minutes))


def setting_label(record: dict, run: dict) -> str:
    """A setting's name: its given name in the sweep's `named` settings, or its `key=value` list."""
    named = record["spec"].get("named") or {}
    if named:
        return list(named)[run["setting"]]
    return ", ".join(f"{key}={value}" for key, value in run["overrides"].items()) or "base config"


def settings(record: dict) -> list[tuple[str, list[dict]]]:
    """(label, the finished runs' summaries) per setting, in the sweep's order."""
    groups: dict[int, tuple[str, list[dict]]] = {}
    for run in record["runs"]:
        label, summaries = groups.setdefault(run["setting"], (setting_label(record, run), []))
        if run["status"] == "finished":
            summaries.append(run["summary"])
    return list(groups.values())


def figure(summaries: list[dict], key) -> np.ndarray:
    """The figure `key` (a summary key, or a function of a summary) of every run that has it."""
    values = [key(s) if callable(key) else s.get(key) for s in summaries]
    return np.array([v for v in values if v is not None], dtype=float)


def curve(summaries: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(frames, returns `[runs, points]`) of the evaluation curves every run has on the same frames."""
    curves = [s.get(key) for s in summaries if s.get(key)]
    if not curves or any([f for f, _ in c] != [f for f, _ in curves[0]] for c in curves):
        return None
    return np.array([f for f, _ in curves[0]]), np.array([[r for _, r in c] for c in curves], dtype=float)


def estimate(values: np.ndarray, statistic, digits: int = 1) -> str:
    if values.size == 0:
        return "-"
    if values.size == 1:
        return f"{fmt(float(values[0]), digits)} (one run)"
    est = interval_estimate(values, statistic)
    return f"{fmt(est['point'], digits)} [{fmt(est['low'], digits)}, {fmt(est['high'], digits)}]"


def mixed_data(runs: list[dict]) -> list[str]:
    """A warning where finished runs trained on different data under one dataset id (their summaries'
    content digests differ), so that the tables are not one comparison."""
    mixed = [f"**Mixed data: the finished runs trained on {len(found)} different datasets named `{dataset_id}`.** "
             "Their results are not one comparison." for dataset_id, found in dataset_digests(runs).items()
             if len(found) > 1]
    return [*mixed, ""] if mixed else []


def markdown(record: dict, name: str, image: str) -> str:
    """The sweep's results: setting tables, improvement probabilities, curves; with how they were made."""
    title = record["spec"].get("title") or f"Sweep `{name}`"
    runs = record["runs"]
    counts = {status: sum(r["status"] == status for r in runs) for status in ("finished", "failed", "interrupted")}
    compute = 60 * sum(compute_minutes(r["summary"] or {}) or 0.0 for r in runs)
    machine = record["machine"]
    first_code = (record.get("sessions") or [{}])[0].get("code")  # None in records from before code was recorded
    description = record["spec"].get("description")
    incomplete = ([f"**Incomplete: {counts['finished']} of {len(runs)} runs finished.** The tables hold the finished "
                   "runs only; `cqlsac sweep --resume` carries the sweep on (docs/sweeps.md).", ""]
                  if counts["finished"] < len(runs) else [])
    lines = [f"## {title}", "", *incomplete, *mixed_data(runs), *([" ".join(description.split()), ""] if description else []),
             f"Command: `{record['command'] or '(from Python)'}`; config `{record['spec']['config'] or 'default'}`"
             + (f" with {', '.join(f'`{o}`' for o in record['spec']['overrides'])}" if record['spec']['overrides'] else "")
             + f"; seeds {_seed_text(record['spec']['seeds'])}.",
             f"Ran {record['started']} on {machine['cpu']} ({machine['cores']} cores"
             + (f", torch {machine['torch']}" if machine.get("torch") else "") + ")"
             + (f" with cqlsac at commit {first_code}" if first_code else "") + f", {record['backend']} backend, "
             f"{record['workers']} at once with {record['threads']} thread(s) each: "
             + (f"{record['wall_seconds'] / 60:.1f} min wall, " if record["wall_seconds"]
                else "wall time not known (a session was cut off), " if len(record.get("sessions", [])) > 1 else "")
             + f"{compute / 60:.1f} min of stage compute in these runs (stages reused from the cache cost none here). "
             f"Runs: {counts['finished']} finished, {counts['failed']} failed, {counts['interrupted']} interrupted."
             + "".join(f" Resumed {session['started']} by `{session['command'] or '(from Python)'}`"
                       + (f" on {session['machine']['cpu']} ({session['machine']['cores']} cores)"
                          if session.get("machine") and session["machine"] != machine else "")
                       + (f" with cqlsac at commit {session['code']}" if session.get("code") and session["code"] != first_code
                          else " with unrecorded code" if first_code and not session.get("code") else "")
                       + (f" ({session['wall_seconds'] / 60:.1f} min)." if session["wall_seconds"] else ".")
                       for session in record.get("sessions", [])[1:]), "",
             "Each cell: the statistic over the seeds, then its 95% stratified bootstrap interval in brackets.", ""]
    for what, key, *digits in FIGURES:
        digits = digits[0] if digits else 1
        groups = [(label, figure(summaries, key)) for label, summaries in settings(record)]
        if not any(values.size for _, values in groups):
            continue
        lines += [f"**{what}**" + ("" if callable(key) else f" (`{key}`)"), "", "| setting | runs | mean | IQM |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {label} | {values.size} | {estimate(values, mean, digits)} | {estimate(values, iqm, digits)} |"
                  for label, values in groups]
        lines.append("")
    lines += fraction_table(record)
    lines += episode_table(record)
    lines += improvement_table(record)
    lines += run_table(record)
    lines += [f"![curves]({image})", "",
              "Left: IQM over seeds of the mean evaluation return at each evaluation, with its 95% stratified "
              "bootstrap band (SAC from scratch dashed). Right, with several settings: the fraction of each "
              "setting's runs whose final return is above each level (performance profiles).", ""]
    failed = [r for r in runs if r["status"] != "finished"]
    if failed:
        lines += ["Runs not finished:", ""] + [f"- {setting_label(record, r)}, seed {r['seed']}: {r['status']}"
                                               + (f" ({r['error']})" if r.get("error") else "") for r in failed] + [""]
    return "\n".join(lines)


def fraction_table(record: dict) -> list[str]:
    """How soon fine-tuning reaches SAC's final return, per setting: runs that never did count as such."""
    lines = ["**fine-tuning reaches SAC's final return** (online steps over SAC's budget; never = not "
             "within fine-tuning's budget)", "", "| setting | runs | reached | trivially (at 0) | median fraction |",
             "| --- | --- | --- | --- | --- |"]
    any_rows = False
    for label, summaries in settings(record):
        known = [s for s in summaries if "finetune_step_fraction" in s]
        if not known:
            continue
        any_rows = True
        fractions = [s["finetune_step_fraction"] for s in known]
        reached = [f for f in fractions if f is not None]
        trivial = sum(bool(s.get("finetune_step_fraction_trivial")) for s in known)
        ordered = sorted(fractions, key=lambda f: math.inf if f is None else f)
        middle = ordered[(len(ordered) - 1) // 2]
        lines.append(f"| {label} | {len(known)} | {len(reached)} | {trivial} | "
                     f"{'never' if middle is None else f'{middle:.2f}'} |")
    return lines + [""] if any_rows else []


def median(values: np.ndarray) -> float:
    return float(np.median(values))


def ratio_bounds(summary: dict) -> tuple[float, float]:
    """Bounds on a run's episode ratio (fine-tuning's episodes to the level over SAC's): the ratio itself
    where both reached the level; where only fine-tuning did, at most its episodes over all of SAC's (SAC
    needs more than it ran); where only SAC did, at least all of fine-tuning's episodes over SAC's; where
    neither did, anything from 0 to infinity."""
    if summary["episode_ratio"] is not None:  # both reached it
        return summary["episode_ratio"], summary["episode_ratio"]
    ours, sac = summary["finetune_episodes_to_level"], summary["sac_episodes_to_level"]
    if ours is not None:
        return 0.0, ours / summary["sac_episodes"]
    if sac is not None:
        return summary["finetune_episodes"] / sac, math.inf
    return 0.0, math.inf


def _bound_text(low: float, high: float) -> str:
    if low == high:
        return f"{low:.2f}"
    if math.isinf(high):
        return f"at least {low:.2f}" if low > 0 else "unknown"
    return f"at most {high:.2f}"


def episode_table(record: dict) -> list[str]:
    """The seed's measure: training episodes until the mean of the last episodes reaches a level, fine-tuning
    against SAC from scratch, with the median ratio over the seeds where both got there and its bootstrap
    interval, each seed's ratio or the bound its run gives, and the bounds these give the median ratio
    over all seeds (each seed's ratio lies within its bounds, so the median lies within their medians)."""
    rows = []
    for label, summaries in settings(record):
        known = [s for s in summaries if "episode_ratio" in s]
        if not known:
            continue
        ours = [s["finetune_episodes_to_level"] for s in known]
        sac = [s["sac_episodes_to_level"] for s in known]
        ratios = np.array([s["episode_ratio"] for s in known if s["episode_ratio"] is not None], dtype=float)
        bounds = [ratio_bounds(s) for s in known]
        low, high = (median(np.array([b[i] for b in bounds])) for i in (0, 1))
        median_text = (f"{low:.2f}" if low == high else f"{low:.2f} to " + ("no upper bound" if math.isinf(high)
                                                                            else f"{high:.2f}"))
        level, window = known[0]["episode_return_level"], known[0]["episode_window"]
        rows.append(f"| {label} | {len(known)} | {_counts(ours)} | {_counts(sac)} | "
                    f"{estimate(ratios, median) if ratios.size else '-'} | {', '.join(_bound_text(*b) for b in bounds)} | "
                    f"{median_text} |")
    if not rows:
        return []
    return [f"**training episodes until the mean return of the last {window} episodes first reaches {fmt(level)}** "
            "(per seed; never = not within the budget; the ratio fine-tuning over SAC where both reached it, its "
            "median and 95% bootstrap interval; per seed the ratio, or where one never got there the bound its "
            "budget gives: at most fine-tuning's episodes over all of SAC's where only fine-tuning got there, at "
            "least all of fine-tuning's over SAC's where only SAC did; and the range these bounds leave for the "
            "median ratio over all seeds)", "",
            "| setting | runs | fine-tuning | SAC from scratch | ratio, median where both reached | ratio or bound, per seed "
            "| median ratio, all seeds |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""]


def _counts(values: list) -> str:
    return ", ".join("never" if v is None else str(v) for v in values)


RUN_COLUMNS = (("final", "final_eval_return"), ("offline", "offline_eval_return"),
               ("SAC from scratch", "sac_final_return"), ("dataset", "dataset_mean_return"))


def run_table(record: dict) -> list[str]:
    """Every finished run's own numbers, so that two sweeps of the same runs can be compared run by run."""
    finished = [r for r in record["runs"] if r["status"] == "finished"]
    columns = [(name, key) for name, key in RUN_COLUMNS if any(r["summary"].get(key) is not None for r in finished)]
    if not finished or not columns:
        return []
    rows = [f"| {setting_label(record, r)} | {r['seed']} | "
            + " | ".join("-" if r["summary"].get(key) is None else f"{r['summary'][key]:.4f}" for _, key in columns) + " |"
            for r in finished]
    return ["**each run** (returns to 4 decimals)", "", "| setting | seed | " + " | ".join(n for n, _ in columns) + " |",
            "|---" * (len(columns) + 2) + "|", *rows, ""]


def improvement_table(record: dict) -> list[str]:
    groups = [(label, figure(summaries, "final_eval_return")) for label, summaries in settings(record)]
    groups = [(label, values) for label, values in groups if values.size > 1]
    if len(groups) < 2:
        return []
    lines = ["**probability that the row setting's final return beats the column's** (P(X > Y) over runs, ties "
             "half, with its 95% bootstrap interval)", "",
             "| | " + " | ".join(label for label, _ in groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for label, x in groups:
        cells = []
        for other, y in groups:
            if other == label:
                cells.append("-")
            else:
                est = probability_of_improvement_ci(x, y)
                cells.append(f"{est['point']:.2f} [{est['low']:.2f}, {est['high']:.2f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(record: dict, path: Path) -> None:
    """Learning curves (IQM over seeds with its band; SAC from scratch dashed, once per distinct curve)
    and, with two settings or more, the performance profiles of their final returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = settings(record)
    finals = [(label, figure(summaries, "final_eval_return")) for label, summaries in groups]
    finals = [(label, values) for label, values in finals if values.size]
    fig, axes = plt.subplots(1, 2 if len(finals) > 1 else 1, figsize=(12 if len(finals) > 1 else 7, 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn: list[np.ndarray] = []
    for index, (label, summaries) in enumerate(groups):
        colour = colours[index % len(colours)]
        for key, name, style in (("finetune_evals", label, "-"), ("baseline_evals", "SAC from scratch", "--")):
            points = curve(summaries, key)
            if points is None or any(np.array_equal(points[1], other) for other in drawn):
                continue
            frames, returns = points
            drawn.append(returns)
            bands = [interval_estimate(returns[:, i], iqm, reps=2000) for i in range(returns.shape[1])]
            ax.plot(frames, [b["point"] for b in bands], style, color=colour, label=f"{name} ({returns.shape[0]} seeds)")
            ax.fill_between(frames, [b["low"] for b in bands], [b["high"] for b in bands], color=colour, alpha=0.15)
    ax.set(xlabel="online environment steps", ylabel="evaluation return (IQM over seeds)")
    if len(finals) > 1:
        every = np.concatenate([values for _, values in finals])
        thresholds = np.linspace(every.min(), every.max(), 200)
        for index, (label, values) in enumerate(finals):
            axes[0, 1].step(thresholds, performance_profile(values, thresholds), color=colours[index % len(colours)],
                            label=label)
        axes[0, 1].set(xlabel="final return tau", ylabel="fraction of runs with a final return above tau",
                       title="performance profiles")
    save_figure(fig, path)


def write(sweep_dir: Path) -> Path:
    """Write `report.md` and `curves.png` of the sweep in `sweep_dir`; returns the report's path."""
    if not Path(sweep_dir).is_dir():
        record_path(sweep_dir)  # neither a directory nor a record file: its error
        raise ConfigError(f"{sweep_dir} is a sweep record, not a sweep directory: regenerate it into a results "
                          "page with --results FILE")
    record = load_record(sweep_dir)
    text = "# cqlsac sweep report\n\n" + markdown(record, record_name(sweep_dir), "curves.png")
    plot(record, Path(sweep_dir) / "curves.png")
    report = Path(sweep_dir) / "report.md"
    atomic_write(report, text)
    return report


SECTION_MARK = "<!-- sweep {} -->"
SECTION_PATTERN = re.compile(r"^<!-- sweep (.+) -->$", re.MULTILINE)


def results_sections(page: str) -> dict[str, str]:
    """The generated sections of a results page, by sweep name, in page order (the header is not one)."""
    marks = list(SECTION_PATTERN.finditer(page))
    ends = [m.start() for m in marks[1:]] + [len(page)]
    return {m.group(1): page[m.start():end].rstrip("\n") + "\n" for m, end in zip(marks, ends)}


def section(name: str, record: dict) -> str:
    """A results page's section for the sweep `name`, made from its record (which it links)."""
    return (SECTION_MARK.format(name) + "\n" + markdown(record, name, f"img/sweep-{name}.png")
            + f"\nRecord: [{RECORDS}/{name}.json]({RECORDS}/{name}.json).\n")


def contents(sections: dict[str, str]) -> list[str]:
    """A list of the page's sections in page order (new sweeps go last), each linked by the anchor GitHub gives its title
    (lower case, punctuation dropped, spaces as hyphens, `-1`, `-2` on repeats), with when and where it
    ran and whether its sweep was left incomplete: sections of the same title are told apart."""
    seen: dict[str, int] = {}
    lines = []
    for text in sections.values():
        title = re.search(r"^## (.+)$", text, re.MULTILINE).group(1)
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        repeat = seen.get(anchor, 0)
        seen[anchor] = repeat + 1
        ran = re.search(r"^Ran (\d{4}-\d{2}-\d{2}) \S+ UTC on (.+?) \(", text, re.MULTILINE)
        incomplete = re.search(r"\*\*Incomplete: (\d+ of \d+) runs finished", text)
        lines.append(f"- [{title}](#{anchor}{f'-{repeat}' if repeat else ''})"
                     + (f", ran {ran.group(1)} on {ran.group(2)}" if ran else "")
                     + (f" (incomplete: {incomplete.group(1)} runs)" if incomplete else ""))
    return lines


def write_results(sources: list[Path], results: Path, title: str = "Results") -> None:
    """Make or update a results page: one generated section per sweep, its curves in `img/` beside the
    page and its record in `records/`, so that the page can be made again when the sweep directories
    are gone. The named sweeps' sections are replaced where the page has them and added at its end
    otherwise; the page's other sections stay as they are."""
    results = Path(results)
    if results.is_dir() or (results.parent.exists() and not results.parent.is_dir()):
        raise ConfigError(f"--results {results}: not a file that can be written; name the results page, "
                          "e.g. docs/results.md")
    images, records = results.parent / "img", results.parent / RECORDS
    page = results.read_text() if results.is_file() else ""
    sections = results_sections(page)
    if page.strip() and not sections:
        raise ConfigError(f"{results} has no generated sections (lines `{SECTION_MARK.format('NAME')}`), so "
                          "rewriting it would lose its text: give --results a new file")
    loaded = [(record_path(source), record_name(source), load_record(source)) for source in sources]  # all, first
    made = {name: section(name, record) for _, name, record in loaded}  # every section before anything is written
    ensure_writable(results.parent, "--results", "name a results page in a folder you can write")
    for folder in (images, records):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--results {results}: {folder} is a file; the page keeps its "
                              f"{'curves' if folder == images else 'records'} in a folder of that name")
    for given, name, record in loaded:
        plot(record, images / f"sweep-{name}.png")
        kept = records / f"{name}.json"
        if not (kept.is_file() and kept.samefile(given)):
            atomic_write(kept, given.read_bytes())
    sections.update(made)
    header = [f"# {title}", "",
              f"Each section is generated by `cqlsac report SWEEP_DIR --results {results}` from that sweep's record, "
              f"which is kept in [{RECORDS}/]({RECORDS}/): `cqlsac report {results.parent / RECORDS}/NAME.json "
              f"--results {results}` makes a section again; do not edit by hand. Dated notes of what was tried and "
              "not kept are in [experiments/](experiments/).", "", *contents(sections), "", ""]
    atomic_write(results, "\n".join(header) + "\n".join(sections.values()))


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)

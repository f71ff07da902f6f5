"""The end-of-run report: `summary.json` (for scripts), `report.md` (for people) and `curves.png`."""

from __future__ import annotations

import io
import math
import resource
from pathlib import Path

from cqlsac.components.checkpoints import atomic_json, atomic_write


def steps_to_reach(evals: list, level: float) -> int | None:
    """Online steps of the first evaluation whose return is at least `level` (None: never reached)."""
    return next((frames for frames, mean_return in evals if mean_return >= level), None)


def finetune_comparison(evals: list | None, baseline: list | None, random_return: float | None = None,
                        near: float = 0.95) -> dict:
    """The seed's headline claim, from the evaluation curves: how soon fine-tuning reaches SAC's final return.

    `finetune_step_fraction` = online steps the offline-to-online agent needed to reach the final
    return of SAC from scratch, over SAC's whole budget; at most 0.5 means "in half the steps".
    A fraction of 0 is trivial (`..._trivial`): the offline policy was already there before any
    online step. When both agents end at the task's optimum, evaluation noise decides the strict
    comparison, so with the random policy's return known the same figure is also given for
    `near` (95%) of the way from random to SAC's final return.
    """
    if not evals or not baseline:
        return {}
    sac_frames, sac_final = baseline[-1]
    out = {"sac_final_return": sac_final, "sac_frames": sac_frames}
    levels = {"": sac_final}
    if random_return is not None:
        levels["_near"] = random_return + near * (sac_final - random_return)
    for suffix, level in levels.items():
        steps = steps_to_reach(evals, level)
        out[f"finetune_steps_to_sac_final{suffix}"] = steps
        out[f"finetune_step_fraction{suffix}"] = None if steps is None else steps / sac_frames
        out[f"finetune_step_fraction{suffix}_trivial"] = steps == 0
    return out


def window_means(episodes: list | None, window: int) -> list[tuple[float, int]]:
    """(mean return of `window` consecutive training episodes, episodes so far) at each episode from the `window`-th."""
    returns = [episode[1] for episode in episodes or []]
    return [(sum(returns[count - window:count]) / window, count) for count in range(window, len(returns) + 1)]


def episodes_to_level(episodes: list | None, level: float, window: int) -> int | None:
    """Training episodes until the mean return of the last `window` first reaches `level` (None: never)."""
    return next((count for mean, count in window_means(episodes, window) if mean >= level), None)


def episode_comparison(finetune: dict, baseline: dict, level: float | None, window: int) -> dict:
    """The seed's measure: training episodes to reach `level`, fine-tuning against SAC from scratch."""
    if level is None or "episodes" not in finetune or "episodes" not in baseline:
        return {}
    ours, sac = (episodes_to_level(out["episodes"], level, window) for out in (finetune, baseline))
    ratio = None if ours is None or sac is None else ours / sac
    return {"episode_return_level": level, "episode_window": window, "finetune_episodes_to_level": ours,
            "sac_episodes_to_level": sac, "episode_ratio": ratio,
            "finetune_episodes": len(finetune["episodes"]), "sac_episodes": len(baseline["episodes"])}


def local_dataset_digest(dataset_id: str | None) -> str | None:
    """The content digest of the run's dataset while it is in the local store: what a sweep carried on
    later compares, so that its runs do not mix data recorded under one name."""
    from cqlsac.datasets import dataset_content_digest, is_local

    return dataset_content_digest(dataset_id) if dataset_id is not None and is_local(dataset_id) else None


def summarize(pipe) -> dict:
    """Every figure of the run, as data; `report.md` and `cqlsac report` read it."""
    outputs, cfg = pipe.outputs, pipe.cfg
    evaluate, offline = outputs.get("evaluate", {}), outputs.get("offline", {})
    dataset, finetune, baseline = outputs.get("dataset", {}), outputs.get("finetune", {}), outputs.get("baseline", {})
    policy = pipe.run_dir / "policy.pt"
    return {
        "run_dir": str(pipe.run_dir),
        "env": cfg.env.id,
        "seed": cfg.seed,
        "policy": str(policy) if policy.is_file() else None,
        "final_eval_return": evaluate.get("mean_return"),
        "final_eval_episodes": len(evaluate["returns"]) if evaluate else None,
        "final_eval_sampled": cfg.evaluate.sample_actions,
        "final_normalized_score": evaluate.get("normalized_score"),
        "offline_eval_return": offline.get("eval_return"),
        "dataset_id": dataset.get("dataset_id"),
        "dataset_sha256": local_dataset_digest(dataset.get("dataset_id")),
        "dataset_mean_return": offline.get("dataset_mean_return"),
        "ref_min_score": dataset.get("ref_min_score"),
        "ref_max_score": dataset.get("ref_max_score"),
        "ref_max_score_from": dataset.get("ref_max_score_from"),
        **finetune_comparison(finetune.get("evals"), baseline.get("evals"),
                              outputs.get("pretrain", {}).get("random_return")),
        **episode_comparison(finetune, baseline, cfg.report.episode_return_level, cfg.report.episode_window),
        "final_lowest_window_mean": evaluate.get("lowest_window_mean"),
        "pretrain_episodes": len(outputs["pretrain"]["episodes"]) if "episodes" in outputs.get("pretrain", {}) else None,
        "finetune_evals": finetune.get("evals"),
        "baseline_evals": baseline.get("evals"),
        "eval_episodes": {"finetune": cfg.finetune.eval_episodes, "baseline": cfg.baseline.eval_episodes,
                          "offline": cfg.evaluate.episodes, "final": cfg.evaluate.episodes},
        "stage_seconds": dict(pipe.stage_seconds),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "stage_compute_seconds": {name: out.get("seconds") for name, out in outputs.items()},
        "stage_outputs": {name: str(pipe.stage_dir(name)) for name in outputs},
    }


def fmt(value, digits: int = 1) -> str:
    """A figure for people: rounded, `-` when missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def result_rows(summary: dict) -> list[tuple[str, str]]:
    """(quantity, value with its meaning) rows of the report's result table."""
    rows = []
    episodes = summary["eval_episodes"]
    if summary["final_eval_return"] is not None:
        acting = "with sampled actions" if summary.get("final_eval_sampled") else "deterministic"
        rows.append(("final return", f"**{fmt(summary['final_eval_return'])}**: the fine-tuned policy, {acting}, "
                                     f"mean of {summary['final_eval_episodes']} seeded episodes"))
    if summary["ref_max_score"] is not None:
        if summary["final_normalized_score"] is not None:
            rows.append(("normalised score", f"**{fmt(summary['final_normalized_score'])}** (0 = the random "
                                             f"policy's return {fmt(summary['ref_min_score'])}, 100 = the expert's "
                                             f"{fmt(summary['ref_max_score'])})"))
        rows.append(("expert of the normalisation", str(summary["ref_max_score_from"])))
    elif summary["dataset_id"] is not None:
        why = (summary["ref_max_score_from"] or "none (none stored)").removeprefix("none (").removesuffix(")")
        rows.append(("normalised score", f"not computed: the dataset has no reference scores ({why})"))
    if summary["offline_eval_return"] is not None:
        rows.append(("offline CQL policy", f"{fmt(summary['offline_eval_return'])} (mean of {episodes['offline']} "
                                           "episodes, before any online step)"))
    if summary["dataset_id"] is not None:
        rows.append(("dataset", f"`{summary['dataset_id']}`, behaviour mean return "
                                f"{fmt(summary['dataset_mean_return'])}"))
    if "sac_final_return" in summary:
        rows.append(("SAC from scratch", f"{fmt(summary['sac_final_return'])} after {summary['sac_frames']:,} "
                                         f"online steps (mean of {episodes['baseline']} episodes)"))
        for suffix, what in (("", "SAC's final return"), ("_near", "95% of the way from random to it")):
            if f"finetune_step_fraction{suffix}" not in summary:
                continue
            steps, fraction = summary[f"finetune_steps_to_sac_final{suffix}"], summary[f"finetune_step_fraction{suffix}"]
            if steps is None:
                value = "never within the fine-tuning budget"
            else:
                value = f"{steps:,} online steps, {fraction:.2f} of SAC's budget"
                if summary[f"finetune_step_fraction{suffix}_trivial"]:
                    value += " (trivial: the offline policy was there before any online step)"
            rows.append((f"fine-tuning reaches {what}", value))
    if "episode_ratio" in summary:
        level, window = summary["episode_return_level"], summary["episode_window"]
        for who, key, total in (("fine-tuning", "finetune_episodes_to_level", "finetune_episodes"),
                                ("SAC from scratch", "sac_episodes_to_level", "sac_episodes")):
            count = summary[key]
            rows.append((f"{who}: training episodes to {fmt(level)}",
                         (f"{count}" if count is not None else "never") + f" (mean of the last {window} training "
                         f"episodes; {summary[total]} episodes in its budget)"))
        if summary["episode_ratio"] is not None:
            rows.append(("episodes ratio, fine-tuning / SAC", f"{summary['episode_ratio']:.2f}"))
    if summary["final_lowest_window_mean"] is not None:
        rows.append(("lowest mean of 100 consecutive final episodes", fmt(summary["final_lowest_window_mean"])))
    return rows


def plot_curves(summary: dict, offline_curve: list | None, path: Path) -> None:
    """Return against online steps (fine-tuning vs SAC from scratch, with the dataset's and the
    offline policy's levels), and offline Q and CQL gap over updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_return, ax_q) = plt.subplots(1, 2, figsize=(11, 4))
    episodes = summary["eval_episodes"]
    for label, evals, n in (("offline-to-online CQL-SAC", summary["finetune_evals"], episodes["finetune"]),
                            ("SAC from scratch", summary["baseline_evals"], episodes["baseline"])):
        if evals:
            ax_return.plot(*zip(*evals), marker="o", label=f"{label} ({n} episodes a point)")
    for label, level, style in (("dataset (behaviour policy)", summary["dataset_mean_return"], ":"),
                                ("offline CQL policy", summary["offline_eval_return"], "--")):
        if level is not None:
            ax_return.axhline(level, linestyle=style, color="grey", label=label)
    ax_return.set(xlabel="online environment steps", ylabel="mean evaluation return (deterministic policy)",
                  title="Fine-tuning against SAC from scratch")
    if offline_curve:
        updates, q_data, cql_gap = zip(*offline_curve)
        ax_q.plot(updates, q_data, label="Q at the data actions")
        ax_q.plot(updates, cql_gap, label="CQL gap")
    ax_q.set(xlabel="offline updates", title="Offline Q-values and CQL gap")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Legends where there is something to name, then the PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, png.getvalue())  # a stop mid-write keeps the old figure


def markdown(summary: dict) -> str:
    lines = ["# cqlsac run report", "", f"{summary['env']}, seed {summary['seed']}. Run directory "
             f"`{summary['run_dir']}`; its resolved config is `config.yaml`.", "", "## Result", "",
             "| quantity | value |", "| --- | --- |"]
    lines += [f"| {quantity} | {value} |" for quantity, value in result_rows(summary)]
    lines += ["", "![learning curves](curves.png)", "",
              "Each point of the left panel is the mean return of the deterministic policy over the stated number "
              "of seeded evaluation episodes (the same starts for both curves).", "", "## Compute", "",
              "| stage | seconds | this run |", "| --- | --- | --- |"]
    for name, seconds in summary["stage_compute_seconds"].items():
        ran = "ran" if name in summary["stage_seconds"] else "reused from the cache"
        lines.append(f"| {name} | {fmt(seconds)} | {ran} |")
    lines += ["", "## Files", ""]
    if summary["policy"]:
        lines.append(f"- the fine-tuned policy: `{summary['policy']}`; `cqlsac eval {summary['run_dir']}` "
                     "evaluates it again")
    lines += [f"- stage `{name}`: `{folder}`" for name, folder in summary["stage_outputs"].items()]
    lines += ["- `summary.json`: every figure above, unrounded; `logs/`: the training curves", ""]
    return "\n".join(lines)


def write(pipe) -> dict:
    """Write summary, report and curves into the run directory; return the summary."""
    pipe.copy_final_policy()
    summary = summarize(pipe)
    atomic_json(pipe.run_dir / "summary.json", summary)
    plot_curves(summary, pipe.outputs.get("offline", {}).get("curve"), pipe.run_dir / "curves.png")
    atomic_write(pipe.run_dir / "report.md", markdown(summary))
    return summary

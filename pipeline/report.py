"""The end-of-run report: `summary.json`, `report.md` and PNG learning curves in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cqlsac.pipeline.checkpoints import atomic_write_text  # noqa: E402


def steps_to_reach(evals: list, level: float) -> int | None:
    """Online steps of the first evaluation whose return is at least `level` (None: never reached)."""
    return next((frames for frames, mean_return in evals if mean_return >= level), None)


def finetune_comparison(finetune: dict, random_return: float | None = None, near: float = 0.95) -> dict:
    """The seed's headline claim, from the evaluation curves: how soon fine-tuning reaches SAC's final return.

    `finetune_step_fraction` = online steps the offline-to-online agent needed to reach the final
    return of SAC from scratch, over SAC's whole budget; at most 0.5 means "in half the steps".
    When both agents end at the task's optimum, evaluation noise decides the strict comparison, so
    with the random policy's return known the same figure is also given for `near` (95%) of the
    way from random to SAC's final return.
    """
    evals, baseline = finetune.get("evals"), finetune.get("sac_baseline_evals")
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
    return out


def plot_curves(pipe, path: Path) -> None:
    """Return against environment steps (fine-tuning vs SAC from scratch), Q and CQL gap over updates."""
    fig, (ax_return, ax_q) = plt.subplots(1, 2, figsize=(11, 4))
    finetune = pipe.outputs.get("finetune", {})
    for label, evals in (("offline-to-online CQL-SAC", finetune.get("evals")),
                         ("SAC from scratch", finetune.get("sac_baseline_evals"))):
        if evals:
            ax_return.plot(*zip(*evals), marker="o", label=label)
    ax_return.set(xlabel="online environment steps", ylabel="mean evaluation return", title="Fine-tuning")
    curve = pipe.outputs.get("offline", {}).get("curve")
    if curve:
        updates, q_data, cql_gap = zip(*curve)
        ax_q.plot(updates, q_data, label="Q at the data actions")
        ax_q.plot(updates, cql_gap, label="CQL gap")
    ax_q.set(xlabel="offline updates", title="Offline Q-values and CQL gap")
    for ax in (ax_return, ax_q):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(pipe) -> dict:
    """Write summary, report and curves; return the summary."""
    run_dir = pipe.run_dir
    evaluate = pipe.outputs.get("evaluate", {})
    summary = {
        "run_dir": str(run_dir),
        "env": pipe.cfg.env.id,
        "seed": pipe.cfg.seed,
        "final_eval_return": evaluate.get("mean_return"),
        "final_normalized_score": evaluate.get("normalized_score"),
        "offline_eval_return": pipe.outputs.get("offline", {}).get("eval_return"),
        "dataset_id": pipe.outputs.get("offline", {}).get("dataset_id"),
        "dataset_mean_return": pipe.outputs.get("offline", {}).get("dataset_mean_return"),
        **finetune_comparison(pipe.outputs.get("finetune", {}), pipe.outputs.get("pretrain", {}).get("random_return")),
        "stage_seconds": pipe.stage_seconds,
        "stage_outputs": {name: str(pipe.stage_dir(name)) for name in pipe.outputs},
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    plot_curves(pipe, run_dir / "curves.png")
    lines = ["# cqlsac run report", "", f"Run directory: `{run_dir}`", "", "| quantity | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in summary.items() if key not in ("stage_outputs", "run_dir")]
    lines += ["", "![learning curves](curves.png)", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return summary

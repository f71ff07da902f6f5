"""The `cqlsac` command line: `run`, `config`, `eval`, `datasets`, `sweep` and `report`.

Heavy libraries (torch, torchrl, minari) are imported inside the commands that use them, so
`cqlsac --help` and `cqlsac config` answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cqlsac.components.errors import UserError
from cqlsac.pipeline.config import ConfigError, PipelineConfig, bundled_configs
from cqlsac.pipeline.datasets_cli import add_datasets_parser, positive_int, seed_int

DIVERGED = 3  # exit status of a run stopped by a NaN/Inf loss or Q-value
CONFIG_HELP = (f"a YAML config file, or the name of a bundled one ({', '.join(sorted(bundled_configs()))}); "
               "default: the built-in Pendulum-v1 pipeline")


def split_config(args: argparse.Namespace) -> None:
    """`cqlsac run key=value` without a config file: the first override was parsed as the config."""
    if args.config is not None and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None


def run_command(args: argparse.Namespace) -> int:
    """Run or resume the pipeline; the run directory is the last line printed.

    SIGINT/SIGTERM save a checkpoint and exit with 130/143; a diverged stage exits with 3.
    """
    from cqlsac.pipeline.pipeline import Pipeline
    from cqlsac.pipeline.supervision import DivergenceError, Interrupted, stop_on_signals

    if args.resume is not None:
        if args.config is not None or args.overrides:
            raise ConfigError("--resume takes no config or overrides: the run continues with its own config.yaml")
        pipe = Pipeline.resumed(args.resume)
    else:
        pipe = Pipeline.from_yaml(args.config, args.overrides)
    resume = f"resume with `cqlsac run --resume {pipe.run_dir}`"
    try:
        with stop_on_signals():
            summary = pipe.run()
    except Interrupted as stop:
        saved = f"checkpoint saved to {stop.checkpoint}" if stop.checkpoint else "finished stages are kept"
        print(f"cqlsac run: stopped by {stop}; {saved}; {resume}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"cqlsac run: interrupted; {resume} (from the last periodic checkpoint)", file=sys.stderr)
        return 130
    except DivergenceError as exc:
        print(f"cqlsac run: error: {exc}", file=sys.stderr)
        return DIVERGED
    print(json.dumps({k: summary[k] for k in ("final_eval_return", "final_normalized_score", "stage_seconds")}))
    print(f"report: {pipe.run_dir / 'report.md'}")
    print(pipe.run_dir)
    return 0


def config_command(args: argparse.Namespace) -> int:
    """Print the resolved config, each key with its documentation."""
    print(PipelineConfig.from_yaml(args.config, args.overrides).to_yaml(comments=True), end="")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate a policy checkpoint (or a run directory's fine-tuned policy) on its own env, deterministic
    unless `--sample-actions`."""
    from torchrl.envs.utils import ExplorationType

    from cqlsac.components.checkpoints import load_policy
    from cqlsac.components.evaluation import evaluate_policy
    from cqlsac.datasets import normalized, reference_scores_of

    target, dataset_id = Path(args.checkpoint), args.dataset
    if dataset_id is not None and not dataset_id.strip():
        raise ConfigError("--dataset is empty: name a dataset id (`cqlsac datasets list`), or leave it out")
    if target.is_dir():
        summary = target / "summary.json"
        if not summary.is_file():
            raise ConfigError(f"{target} is not a finished run directory (no summary.json); pass a policy "
                              "checkpoint or the folder that `cqlsac run` printed last")
        try:
            summary = json.loads(summary.read_text())
        except ValueError:
            summary = None
        if not isinstance(summary, dict) or not isinstance(summary.get("policy"), (str, type(None))):
            raise ConfigError(f"{target / 'summary.json'} is not a run summary cqlsac can read; pass the policy.pt "
                              "of the run instead")
        if not summary.get("policy"):
            raise ConfigError(f"run {target} has no fine-tuned policy (its stages stopped before finetune)")
        target, dataset_id = Path(summary["policy"]), dataset_id or summary.get("dataset_id")
    actor, meta = load_policy(target)
    exploration = ExplorationType.RANDOM if args.sample_actions else ExplorationType.DETERMINISTIC
    returns = evaluate_policy(actor, meta["env_id"], meta["env_kwargs"], args.episodes, args.seed, exploration)
    mean_return = sum(returns) / len(returns)
    result = {"policy": str(target), "env": meta["env_id"], "episodes": args.episodes,
              "sampled_actions": args.sample_actions, "mean_return": mean_return, "returns": returns}
    if dataset_id is not None:
        bounds = reference_scores_of(dataset_id)
        if bounds["ref_min_score"] is not None and bounds["ref_max_score"] is not None:
            result.update(dataset_id=dataset_id, **bounds,
                          normalized_score=normalized(mean_return, bounds["ref_min_score"], bounds["ref_max_score"]))
        else:
            print(f"cqlsac eval: dataset {dataset_id} has no reference scores, so no normalised score",
                  file=sys.stderr)
    print(json.dumps(result))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """Run a sweep; the sweep directory is the last line printed. Ctrl-C stops it (exit 130); run it
    again with --resume to carry on."""
    from cqlsac.pipeline.sweep import Sweep

    execution = {"workers": args.workers, "backend": args.backend, "address": args.address, "threads": args.threads,
                 "vectorise_offline": args.vectorise_offline}
    if args.resume is not None:
        if args.config is not None or args.assignments or args.spec is not None:
            raise ConfigError("--resume takes no config, values or --spec: the sweep continues with its own sweep.json")
        sweep = Sweep.resumed(args.resume, **execution)
    elif args.spec is not None:
        if args.config is not None or args.assignments:
            raise ConfigError("--spec takes no config or values on the command line: the file lists them")
        sweep = Sweep.from_yaml(args.spec, **execution)
    else:
        sweep = Sweep.from_args(args.config, args.seeds, args.assignments, **execution)
    try:
        record = sweep.run()
    except KeyboardInterrupt:
        print(f"cqlsac sweep: stopped; finished runs are kept; resume with `cqlsac sweep --resume {sweep.sweep_dir}`",
              file=sys.stderr)
        return 130
    failed = [run for run in record["runs"] if run["status"] != "finished"]
    print(f"report: {Path(sweep.sweep_dir) / 'report.md'}")
    print(sweep.sweep_dir)
    return 1 if failed else 0


def report_command(args: argparse.Namespace) -> int:
    """Regenerate the report of one or more sweeps from their directories (or, into a results page,
    from their records)."""
    from cqlsac.pipeline import sweep_report

    sweeps = [Path(d) for d in args.sweeps]
    if args.results is not None:  # first: it reads every record and checks the page before it writes anything
        sweep_report.write_results(sweeps, Path(args.results))
    for sweep in sweeps:
        if sweep.is_dir() or args.results is None:
            print(sweep_report.write(sweep))
    if args.results is not None:
        print(args.results)
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """A usage mistake is one line naming the command and where its usage is, with exit status 2, not
    argparse's usage block and then the error; every subcommand's parser is one of these too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="cqlsac", description="Offline-to-online RL with CQL-SAC on TorchRL: pretrain SAC, record a Minari "
                                   "dataset, train CQL-SAC offline, fine-tune online, evaluate.")
    commands = parser.add_subparsers(dest="command", metavar="{run,sweep,report,config,eval,datasets}")
    run = commands.add_parser(
        "run", help="run the pipeline (pretrain, dataset, offline, finetune, baseline, evaluate)",
        description="Run the pipeline, reusing finished stages from the cache. `cqlsac config` lists every key "
                    "that key=value can set.", epilog="example: cqlsac run lunarlander seed=3 finetune.frames=20000")
    run.add_argument("config", nargs="?", help=CONFIG_HELP)
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.mixing=annealed seed=3")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoints (finished stages are reused)")
    run.set_defaults(parser=run, handler=run_command)
    sweep = commands.add_parser(
        "sweep", help="run a pipeline over seeds and settings, with confidence intervals",
        description="Every combination of the listed values (key=v1,v2 makes an axis, key=v fixes a value) over "
                    "the seeds; each run is a normal pipeline run sharing the stage cache. The sweep directory "
                    "(sweep.json, runs/, report.md, curves.png) is the last line printed.",
        epilog="example: cqlsac sweep --seeds 0-9 finetune.mixing=fixed,annealed --workers 2")
    sweep.add_argument("config", nargs="?", help=CONFIG_HELP)
    sweep.add_argument("assignments", nargs="*", metavar="key=v[,v...]")
    sweep.add_argument("--seeds", default="0", help="seeds, e.g. 0-9 or 0,3,5 (default 0)")
    sweep.add_argument("--spec", metavar="YAML",
                       help="a sweep file with config, seeds, axes or settings, overrides, title and description")
    sweep.add_argument("--workers", type=positive_int, default=1, help="runs at once (default 1)")
    sweep.add_argument("--threads", type=positive_int, help="torch threads per run (default: the cores over the workers)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="worker processes here, or Ray tasks (pip install -e '.[ray]')")
    sweep.add_argument("--address", help="a Ray cluster's address (default: start a local Ray instance)")
    sweep.add_argument("--resume", metavar="SWEEP", help="carry on a stopped sweep: finished runs are kept; SWEEP is "
                       "its directory, or its record kept beside a results page (docs/records/NAME.json)")
    sweep.add_argument("--vectorise-offline", action="store_true",
                       help="first compute each setting's offline stages together, one vectorised update of all "
                            "its seeds' agents (their datasets must exist: e.g. dataset.name=ID)")
    sweep.set_defaults(parser=sweep, handler=sweep_command)
    report = commands.add_parser("report", help="regenerate the report of sweeps from their directories",
                                 description="Write report.md and curves.png of each sweep again from its sweep.json; "
                                             "with --results, also make or update a results page: a generated "
                                             "section per sweep, its record kept in records/ beside the page.")
    report.add_argument("sweeps", nargs="+", metavar="SWEEP",
                        help="a sweep directory, or with --results a record of one (records/NAME.json)")
    report.add_argument("--results", metavar="FILE", help="also make or update this results page (e.g. docs/results.md); "
                                                          "the other sweeps' sections on it are kept")
    report.set_defaults(parser=report, handler=report_command)
    config = commands.add_parser("config", help="print the resolved config with every key documented",
                                 description="Print the config that `cqlsac run` with the same arguments would run, "
                                             "each key with its documentation.")
    config.add_argument("config", nargs="?", help=CONFIG_HELP)
    config.add_argument("overrides", nargs="*", metavar="key=value")
    config.set_defaults(parser=config, handler=config_command)
    evaluate = commands.add_parser(
        "eval", help="evaluate a policy checkpoint or a run's fine-tuned policy",
        description="Mean return of the policy (deterministic unless --sample-actions) over seeded episodes "
                    "(episode i starts from env seed "
                    "SEED + i, as the pipeline evaluates), as one JSON line; with the run's dataset (or --dataset) "
                    "also the normalised score.")
    evaluate.add_argument("checkpoint", metavar="POLICY|RUN_DIR",
                          help="a policy.pt, or a run directory printed by `cqlsac run`")
    evaluate.add_argument("--episodes", type=positive_int, default=10, help="episodes (default 10)")
    evaluate.add_argument("--seed", type=seed_int, default=10_000, help="env seed of the first episode (default 10000)")
    evaluate.add_argument("--dataset", metavar="ID", help="normalise with this dataset's reference scores")
    evaluate.add_argument("--sample-actions", action="store_true",
                          help="sample actions from the policy, as evaluate.sample_actions does in a run")
    evaluate.set_defaults(parser=evaluate, handler=eval_command)
    add_datasets_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value given after an option (`cqlsac sweep smoke --seeds 0-9 a=1,2`) lands here: it is an override.
    target = {"run": "overrides", "config": "overrides", "sweep": "assignments"}.get(args.command)
    if extra and (target is None or any(item.startswith("-") or "=" not in item for item in extra)):
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")  # the command's usage
    if extra:
        getattr(args, target).extend(extra)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("run", "config"):
        split_config(args)
    if args.command == "sweep" and args.config is not None and "=" in args.config:
        args.assignments.insert(0, args.config)
        args.config = None
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"cqlsac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cqlsac config | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # Python flushes stdout again at exit
        return 0
    except OSError as exc:  # a file the command cannot read or write (a folder in its place, a full disk)
        path = exc.filename2 or exc.filename  # a rename's target, not the temp file renamed into it
        where = f"{path}: " if path else ""
        print(f"cqlsac {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `cqlsac` command line: `run`, `eval` and `datasets`."""

from __future__ import annotations

import argparse
import json
import sys

from cqlsac.pipeline.config import ConfigError
from cqlsac.pipeline.datasets_cli import USER_ERRORS, add_datasets_parser, positive_int


DIVERGED = 3  # exit status of a run stopped by a NaN/Inf loss or Q-value


def run_command(args: argparse.Namespace) -> int:
    """Run or resume the pipeline; the run directory is the last line printed.

    SIGINT/SIGTERM save a checkpoint and exit with 130/143; a diverged stage exits with 3.
    """
    from cqlsac.pipeline.pipeline import Pipeline
    from cqlsac.pipeline.training import DivergenceError, Interrupted, stop_on_signals

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
    print(pipe.run_dir)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate a policy checkpoint deterministically on its own env."""
    from cqlsac.pipeline.checkpoints import load_policy
    from cqlsac.pipeline.training import evaluate_policy

    actor, meta = load_policy(args.checkpoint)
    returns = evaluate_policy(actor, meta["env_id"], meta["env_kwargs"], args.episodes, args.seed)
    print(json.dumps({"env": meta["env_id"], "episodes": args.episodes,
                      "mean_return": sum(returns) / len(returns), "returns": returns}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cqlsac", description="Offline-to-online RL with CQL-SAC on TorchRL.")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the pipeline (pretrain, dataset, offline, finetune, evaluate)")
    run.add_argument("config", nargs="?", help="YAML config (default: the built-in Pendulum-v1 pipeline)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.mixing=annealed seed=3")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoints (finished stages are reused)")
    run.set_defaults(handler=run_command)
    evaluate = commands.add_parser("eval", help="evaluate a policy checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--episodes", type=positive_int, default=10)
    evaluate.add_argument("--seed", type=int, default=10_000)
    evaluate.set_defaults(handler=eval_command)
    add_datasets_parser(commands)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "run" and args.config is not None and "=" in args.config:
        args.overrides.insert(0, args.config)  # `cqlsac run key=value` without a config file
        args.config = None
    try:
        return args.handler(args)
    except (ConfigError, *USER_ERRORS) as exc:
        print(f"cqlsac {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

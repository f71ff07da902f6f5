"""`cqlsac datasets list | show ID | create ID ...`: the dataset commands of the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cqlsac.components.errors import UserError
from cqlsac.datasets.presets import PRESETS
from cqlsac.pipeline.config import seed_out_of_range


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"continuous": true}\'')
    return value


def positive_int(text: str) -> int:
    """An argparse type for counts (episodes, steps): zero or less would fail later, deep inside."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """An argparse type for env seeds, in the range a config's seeds take (gymnasium refuses negative ones)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if problem := seed_out_of_range(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def add_datasets_parser(subparsers) -> argparse.ArgumentParser:
    """Register `datasets` on the main parser's subparsers; its handler is `args.handler(args) -> int`."""
    parser = subparsers.add_parser("datasets", help="list, show and create offline datasets (Minari format)",
                                   description="Offline datasets in the local Minari store "
                                               "(MINARI_DATASETS_PATH, default ~/.minari/datasets).")
    commands = parser.add_subparsers(dest="datasets_command", required=True, metavar="{list,show,create}")
    listing = commands.add_parser("list", help="the datasets in the local Minari store")
    show = commands.add_parser("show", help="spaces, size, episodes, mean return and score bounds of a dataset")
    show.add_argument("dataset_id", metavar="ID")
    create = commands.add_parser("create", help="collect with a policy and write a Minari dataset",
                                 description="Collect steps with a SAC checkpoint or uniform random actions and "
                                             "write them as a Minari dataset (D4RL recipe with --preset).")
    create.add_argument("dataset_id", metavar="ID", help="e.g. pendulum/sac-medium-v0")
    create.add_argument("--env", help="gymnasium env id (default: the checkpoint's)")
    create.add_argument("--env-kwargs", type=_json_object, default=None, metavar="JSON",
                        help='gymnasium.make kwargs, e.g. \'{"continuous": true, "max_episode_steps": 500}\'')
    create.add_argument("--policy", action="append", default=[], metavar="CHECKPOINT|random",
                        help="behaviour policy; give two (medium, expert) for --preset medium-expert")
    create.add_argument("--steps", type=positive_int, help="number of environment steps to collect")
    create.add_argument("--preset", choices=PRESETS, help="D4RL dataset kind (random is implied by --policy random)")
    create.add_argument("--replay", type=Path, metavar="DIR",
                        help="medium-replay: a memory-mapped TensorDict of a run's transitions, in time order")
    reference = create.add_mutually_exclusive_group()
    reference.add_argument("--expert", metavar="CHECKPOINT", help="expert policy whose return is ref_max_score")
    reference.add_argument("--ref-max-score", type=float, metavar="VALUE", help="expert return, given directly")
    create.add_argument("--ref-episodes", type=positive_int, default=10, help="episodes per reference score (default 10)")
    create.add_argument("--seed", type=seed_int, default=0)
    create.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    parser.set_defaults(handler=run_datasets_command)
    for command in (listing, show, create):  # an unknown option shows the sub-command's own usage
        command.set_defaults(parser=command)
    return parser


def _list() -> None:
    from gymnasium.envs.registration import EnvSpec

    from cqlsac.datasets import datasets_root, list_local_datasets

    datasets = list_local_datasets()
    if not datasets:
        print(f"no datasets in {datasets_root()}; create one with "
              "`cqlsac datasets create ID --env ENV --policy CHECKPOINT|random --steps N`")
        return
    rows = [("ID", "ENV", "EPISODES", "STEPS", "KIND")]
    for dataset_id, meta in datasets.items():
        env = EnvSpec.from_json(meta["env_spec"]).id if meta.get("env_spec") else "-"
        made_here = meta.get("cqlsac")
        kind = (made_here.get("preset") or "custom") if made_here else meta.get("algorithm_name", "-")
        rows.append((dataset_id, env, str(meta["total_episodes"]), str(meta["total_steps"]), str(kind)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"datasets in {datasets_root()}:")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _show(dataset_id: str) -> None:
    from cqlsac.datasets import dataset_content_digest, load_transitions, normalized_score

    _, info = load_transitions(dataset_id)
    size = sum(p.stat().st_size for p in info.path.rglob("*") if p.is_file())
    extra = info.metadata.get("cqlsac") or {}
    env = "unknown" if info.env_spec is None else (
        f"{info.env_id} kwargs={info.env_spec.kwargs} max_episode_steps={info.env_spec.max_episode_steps}")
    mean_return = f"{info.mean_return:.3f}"
    bounds = "not set (create with --expert or --ref-max-score)"
    if info.ref_min_score is not None and info.ref_max_score is not None:
        mean_return += f" (normalised {normalized_score(info.mean_return, info):.1f})"
        bounds = f"{info.ref_min_score:.3f} (random) / {info.ref_max_score:.3f} (expert)"
        if "ref_max_score_from" in extra:
            bounds += f"; expert score from {extra['ref_max_score_from']}"
    lines = [
        ("id", info.dataset_id), ("path", str(info.path)), ("env", env),
        ("observation space", repr(info.observation_space)), ("action space", repr(info.action_space)),
        ("size", f"{size / 1e6:.2f} MB"), ("content sha256", dataset_content_digest(dataset_id)),
        ("episodes", str(info.num_episodes)),
        ("transitions", str(info.num_transitions)), ("mean return", mean_return),
        ("normalised 0 / 100", bounds), ("algorithm", str(info.metadata.get("algorithm_name", "-"))),
    ]
    if extra:
        lines += [("preset", str(extra.get("preset"))), ("seed", str(extra.get("seed")))]
        lines += [(f"source {i}", f"{s['policy']} (sha256 {s['sha256']}): {s['steps']} steps, mean return "
                                  + ("-" if s["mean_return"] is None else f"{s['mean_return']:.3f}"))
                  for i, s in enumerate(extra.get("sources", []))]
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")


def _create(args: argparse.Namespace) -> None:
    from tensordict import TensorDict

    from cqlsac.datasets import DatasetCreationError, create_dataset, write_replay_dataset

    expert = args.ref_max_score if args.ref_max_score is not None else args.expert
    if args.replay is not None or args.preset == "medium-replay":
        if args.replay is None or args.preset not in (None, "medium-replay") or args.policy or not args.env:
            raise DatasetCreationError("medium-replay takes --replay DIR and --env ENV, "
                                       "and no --policy or other preset")
        try:
            transitions = TensorDict.load_memmap(args.replay)
        except Exception as exc:  # tensordict raises several types for a missing or foreign folder
            raise DatasetCreationError(f"--replay {args.replay} is not a memory-mapped TensorDict "
                                       f"({type(exc).__name__}); save the run's transitions with "
                                       "td.memmap(DIR)") from None
        path = write_replay_dataset(args.dataset_id, transitions, args.env, args.env_kwargs, expert=expert,
                                    seed=args.seed, ref_episodes=args.ref_episodes, overwrite=args.overwrite)
    else:
        if not args.policy or args.steps is None:
            raise DatasetCreationError("create needs --policy CHECKPOINT|random and --steps N")
        path = create_dataset(args.dataset_id, args.policy, args.steps, env_id=args.env, env_kwargs=args.env_kwargs,
                              preset=args.preset, expert=expert, seed=args.seed, ref_episodes=args.ref_episodes,
                              overwrite=args.overwrite)
    print(f"wrote {args.dataset_id} to {path}")


def run_datasets_command(args: argparse.Namespace) -> int:
    """Run `datasets list|show|create`; a user mistake prints one line on stderr and returns 2."""
    try:
        if args.datasets_command == "list":
            _list()
        elif args.datasets_command == "show":
            _show(args.dataset_id)
        else:
            _create(args)
    except UserError as exc:
        print(f"cqlsac datasets {args.datasets_command}: error: {exc}", file=sys.stderr)
        return 2
    return 0

"""Where the fine-tuning drop comes from: updates from the offline agent, on one kind of data.

Loads the offline CQL agent of a finished run, collects `--frames` online frames with it (its
stochastic policy, as fine-tuning does), then makes `--updates` updates (SAC, i.e. CQL weight 0,
unless `--cql-weight`) on batches of those frames only (`--data online`) or of the offline
dataset only (`--data offline`), and prints the per-episode evaluation returns of the
deterministic policy along the way. `--critic-lr 0` freezes the critics (the offline critic then
guides the actor alone); `--actor-lr 0` checks that the evaluation itself is stable.

    python benchmarks/finetune_drop.py RUN_DIR [--data online|offline] [--cql-weight 0]
                                               [--actor-lr 3e-4] [--critic-lr 1e-3]

RUN_DIR is a directory printed by `cqlsac run` whose cache still holds its offline stage.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path

import torch

from cqlsac.components.replay import make_online_buffer
from cqlsac.components.update import make_optimizer, update_step
from cqlsac.pipeline.checkpoints import load_agent
from cqlsac.pipeline.config import ConfigError, PipelineConfig
from cqlsac.pipeline.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--frames", type=int, default=1000, help="online frames collected before the updates")
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--data", choices=("online", "offline"), default="online",
                        help="batches from the collected frames or from the run's offline dataset")
    parser.add_argument("--cql-weight", type=float, default=0.0, help="the CQL weight of the updates (0: SAC)")
    parser.add_argument("--actor-lr", type=float, default=None, help="default: finetune.optim.actor_lr")
    parser.add_argument("--critic-lr", type=float, default=None, help="default: finetune.optim.critic_lr")
    parser.add_argument("--report-at", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        pipe = Pipeline(PipelineConfig.from_yaml(args.run_dir / "config.yaml"), run_dir=args.run_dir)
    except (OSError, ConfigError) as exc:
        parser.error(f"{args.run_dir} is not a usable run directory: {exc}")
    cfg = pipe.cfg
    for name in pipe.plan(["offline"]):  # the offline stage and the ones it read, as `cqlsac run` reuses them
        outputs = pipe.finished_outputs(name)
        if outputs is None:
            parser.error(f"the {name} stage of {args.run_dir} has not finished: run its offline stage first")
        pipe.outputs[name] = outputs
    loss = pipe.new_agent(dataclasses.replace(cfg.offline.loss, cql_weight=args.cql_weight))
    load_agent(pipe.outputs["offline"]["agent"], loss)
    torch.manual_seed(args.seed)
    optim_cfg = cfg.finetune.optim
    optimizer = make_optimizer(loss, optim_cfg)
    for group, lr in zip(optimizer.param_groups[:2], (args.actor_lr, args.critic_lr)):
        if lr is not None:
            group["lr"] = lr

    buffer = make_online_buffer(args.frames)
    collector = pipe.collectors(loss.actor_network, min(args.frames, 200), args.frames, seed=cfg.seed + 1)(0)
    for data in collector:
        buffer.extend(data.reshape(-1).select(*loss.in_keys))
    collector.shutdown()

    def report(label: str) -> None:
        returns = pipe.evaluation_returns(loss.actor_network, cfg.evaluate.episodes)
        print(f"{label:>12}: mean {sum(returns) / len(returns):8.1f}  episodes {[round(r) for r in returns]}")

    sample = (pipe.offline_replay(cfg.finetune.batch_size)[0].sample if args.data == "offline"
              else partial(buffer.sample, cfg.finetune.batch_size))

    report("offline")
    for update in range(1, args.updates + 1):
        update_step(loss, optimizer, sample(), optim_cfg.tau)
        if update in args.report_at:
            report(f"{update} updates")


if __name__ == "__main__":
    main()

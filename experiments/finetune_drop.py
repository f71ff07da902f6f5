"""Where the fine-tuning drop comes from: updates from the offline agent, on one kind of data.

Loads the offline CQL agent of a finished run, collects `--frames` online frames with it (its
stochastic policy, as fine-tuning does), then makes `--updates` updates (SAC, i.e. CQL weight 0,
unless `--cql-weight`) on batches of those frames only (`--data online`) or of the offline
dataset only (`--data offline`), and prints the per-episode evaluation returns of the
deterministic policy along the way. `--critic-lr 0` freezes the critics (the offline critic then
guides the actor alone); `--actor-lr 0` checks that the evaluation itself is stable.

    python experiments/finetune_drop.py RUN_DIR [--data online|offline] [--cql-weight 0]
                                               [--actor-lr 3e-4] [--critic-lr 1e-3]

RUN_DIR is a directory printed by `cqlsac run` whose cache still holds its offline stage.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from cqlsac.components.checkpoints import load_agent
from cqlsac.components.replay import OnlineReplay
from cqlsac.pipeline import ConfigError, Pipeline


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
        pipe = Pipeline.resumed(args.run_dir)  # the run's own config; nothing is trained here
        ctx = pipe.context("finetune")  # the fine-tuning stage's wiring, from the run's finished stages
    except (OSError, ConfigError) as exc:
        parser.error(f"{args.run_dir} is not a usable run directory: {exc}")
    cfg = ctx.cfg
    optim = cfg.finetune.optim
    agent = ctx.agent(dataclasses.replace(cfg.offline.loss, cql_weight=args.cql_weight), optim)
    load_agent(ctx.inputs["offline"]["agent"], agent.loss)
    torch.manual_seed(args.seed)
    for group, rate in zip(agent.optimizer.param_groups[:2], (args.actor_lr, args.critic_lr)):
        if rate is not None:  # 0 freezes the actor or the critics
            group["lr"] = rate

    schedule = dataclasses.replace(cfg.finetune, frames=args.frames, frames_per_batch=min(args.frames, 200),
                                   init_random_frames=0, eval_every=min(args.frames, 200))
    online = OnlineReplay(args.frames, cfg.finetune.batch_size)
    collector = ctx.collector_after(agent.actor, schedule, ctx.seed + 1)(0)
    for batch in collector:
        online.add(batch.select(*agent.loss.in_keys))
    collector.shutdown()

    def report(label: str) -> None:
        returns = ctx.evaluation_returns(agent.actor, cfg.finetune.eval_episodes)
        print(f"{label:>12}: mean {sum(returns) / len(returns):8.1f}  episodes {[round(r) for r in returns]}")

    sample = ctx.offline_replay(cfg.finetune.batch_size)[0].sample if args.data == "offline" else online.sample

    report("offline")
    for update in range(1, args.updates + 1):
        agent.update(sample())
        if update in args.report_at:
            report(f"{update} updates")


if __name__ == "__main__":
    main()

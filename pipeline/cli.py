"""The `cqlsac` command line."""

from __future__ import annotations

import argparse
import sys


def demo(args: argparse.Namespace) -> int:
    """A few CQL-SAC updates on random Pendulum-v1 data: shows the components fit together."""
    import torch

    from cqlsac.components.cql_loss import CQLSACLoss, LossConfig
    from cqlsac.components.envs import make_env
    from cqlsac.components.networks import NetworkConfig, make_actor, make_critics
    from cqlsac.components.update import OptimConfig, make_optimizer, update_step

    torch.manual_seed(args.seed)
    env = make_env("Pendulum-v1", seed=args.seed)
    net = NetworkConfig()
    actor = make_actor(env.observation_spec["observation"], env.action_spec, net)
    critic = make_critics(env.observation_spec["observation"], env.action_spec, net)
    loss = CQLSACLoss(actor, critic, LossConfig())
    optimizer = make_optimizer(loss, OptimConfig())
    with torch.no_grad():
        batch = env.rollout(256, break_when_any_done=False)
    for step in range(args.updates):
        out = update_step(loss, optimizer, batch, tau=0.005)
        print(f"update {step}: " + ", ".join(f"{k}={v.item():.3f}" for k, v in out.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cqlsac", description="Offline-to-online RL with CQL-SAC on TorchRL.")
    commands = parser.add_subparsers(dest="command")
    demo_parser = commands.add_parser("demo", help="run a few CQL-SAC updates on random Pendulum data")
    demo_parser.add_argument("--updates", type=int, default=5)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(handler=demo)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

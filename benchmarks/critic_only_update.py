"""Speed of the critic-only updates of wsrl and rlpd: the loss skipping the actor's part against
computing every loss and dropping the actor's.

Run from the repository root:
    python benchmarks/critic_only_update.py [--hidden 128 --obs-dim 8 --act-dim 2] [--critics 10]

wsrl and rlpd fine-tune with `finetune.utd_ratio=4` and `finetune.optim.actor_every=4`: three of
every four updates move the critics only. Such an update needs no action of the policy at s and no
critic values there, which take one of the three critic-ensemble calls of a SAC-mode update. Timed
here, interleaved on the same synthetic batches, at the recipes' online settings (SAC mode, layer-
normalised critics, target the min over a random 2, no entropy in the target; LunarLander-v3
continuous sizes by default):
    full        `update_step(..., update_actor=True)`: actor, temperature and critics;
    skipped     `update_step(..., update_actor=False)`: the loss computes the critics' part only;
    dropped     every loss computed, the critics' loss alone back-propagated (what a critic-only
                update cost before the loss could skip the actor's part).
All three draw the same noise, and skipped and dropped step the same parameters by the same amounts
(tests/test_update.py). The last two lines are for scripts:
    critic_only_speedup: X        (skipped / dropped, updates/s)
    actor_every_speedup: Y        (a cycle of actor_every updates, one full, the others critic-only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchrl.data import Bounded, Unbounded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cql_update import interleaved_rates, load_note, make_sync, synthetic_buffer, usable_cores  # noqa: E402

from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig  # noqa: E402
from cqlsac.components.cql_loss import CQLSACLoss  # noqa: E402
from cqlsac.components.networks import make_actor, make_critics  # noqa: E402
from cqlsac.components.update import make_optimizer, polyak_update, update_step  # noqa: E402

TAU = 0.005


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers of actor and critics")
    p.add_argument("--obs-dim", type=int, default=8)
    p.add_argument("--act-dim", type=int, default=2)
    p.add_argument("--critics", type=int, default=10)
    p.add_argument("--actor-every", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0, help="time for all three measurements together")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--buffer-size", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the cores this process may use")
    p.add_argument("--compile", action="store_true", help="the loss through torch.compile (compile=true)")
    return p.parse_args(argv)


def make_loss(args) -> CQLSACLoss:
    obs_spec = Unbounded(shape=(args.obs_dim,))
    act_spec = Bounded(low=-torch.ones(args.act_dim), high=torch.ones(args.act_dim), shape=(args.act_dim,))
    net = NetworkConfig(actor_hidden=(args.hidden,) * 2, critic_hidden=(args.hidden,) * 2,
                        critic_layer_norm=True, num_critics=args.critics)
    cfg = LossConfig(cql_weight=0.0, target_subset=min(2, args.critics), backup_entropy=False)
    return CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net), cfg,
                      compile=args.compile)


def dropped_actor_step(loss: CQLSACLoss, optimizer: torch.optim.Optimizer, batch) -> None:
    """A critic-only update as it was before: every loss computed, the critics' alone back-propagated."""
    critic_loss = loss(batch)["loss_qvalue"]
    optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    optimizer.step()
    polyak_update(loss.target_critic, loss.critic, TAU)


def main(argv=None) -> None:
    args = parse_args(argv)
    cores = usable_cores()
    torch.set_num_threads(args.threads or cores)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} of {cores} cores | batch {args.batch}, "
          f"hidden {args.hidden}x2, obs {args.obs_dim}, act {args.act_dim}, {args.critics} layer-normalised critics, "
          f"SAC mode{', compiled' if args.compile else ''} | {load_note(cores)}")
    rb = synthetic_buffer(args)
    batches = [rb.sample() for _ in range(64)]
    loss = make_loss(args)
    optimizer = make_optimizer(loss, OptimConfig(tau=TAU))

    def full(i):
        update_step(loss, optimizer, batches[i % len(batches)], TAU, update_actor=True)

    def skipped(i):
        update_step(loss, optimizer, batches[i % len(batches)], TAU, update_actor=False)

    def dropped(i):
        dropped_actor_step(loss, optimizer, batches[i % len(batches)])

    rates = interleaved_rates({"full": full, "skipped": skipped, "dropped": dropped}, args.seconds, args.warmup,
                              make_sync(torch.device("cpu")))
    per_s = {name: rate.per_s for name, rate in rates.items()}
    for name, value in per_s.items():
        print(f"{name:>8}: {value:8.1f} updates/s")
    k = args.actor_every

    def cycle_seconds(critic_only: str) -> float:
        return 1 / per_s["full"] + (k - 1) / per_s[critic_only]

    print(f"({load_note(cores)})")
    print(f"critic_only_speedup: {per_s['skipped'] / per_s['dropped']:.3f}")
    print(f"actor_every_speedup: {cycle_seconds('dropped') / cycle_seconds('skipped'):.3f}")


if __name__ == "__main__":
    main()

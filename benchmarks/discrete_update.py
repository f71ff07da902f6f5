"""Speed of one CQL-SAC update with discrete actions, at the seed's sizes: ours, torchrl's and the seed's way.

Run from the repository root:
    python benchmarks/discrete_update.py [--quick] [--threads 1] [--no-compile]

The seed (TobyLeelsz/offline-online-combine-training, LunarLander) trains discrete CQL-SAC with
8 -> 256 -> 256 -> 4 ReLU networks: a softmax actor and twin critics giving Q(s, .) of all 4
actions, Adam 5e-4 on everything, tau 0.01, batch 256, the critics' gradient norms clipped at 1,
target entropy -4 and CQL weight 1. configs/lunarlander-discrete.yaml trains with the same
settings, so this is the update that run spends its time in. Timed in interleaved rounds in one
process on the same batches (a slow spell of a shared machine hits all alike):

- ours: `make_agent` on a `Categorical(4)` action spec, `Agent.update` (losses, one backward,
  per-critic clipping, fused Adam, Polyak), eager and with `compile=True` (the first update
  compiles; its seconds are reported apart);
- torchrl `DiscreteSACLoss`: a categorical actor and one Q(s, .) network that the loss doubles
  (vmap over stacked parameters), l2 TD loss, target entropy -4, `SoftUpdate(tau=0.01)`, one Adam,
  one backward of the summed losses, `clip_grad_norm_(1)` on the critics' parameters. It has no
  CQL term, and its clip bounds the two critics' joint norm (their parameters are stacked), not
  each one's;
- torchrl `DiscreteCQLLoss`: a DQN-style loss: one Q network (`QValueActor`), the target max_a of
  the target network, logsumexp - Q(s, a_data); no actor, no temperature, one critic; the same
  optimiser, soft update and clipping. It does less work than an actor-critic update;
- the seed's way, plain PyTorch written here from its description: separate actor, critic1,
  critic2 and target critics as `nn.Sequential`, one Adam per network and one for log alpha; the
  actor step (the critics evaluated with gradients, as the seed does, so its backward also runs
  through them), the alpha step, then each critic's step (0.5 MSE + logsumexp(q).mean() - q.mean(),
  backward, `clip_grad_norm_(1)`, Adam), and the soft update by a Python loop over parameters.

The last two lines are for scripts:
    speedup_vs_seed_style: X      (our updates/s, the faster of eager and compiled / the seed's way)
    speedup_vs_torchrl: Y         (the same / the faster of the two torchrl losses)
"""

from __future__ import annotations

import argparse
import copy
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from cql_update import cpu_model, interleaved_rates, load_note, usable_cores
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn.utils import clip_grad_norm_
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.modules import MLP, ProbabilisticActor, QValueActor
from torchrl.objectives import DiscreteCQLLoss, DiscreteSACLoss, SoftUpdate

from cqlsac.components.allocator import keep_freed_memory
from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.update import Agent, make_agent

OBS_DIM, NUM_ACTIONS, HIDDEN, BATCH = 8, 4, 256, 256
GAMMA, TAU, LR, CLIP, TARGET_ENTROPY, CQL_WEIGHT = 0.99, 0.01, 5e-4, 1.0, -4.0, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="time per updates/s measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed updates of each implementation before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the cores this process may use")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our update with compile=True (the first update compiles, tens of seconds)")
    p.add_argument("--quick", action="store_true", help="short measurements (at most 2 s each)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 2.0), min(args.warmup, 2)
    return args


def synthetic_batches(count: int) -> list[TensorDict]:
    """`count` batches of random transitions in TorchRL layout; integer actions, ~1% terminal steps."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        terminated = torch.rand(BATCH, 1, generator=g) < 0.01
        batches.append(TensorDict({
            "observation": torch.randn(BATCH, OBS_DIM, generator=g),
            "action": torch.randint(NUM_ACTIONS, (BATCH,), generator=g),
            "next": {
                "observation": torch.randn(BATCH, OBS_DIM, generator=g),
                "reward": torch.randn(BATCH, 1, generator=g),
                "done": terminated.clone(),
                "terminated": terminated,
                "truncated": torch.zeros_like(terminated),
            },
        }, batch_size=[BATCH]))
    return batches


def mlp(out_features: int) -> MLP:
    return MLP(in_features=OBS_DIM, out_features=out_features, num_cells=[HIDDEN] * 2, activation_class=nn.ReLU)


# --- ours -------------------------------------------------------------------------------------
def make_ours(compile: bool) -> Agent:
    specs = SimpleNamespace(observation_spec=Composite(observation=Unbounded(shape=(OBS_DIM,))),
                            action_spec=Categorical(NUM_ACTIONS))
    net = NetworkConfig(actor_hidden=(HIDDEN,) * 2, critic_hidden=(HIDDEN,) * 2)
    loss = LossConfig(gamma=GAMMA, cql_weight=CQL_WEIGHT, target_entropy=TARGET_ENTROPY)
    optim = OptimConfig(actor_lr=LR, critic_lr=LR, alpha_lr=LR, tau=TAU, critic_grad_clip=CLIP)
    return make_agent(specs, net, loss, optim, compile=compile)


# --- torchrl ----------------------------------------------------------------------------------
def make_torchrl_sac():
    spec = Categorical(NUM_ACTIONS)
    actor = ProbabilisticActor(TensorDictModule(mlp(NUM_ACTIONS), in_keys=["observation"], out_keys=["logits"]),
                               in_keys=["logits"], spec=spec, distribution_class=torch.distributions.Categorical)
    qvalue = TensorDictModule(mlp(NUM_ACTIONS), in_keys=["observation"], out_keys=["action_value"])
    loss = DiscreteSACLoss(actor, qvalue, action_space=spec, num_actions=NUM_ACTIONS, num_qvalue_nets=2,
                           loss_function="l2", target_entropy=TARGET_ENTROPY)
    loss.make_value_estimator(gamma=GAMMA)
    critic_params = list(loss.qvalue_network_params.flatten_keys().values())
    return loss, critic_params


def make_torchrl_cql():
    value = QValueActor(mlp(NUM_ACTIONS), in_keys=["observation"], spec=Categorical(NUM_ACTIONS))
    loss = DiscreteCQLLoss(value, loss_function="l2", delay_value=True, action_space="categorical")
    loss.make_value_estimator(gamma=GAMMA)
    return loss, list(loss.value_network_params.flatten_keys().values())


def torchrl_step(make):
    """(fn(batch) doing one update of the torchrl loss `make` builds: sum, backward, clip, Adam, SoftUpdate)."""
    loss, critic_params = make()
    updater = SoftUpdate(loss, tau=TAU)
    optimizer = torch.optim.Adam(loss.parameters(), lr=LR)

    def step(batch):
        # A shallow copy, as a replay buffer's fresh sample would be: the losses write their TD errors (and
        # DiscreteCQLLoss its Q-values, in place once present) into their input, which a second use breaks.
        vals = loss(batch.clone(False))
        total = sum(value for key, value in vals.items() if key.startswith("loss_"))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        clip_grad_norm_(critic_params, CLIP)
        optimizer.step()
        updater.step()

    return step


# --- the seed's way ---------------------------------------------------------------------------
def sequential(*final) -> nn.Sequential:
    return nn.Sequential(nn.Linear(OBS_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, NUM_ACTIONS), *final)


class SeedStyle:
    """Discrete CQL-SAC as the seed's agent updates it: a network, an optimiser and a step each."""

    def __init__(self):
        self.actor = sequential(nn.Softmax(dim=-1))
        self.critics = [sequential(), sequential()]
        self.targets = [copy.deepcopy(c) for c in self.critics]
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.alpha = self.log_alpha.exp().detach()
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=LR)
        self.critic_opts = [torch.optim.Adam(c.parameters(), lr=LR) for c in self.critics]
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=LR)

    def policy(self, obs):
        """Probabilities, their logs (zeros nudged to 1e-8) and a sampled action, as the seed's actor gives them."""
        probs = self.actor(obs)
        action = torch.distributions.Categorical(probs).sample()
        log_probs = torch.log(probs + (probs == 0.0).float() * 1e-8)
        return action, probs, log_probs

    def update(self, obs, action, reward, next_obs, done):
        # Actor, with the current critics (evaluated with gradients: the seed's backward runs through them too).
        _, probs, log_probs = self.policy(obs)
        min_q = torch.min(self.critics[0](obs), self.critics[1](obs))
        actor_loss = (probs * (self.alpha * log_probs - min_q)).sum(1).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        # Temperature.
        entropy_term = (log_probs * probs).sum(1)
        alpha_loss = -(self.log_alpha.exp() * (entropy_term + TARGET_ENTROPY).detach()).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        self.alpha = self.log_alpha.exp().detach()
        # Critics: soft target with the updated actor and alpha, then each critic's own step.
        with torch.no_grad():
            _, next_probs, next_log_probs = self.policy(next_obs)
            next_q = torch.min(self.targets[0](next_obs), self.targets[1](next_obs))
            next_value = (next_probs * (next_q - self.alpha * next_log_probs)).sum(1, keepdim=True)
            target = reward + GAMMA * (1 - done) * next_value
        qs = [critic(obs) for critic in self.critics]
        losses = [0.5 * F.mse_loss(q.gather(1, action), target) + torch.logsumexp(q, dim=1).mean() - q.mean()
                  for q in qs]
        for i, (critic, opt, loss) in enumerate(zip(self.critics, self.critic_opts, losses)):
            opt.zero_grad()
            loss.backward(retain_graph=i == 0)
            clip_grad_norm_(critic.parameters(), CLIP)
            opt.step()
        # Soft update, parameter by parameter.
        for critic, target_net in zip(self.critics, self.targets):
            for target_param, param in zip(target_net.parameters(), critic.parameters()):
                target_param.data.copy_(TAU * param.data + (1.0 - TAU) * target_param.data)


def seed_inputs(batch: TensorDict):
    """The seed's tensors: actions `[B, 1]` (long), done as a float `[B, 1]`."""
    return (batch["observation"], batch["action"].unsqueeze(-1), batch["next", "reward"], batch["next", "observation"],
            batch["next", "terminated"].float())


# --- the run -----------------------------------------------------------------------------------
def compiled_ours(pool):
    agent = make_ours(compile=True)
    t0 = time.perf_counter()
    agent.update(pool[0])  # compiles the loss's forward and backward
    return agent, time.perf_counter() - t0


def row(name, value, unit=""):
    print(f"| {name:<64} | {value:>9} | {unit:<9} |")


def main(argv=None):
    args = parse_args(argv)
    cores = usable_cores()
    torch.set_num_threads(args.threads or cores)
    torch.manual_seed(0)
    keep_freed_memory()
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} of {cores} cores | CPU {cpu_model()}")
    print(f"obs {OBS_DIM}, {NUM_ACTIONS} actions, {HIDDEN}x{HIDDEN} ReLU, batch {BATCH}, twin critics, lr {LR:g}, "
          f"tau {TAU:g}, critic clip {CLIP:g}, target entropy {TARGET_ENTROPY:g}, CQL weight {CQL_WEIGHT:g}; "
          f"{args.seconds:g} s per measurement, warmup {args.warmup}" + (" (quick)" if args.quick else ""))
    print(load_note(cores))

    pool = synthetic_batches(32)
    seed_pool = [seed_inputs(b) for b in pool]
    ours = make_ours(compile=False)
    seed = SeedStyle()
    trl_sac, trl_cql = torchrl_step(make_torchrl_sac), torchrl_step(make_torchrl_cql)
    fns = {
        "ours": lambda k: ours.update(pool[k % len(pool)]),
        "torchrl_sac": lambda k: trl_sac(pool[k % len(pool)]),
        "torchrl_cql": lambda k: trl_cql(pool[k % len(pool)]),
        "seed_style": lambda k: seed.update(*seed_pool[k % len(pool)]),
    }
    compile_seconds = None
    if args.compile:
        compiled, compile_seconds = compiled_ours(pool)
        fns["ours_compiled"] = lambda k: compiled.update(pool[k % len(pool)])
    t_run = time.perf_counter()
    rates = {name: rate.per_s for name, rate in
             interleaved_rates(fns, args.seconds * len(fns), args.warmup, lambda: None).items()}

    best_ours = max(rates["ours"], rates.get("ours_compiled", 0.0))
    best_torchrl = max(rates["torchrl_sac"], rates["torchrl_cql"])
    print()
    print(f"| {'measurement':<64} | {'value':>9} | {'unit':<9} |")
    print(f"|{'-' * 66}|{'-' * 11}|{'-' * 11}|")
    row("ours eager (Agent.update: losses, backward, clip, Adam, Polyak)", f"{rates['ours']:.1f}", "updates/s")
    if compile_seconds is not None:
        row("ours compile=True", f"{rates['ours_compiled']:.1f}", "updates/s")
        row("   compile time (first update)", f"{compile_seconds:.1f}", "s")
        row("   compiled / eager", f"{rates['ours_compiled'] / rates['ours']:.2f}", "x")
    row("torchrl DiscreteSACLoss (no CQL term)", f"{rates['torchrl_sac']:.1f}", "updates/s")
    row("torchrl DiscreteCQLLoss (DQN-style: one critic, no actor)", f"{rates['torchrl_cql']:.1f}", "updates/s")
    row("seed's way, plain PyTorch", f"{rates['seed_style']:.1f}", "updates/s")
    which = ("compiled" if best_ours == rates.get("ours_compiled") else "eager") + (", the faster" if args.compile else "")
    row(f"ours ({which}) / torchrl DiscreteSACLoss", f"{best_ours / rates['torchrl_sac']:.2f}", "x")
    row(f"ours ({which}) / torchrl DiscreteCQLLoss", f"{best_ours / rates['torchrl_cql']:.2f}", "x")
    row(f"ours ({which}) / the seed's way", f"{best_ours / rates['seed_style']:.2f}", "x")
    print("\nWhat differs (see the docstring): DiscreteSACLoss has no CQL term and clips the two critics' joint "
          "gradient norm; DiscreteCQLLoss is a DQN-style loss without an actor or temperature, with one critic and a "
          "max-Q target; the seed's way takes 0.5 MSE and subtracts the mean of Q over batch and actions, not Q(s, a_data).")
    print(f"(total run time {time.perf_counter() - t_run:.0f} s; {load_note(cores)})")
    print(f"speedup_vs_seed_style: {best_ours / rates['seed_style']:.3f}")
    print(f"speedup_vs_torchrl: {best_ours / best_torchrl:.3f}")


if __name__ == "__main__":
    main()

"""K seeds in one update: K CQL-SAC agents with stacked parameters, one vectorised update, against the
same K agents updated one after another.

The vectorised step is `torch.func.vmap` over one functional update of the project's own loss
(`CQLSACLoss.compute` through `torch.func.functional_call` and `torch.func.grad`), followed by Adam
and the Polyak update written as functions of the stacked tensors; optionally compiled. Each agent
keeps its own batch and its own noise, so the K updates are those of K separate runs. The script
first checks that: after a few steps every agent's parameters equal those of its separate run
(printed: the largest difference), then times

- one agent's `update_step` (eager), the figure the issue's target is relative to;
- the K agents one after another (eager);
- the vectorised step, eager and compiled.

    python benchmarks/multi_seed_update.py [--seeds 8] [--hidden 64] [--threads 2] [--seconds 5]

It ends with `vectorised_over_one_seed: X` (the time of one vectorised step of K agents over one
agent's update) and `speedup_over_sequential: Y`. The project does not train K seeds this way: see
docs/performance.md for why.
"""

from __future__ import annotations

import argparse
import time

import torch
from cql_update import cpu_model, load_note, usable_cores
from tensordict import TensorDict
from torch import nn
from torch.func import functional_call, grad, vmap

from cqlsac.components.allocator import keep_freed_memory
from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.envs import make_env
from cqlsac.components.update import make_agent, make_optimizer

BETAS, EPS = (0.9, 0.999), 1e-8


class Compute(nn.Module):
    """The loss's `compute` as a module's forward, for `functional_call` (a plain module, whose
    `named_parameters` torch's functional tools can read)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, batch, noise):
        return self.loss.compute(batch, noise)


def make_batch(n: int, generator: torch.Generator) -> TensorDict:
    return TensorDict({"observation": torch.randn(n, 3, generator=generator),
                       "action": torch.rand(n, 1, generator=generator) * 4 - 2,
                       "next": {"observation": torch.randn(n, 3, generator=generator),
                                "reward": torch.randn(n, 1, generator=generator),
                                "done": torch.zeros(n, 1, dtype=torch.bool),
                                "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, [n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="K agents")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per timing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    k, b = args.seeds, args.batch
    env = make_env("Pendulum-v1")
    network = NetworkConfig(actor_hidden=(args.hidden,) * 2, critic_hidden=(args.hidden,) * 2, critic_layer_norm=True)
    optim = OptimConfig(actor_lr=3e-4, critic_lr=1e-3, alpha_lr=1e-3)
    agents = []
    for seed in range(k):  # as K separate runs would initialise them
        torch.manual_seed(seed)
        agent = make_agent(env, network, LossConfig(), optim)
        agent.loss.to(args.device)
        agent.optimizer = make_optimizer(agent.loss, optim)  # over the moved parameters
        agents.append(agent)
    template = Compute(agents[0].loss)
    rates = {id(p): group["lr"] for group in agents[0].optimizer.param_groups for p in group["params"]}
    trainable = {name: rates[id(p)] for name, p in template.named_parameters() if id(p) in rates}

    tensors = [{**dict(Compute(a.loss).named_parameters()), **dict(Compute(a.loss).named_buffers())} for a in agents]
    stacked = {name: torch.stack([t[name].detach() for t in tensors]) for name in tensors[0]}
    params = {n: v for n, v in stacked.items() if n in trainable}
    rest = {n: v for n, v in stacked.items() if n not in trainable}
    moments = {n: torch.zeros_like(p) for n, p in params.items()}
    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    targets = [n for n in rest if n.startswith("loss.target_critic.")]
    online = {n: n.replace("loss.target_critic.", "loss.critic_network.module.") for n in targets}

    def total_loss(params, rest, batch, noise):
        out = functional_call(template, {**rest, **params}, (batch, noise))
        return sum(v for key, v in out.items() if key.startswith("loss_"))

    def step(params, rest, moments, squares, count, batch, noise):
        grads = grad(total_loss)(params, rest, batch, noise)
        count = count + 1
        new_params, new_moments, new_squares = {}, {}, {}
        for name, p in params.items():  # Adam, as torch.optim.Adam computes it
            m = moments[name] * BETAS[0] + grads[name] * (1 - BETAS[0])
            v = squares[name] * BETAS[1] + grads[name] * grads[name] * (1 - BETAS[1])
            denom = v.sqrt() / (1 - BETAS[1] ** count).sqrt() + EPS
            new_params[name] = p - trainable[name] / (1 - BETAS[0] ** count) * m / denom
            new_moments[name], new_squares[name] = m, v
        new_rest = dict(rest)
        for name in targets:  # Polyak
            new_rest[name] = rest[name].lerp(new_params[online[name]], optim.tau)
        new_rest["loss.update_count"] = rest["loss.update_count"] + 1
        return new_params, new_rest, new_moments, new_squares

    vectorised = vmap(step, in_dims=(0, 0, 0, 0, None, 0, 0))
    generator = torch.Generator().manual_seed(0)
    pool = [[make_batch(b, generator).to(args.device) for _ in range(k)] for _ in range(4)]
    noises = [[agents[0].loss.draw_noise(b, args.device) for _ in range(k)] for _ in range(4)]

    def stack_round(r: int):
        batch = torch.stack(pool[r])
        noise = {key: torch.stack([n[key] for n in noises[r]]) for key in noises[r][0]}
        return batch, noise

    # Correctness: three vectorised steps against three update_steps of each agent on the same data.
    state = (params, rest, moments, squares)
    for r in range(3):
        batch, noise = stack_round(r)
        state = vectorised(*state, torch.tensor(float(r), device=args.device), batch, noise)
        for agent, one, one_noise in zip(agents, pool[r], noises[r]):
            losses = agent.loss.compute(one, one_noise)
            agent.optimizer.zero_grad(set_to_none=True)
            sum(v for key, v in losses.items() if key.startswith("loss_")).backward()
            agent.optimizer.step()
            torch._foreach_lerp_(list(agent.loss.target_critic.parameters()), list(agent.loss.critic.parameters()), optim.tau)
    differences = [(state[0][name][i] - p).abs().max().item() for i, agent in enumerate(agents)
                   for name, p in Compute(agent.loss).named_parameters() if name in trainable]
    print(f"K={k} agents, hidden {args.hidden}, batch {b}, {args.threads} threads: after 3 steps the largest "
          f"difference from the separate runs' parameters is {max(differences):.2e}")

    def timed(fn) -> float:
        fn(0)
        sync()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            fn(calls)
            calls += 1
        sync()
        return (time.perf_counter() - start) / calls

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rounds = [stack_round(r) for r in range(4)]
    one = timed(lambda c: agents[0].update(pool[c % 4][0]))
    sequential = timed(lambda c: [agent.update(pool[c % 4][i]) for i, agent in enumerate(agents)])
    count = torch.tensor(1.0, device=args.device)
    eager = timed(lambda c: vectorised(params, rest, moments, squares, count, *rounds[c % 4]))
    compiled_step = torch.compile(vectorised)
    start = time.perf_counter()
    compiled_step(params, rest, moments, squares, count, *rounds[0])
    compile_seconds = time.perf_counter() - start
    compiled = timed(lambda c: compiled_step(params, rest, moments, squares, count, *rounds[c % 4]))
    best = min(eager, compiled)
    print("| update | ms | over one seed's update |")
    print("| --- | --- | --- |")
    for label, seconds in (("one seed, update_step", one), (f"{k} seeds one after another", sequential),
                           (f"{k} seeds vectorised, eager", eager),
                           (f"{k} seeds vectorised, compiled ({compile_seconds:.0f} s to compile)", compiled)):
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / one:.2f} |")
    cores = usable_cores()
    print(f"torch {torch.__version__} | CPU {cpu_model()} | {load_note(cores)}")
    print(f"vectorised_over_one_seed: {best / one:.3f}")
    print(f"speedup_over_sequential: {sequential / best:.3f}")


if __name__ == "__main__":
    main()

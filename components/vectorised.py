"""K agents of one architecture updated by one vectorised step: the K-seed form of `update_step`.

The agents' tensors are stacked along a new leading dim, and one function of them does what
`update_step` does to each agent: the losses of `CQLSACLoss.compute` (through
`torch.func.functional_call`), their gradient (`torch.func.grad`), Adam as `torch.optim.Adam`
computes it, and the Polyak update of the target critics; `torch.func.vmap` runs it for all K at
once and `torch.compile` fuses it. Each agent keeps its own batch and noise, so with the same data
its numbers are those of its own run, up to float rounding (tested).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import nn
from torch.func import functional_call, grad, vmap

from cqlsac.components.update import Agent


class _Compute(nn.Module):
    """The loss's `compute` as a plain module's forward, for `functional_call`."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, batch, noise):
        return self.loss.compute(batch, noise)


class VectorisedAgents:
    """The K `agents` (same architecture, loss and optimiser settings, `actor_every = 1`) as stacked
    tensors, updated together by `update`; `write_back` returns the state to the agents' modules and
    optimisers. The agents' critics take the batched-matmul path (no oneDNN kernel under vmap)."""

    def __init__(self, agents: list[Agent], compile: bool = True):
        first = agents[0]
        if first.actor_every != 1 or first.critic_grad_clip is not None:
            raise ValueError("vectorised agents update every parameter at every step, without gradient clipping")
        for agent in agents:
            agent.loss.critic.use_onednn = False
        self.agents, self.tau = agents, first.tau
        self.module = _Compute(first.loss)
        group = {id(p): g for g in first.optimizer.param_groups for p in g["params"]}
        named = dict(self.module.named_parameters())
        self.rates = {name: group[id(p)]["lr"] for name, p in named.items() if id(p) in group}
        self.betas, self.eps = first.optimizer.param_groups[0]["betas"], first.optimizer.param_groups[0]["eps"]
        tensors = [{**dict(_Compute(a.loss).named_parameters()), **dict(_Compute(a.loss).named_buffers())}
                   for a in agents]
        stacked = {name: torch.stack([t[name].detach() for t in tensors]) for name in tensors[0]}
        self.params = {n: v for n, v in stacked.items() if n in self.rates}
        self.rest = {n: v for n, v in stacked.items() if n not in self.rates}
        self.moments = {n: torch.zeros_like(v) for n, v in self.params.items()}
        self.squares = {n: torch.zeros_like(v) for n, v in self.params.items()}
        self.count = torch.zeros((), device=next(iter(self.params.values())).device)
        self.targets = {n: n.replace("loss.target_critic.", "loss.critic_network.module.")
                        for n in self.rest if n.startswith("loss.target_critic.")}
        step = vmap(self._step, in_dims=(0, 0, 0, 0, None, 0, 0))
        self.step = torch.compile(step) if compile else step

    def _losses(self, params, rest, batch, noise):
        out = functional_call(self.module, {**rest, **params}, (batch, noise))
        return sum(v for key, v in out.items() if key.startswith("loss_")), out

    def _step(self, params, rest, moments, squares, count, batch, noise):
        grads, out = grad(self._losses, has_aux=True)(params, rest, batch, noise)
        (beta1, beta2), new = self.betas, ({}, {}, {}, dict(rest))
        for name, p in params.items():  # Adam, as torch.optim.Adam computes it
            m = moments[name] * beta1 + grads[name] * (1 - beta1)
            v = squares[name] * beta2 + grads[name] * grads[name] * (1 - beta2)
            denom = v.sqrt() / (1 - beta2 ** count).sqrt() + self.eps
            new[0][name] = p - self.rates[name] / (1 - beta1 ** count) * m / denom
            new[1][name], new[2][name] = m, v
        for target, online in self.targets.items():  # Polyak
            new[3][target] = rest[target].lerp(new[0][online], self.tau)
        new[3]["loss.update_count"] = rest["loss.update_count"] + 1
        return new[0], new[3], new[1], new[2], {key: value.detach() for key, value in out.items()}

    def update(self, batches: TensorDictBase, noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One update of every agent: `batches` `[K, B]`, `noise` stacked `[K, ...]`; returns the
        agents' losses and diagnostics, each `[K]`."""
        self.count = self.count + 1
        self.params, self.rest, self.moments, self.squares, out = self.step(
            self.params, self.rest, self.moments, self.squares, self.count, batches, noise)
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        """Put the stacked state back into each agent: its modules' tensors and its optimiser's moments
        and step count (as `torch.optim.Adam` keeps them)."""
        steps = int(self.count.item())
        for k, agent in enumerate(self.agents):
            module = _Compute(agent.loss)
            tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            for name, value in {**self.params, **self.rest}.items():
                tensors[name].copy_(value[k])
            state = agent.optimizer.state_dict()
            index = {id(p): i for i, p in enumerate(p for g in agent.optimizer.param_groups for p in g["params"])}
            for name, p in module.named_parameters():
                if name in self.params:
                    state["state"][index[id(p)]] = {"step": torch.tensor(float(steps)),
                                                    "exp_avg": self.moments[name][k].clone(),
                                                    "exp_avg_sq": self.squares[name][k].clone()}
            agent.optimizer.load_state_dict(state)

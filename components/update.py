"""One CQL-SAC update, top to bottom: losses -> backward -> optimizer step -> Polyak update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import CudaGraphModule
from torchrl.envs import EnvBase

from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.networks import make_actor, make_critics


def make_optimizer(loss: CQLSACLoss, cfg: OptimConfig, capturable: bool = False) -> torch.optim.Adam:
    """One Adam over four parameter groups (actor, critics, temperature, alpha').

    The same as four separate Adams, because Adam's update is per parameter. `fused=True` updates
    all parameters in one kernel per step instead of several small ops per parameter (CPU and CUDA).
    `capturable=True` (CUDA only) keeps the step count on the device, as a CUDA graph requires.
    """
    groups = [
        {"params": list(loss.actor_network.parameters()), "lr": cfg.actor_lr},
        {"params": list(loss.critic_network.parameters()), "lr": cfg.critic_lr},
        {"params": [loss.log_alpha], "lr": cfg.alpha_lr},
    ]
    if loss.tunes_alpha_prime:
        groups.append({"params": [loss.log_alpha_prime], "lr": cfg.alpha_prime_lr})
    return torch.optim.Adam(groups, fused=True, capturable=capturable)


@torch.no_grad()
def polyak_update(target: torch.nn.Module, source: torch.nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source (the seed's rho = 1 - tau)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def clip_grad_norm_per_member(ensemble: torch.nn.Module, max_norm: float) -> None:
    """Scale each ensemble member's gradient to norm at most `max_norm`, as `clip_grad_norm_` on that
    critic alone would (its parameters are slices along the leading dim of the stacked ones)."""
    grads = [p.grad for p in ensemble.parameters() if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # [E]
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.ndim - 1)))


def update_step(loss: CQLSACLoss, optimizer: torch.optim.Optimizer, batch: TensorDictBase, tau: float,
                critic_grad_clip: float | None = None, update_actor: bool = True) -> TensorDict:
    """One gradient update of actor, critics, temperature (and alpha'); returns the loss TensorDict.

    The losses are summed and back-propagated once: each one reaches only its own parameters
    (see `CQLSACLoss`), so this equals separate backward passes per loss. With `critic_grad_clip`,
    each critic's gradient norm is clipped before the step. Without `update_actor`, the actor and
    temperature losses are not computed, so their parameters have no gradient and Adam leaves them be.
    """
    losses = loss(batch, actor=update_actor)
    total = sum(value for key, value in losses.items() if key.startswith("loss_"))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if critic_grad_clip is not None:
        clip_grad_norm_per_member(loss.critic, critic_grad_clip)
    optimizer.step()
    polyak_update(loss.target_critic, loss.critic, tau)
    loss.update_count += 1
    return losses.detach()


@dataclass
class Agent:
    """What a training loop updates: the loss module (actor, critics, targets, temperatures), its
    optimiser and how it is stepped (`OptimConfig`: Polyak rate, gradient clipping, actor every k-th update)."""

    loss: CQLSACLoss
    optimizer: torch.optim.Optimizer
    tau: float
    critic_grad_clip: float | None = None
    actor_every: int = 1
    # The loss's update count as of this agent's first update, counted on the host from then on, so
    # that picking the actor's turn reads no device tensor (a sync per update on a GPU).
    _count: int | None = field(default=None, init=False, repr=False)

    @property
    def actor(self):
        return self.loss.actor_network

    def update(self, batch: TensorDictBase) -> TensorDict:
        """One `update_step` on `batch` (the actor's part on every `actor_every`-th); returns the detached
        losses and diagnostics."""
        if self._count is None:
            self._count = int(self.loss.update_count)  # after any checkpoint was loaded: loops restore first
        update_actor = self.actor_every == 1 or self._count % self.actor_every == self.actor_every - 1
        self._count += 1
        return update_step(self.loss, self.optimizer, batch, self.tau, self.critic_grad_clip, update_actor)


def make_agent(env: EnvBase, network: NetworkConfig, loss: LossConfig, optim: OptimConfig,
               compile: bool = False) -> Agent:
    """A fresh agent for `env`'s observation and action specs: actor, critics, loss module, Adam
    (with `compile`, the loss runs through torch.compile, see `CQLSACLoss`)."""
    obs_spec, act_spec = env.observation_spec["observation"], env.action_spec
    module = CQLSACLoss(make_actor(obs_spec, act_spec, network), make_critics(obs_spec, act_spec, network), loss,
                        compile=compile)
    return Agent(module, make_optimizer(module, optim), optim.tau, optim.critic_grad_clip, optim.actor_every)


def cuda_graph_update(loss: CQLSACLoss, optimizer: torch.optim.Optimizer, tau: float,
                      warmup: int = 3) -> Callable[[TensorDictBase], TensorDict]:
    """`update_step` recorded once as a CUDA graph and replayed on every later batch.

    Why: at these sizes a CUDA update is hundreds of small kernels whose launches cost more than
    their arithmetic; a replay launches them all at once. The computation is `update_step`'s.
    Batches must keep the first one's keys, shapes and device; the optimizer must come from
    `make_optimizer(..., capturable=True)`. Built on tensordict's `CudaGraphModule`: the first
    `warmup` calls run eagerly on a side stream, the next one records the graph.
    """
    if loss.log_alpha.device.type != "cuda":
        raise ValueError("a CUDA-graph update needs the loss module on a CUDA device; use update_step on "
                         f"{loss.log_alpha.device.type}")
    if not all(group.get("capturable") for group in optimizer.param_groups):
        raise ValueError("a CUDA-graph update needs make_optimizer(..., capturable=True)")
    return CudaGraphModule(partial(update_step, loss, optimizer, tau=tau), warmup=warmup, in_keys=[], out_keys=[])

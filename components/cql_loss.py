"""CQL-SAC loss module: every term of docs/loss.md sections 1-4, in the manner of `torchrl.objectives`.

Why not `torchrl.objectives.CQLLoss`: in torchrl 0.14.1 it takes the logsumexp over 3 values per
sampled action instead of over all 3N actions of a state, evaluates the actions drawn at s' at s',
and in its Lagrange form neither scales the penalty by alpha' nor detaches the dual loss.

Conventions (docs/loss.md, "Conventions"):
- TD loss per critic is the plain mean squared error to y (no 1/2 factor); the critic loss is the
  sum over the ensemble members of (TD loss + CQL penalty).
- All losses can be summed and back-propagated once: each loss reaches only its own parameters
  (actor loss: detached critic weights; critic loss: detached policy samples; temperature and
  alpha' losses: detached statistics).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import TD0Estimator

from cqlsac.components.config import LossConfig
from cqlsac.components.networks import EnsembleMLP, action_bounds

LOG_TWO = math.log(2.0)
HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
ALPHA_PRIME_MAX = 1e6


def squash_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(x)^2) in a form that stays finite for large |x|."""
    return 2.0 * (LOG_TWO - pre_tanh - F.softplus(-2.0 * pre_tanh))


class CQLSACLoss(LossModule):
    """CQL(H)-SAC loss for a TanhNormal actor and an ensemble of critics with Polyak targets.

    Reads `observation`, `action`, `("next", "observation")`, `("next", "reward")`,
    `("next", "done")`, `("next", "terminated")` and, with `calibrated=True`, `mc_return`.
    Writes `loss_actor`, `loss_qvalue`, `loss_alpha` (and `loss_alpha_prime` in the Lagrange form
    with w > 0) plus detached diagnostics; a batch without one of `in_keys` is a `KeyError`.
    """

    @dataclass
    class _AcceptedKeys:
        observation: str = "observation"
        action: str = "action"
        reward: str = "reward"
        done: str = "done"
        terminated: str = "terminated"
        mc_return: str = "mc_return"

    default_value_estimator = ValueEstimators.TD0

    def __init__(self, actor: ProbabilisticActor, critic: ValueOperator, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.actor_network = actor
        self.critic_network = critic
        if not isinstance(critic.module, EnsembleMLP):
            raise TypeError("critic must be a ValueOperator around EnsembleMLP (see make_critics)")
        self.target_critic = copy.deepcopy(critic.module).requires_grad_(False)  # Polyak target
        low, high = action_bounds(actor.spec["action"])
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        self.register_buffer("log_half_range", torch.log((high - low) / 2))
        # Log-density of the uniform distribution on the action box: -log(vol(box)).
        self.register_buffer("uniform_log_density", -torch.log(high - low).sum())
        act_dim = low.shape[-1]
        entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.register_buffer("target_entropy", torch.tensor(entropy))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.initial_alpha)))
        self.log_alpha_prime = nn.Parameter(torch.tensor(math.log(cfg.initial_alpha_prime)),
                                            requires_grad=self.tunes_alpha_prime)
        # Updates done so far; decides the BC warm start and is saved with the module.
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        self.make_value_estimator(gamma=cfg.gamma)

    @property
    def critic(self) -> EnsembleMLP:
        return self.critic_network.module

    @property
    def uses_cql(self) -> bool:
        return self.cfg.cql_weight > 0

    @property
    def tunes_alpha_prime(self) -> bool:
        """Whether alpha' is trained: the Lagrange form with the CQL penalty on."""
        return self.cfg.lagrange and self.uses_cql

    @property
    def in_keys(self) -> list:
        keys = self.tensor_keys
        in_keys = [keys.observation, keys.action, ("next", keys.observation), ("next", keys.reward),
                   ("next", keys.done), ("next", keys.terminated)]
        return in_keys + ([keys.mc_return] if self.cfg.calibrated else [])

    @property
    def out_keys(self) -> list[str]:
        dual = ["loss_alpha_prime"] if self.tunes_alpha_prime else []
        diagnostics = ["alpha"] + (["alpha_prime"] if self.tunes_alpha_prime else []) + [
            "entropy", "q_data", "td_target", "cql_gap"]
        return ["loss_actor", "loss_qvalue", "loss_alpha"] + dual + diagnostics

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams):
        """TD(0): y = r + gamma * (1 - terminated) * V(s'); V(s') is computed by this module."""
        value_type = self.default_value_estimator if value_type is None else value_type
        if value_type != ValueEstimators.TD0:
            raise NotImplementedError(f"CQLSACLoss supports the TD(0) estimator only, got {value_type}")
        self.value_type = value_type
        gamma = hyperparams.pop("gamma", self.cfg.gamma)
        self._value_estimator = TD0Estimator(gamma=gamma, value_network=None, **hyperparams)
        self._forward_value_estimator_keys()

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(reward=self.tensor_keys.reward, done=self.tensor_keys.done,
                                           terminated=self.tensor_keys.terminated)

    # --- policy helpers -------------------------------------------------------------------
    def policy_params(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of the Gaussian before the tanh squashing."""
        params_module: TensorDictModule = self.actor_network.module[0]
        return params_module.module(observation)

    def squashed_sample(self, loc, scale, noise):
        """Reparameterised action in the box and its log-density, from standard-normal `noise`."""
        pre_tanh = loc + scale * noise
        action = self.action_low + (self.action_high - self.action_low) * (torch.tanh(pre_tanh) + 1) / 2
        log_prob = -0.5 * noise.pow(2) - scale.log() - HALF_LOG_TWO_PI - squash_log_det(pre_tanh) - self.log_half_range
        return action, log_prob.sum(-1)

    def log_prob_of(self, loc, scale, action):
        """log pi(action|s) for a given action in the box (used by the BC warm start)."""
        unit = 2 * (action - self.action_low) / (self.action_high - self.action_low) - 1
        pre_tanh = torch.atanh(unit.clamp(-1 + 1e-6, 1 - 1e-6))
        noise = (pre_tanh - loc) / scale
        log_prob = -0.5 * noise.pow(2) - scale.log() - HALF_LOG_TWO_PI - squash_log_det(pre_tanh) - self.log_half_range
        return log_prob.sum(-1)

    def draw_noise(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        """All randomness of one loss evaluation, drawn up front so that it can be replayed in tests."""
        act_dim = self.action_low.shape[-1]
        n = self.cfg.num_actions
        like = {"device": self.action_low.device if device is None else device, "dtype": self.action_low.dtype}
        noise = {
            "actor": torch.randn(batch_size, act_dim, **like),
            "next": torch.randn(batch_size, n if self.cfg.max_q_backup else 1, act_dim, **like),
        }
        if self.uses_cql:
            noise["cql_current"] = torch.randn(batch_size, n, act_dim, **like)
            noise["cql_next"] = torch.randn(batch_size, n, act_dim, **like)
            noise["uniform"] = torch.rand(batch_size, n, act_dim, **like)
        return noise

    # --- the loss -------------------------------------------------------------------------
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        return self.compute(tensordict, self.draw_noise(tensordict.shape[0], tensordict.device))

    def compute(self, tensordict: TensorDictBase, noise: dict[str, torch.Tensor]) -> TensorDict:
        """All losses and diagnostics for a batch, given the noise of `draw_noise`."""
        cfg, keys = self.cfg, self.tensor_keys
        missing = [key for key in self.in_keys if tensordict.get(key, None) is None]
        if missing:  # e.g. without `terminated` torchrl would bootstrap on `done`, time limits included
            raise KeyError(f"the batch lacks {missing}, which CQLSACLoss reads (in_keys: {self.in_keys})")
        obs = tensordict.get(keys.observation)
        data_action = tensordict.get(keys.action)
        next_obs = tensordict.get(("next", keys.observation))
        alpha = self.log_alpha.exp()

        loc_s, scale_s = self.policy_params(obs)
        with torch.no_grad():  # s' only feeds the TD target and the CQL samples: no backward through it
            loc_next, scale_next = self.policy_params(next_obs)

        # Actor and temperature (docs/loss.md section 3). The critic is evaluated with detached weights.
        action_pi, log_pi = self.squashed_sample(loc_s, scale_s, noise["actor"])
        detached_w = [w.detach() for w in self.critic.weights]
        detached_b = [b.detach() for b in self.critic.biases]
        q_pi = self.critic.evaluate(obs, action_pi.unsqueeze(1), detached_w, detached_b).squeeze(1)
        policy_objective = q_pi.min(-1).values
        if cfg.bc_steps:  # a tensor select, not a Python `if` on a tensor: no device sync, capturable in a CUDA graph
            bc_objective = self.log_prob_of(loc_s, scale_s, data_action)
            policy_objective = torch.where(self.update_count < cfg.bc_steps, bc_objective, policy_objective)
        loss_actor = (alpha.detach() * log_pi - policy_objective).mean()
        loss_alpha = -(self.log_alpha * (log_pi + self.target_entropy).detach()).mean()

        # TD target (docs/loss.md section 1), no gradient.
        with torch.no_grad():
            next_actions, next_log_pi = self.squashed_sample(loc_next.unsqueeze(1), scale_next.unsqueeze(1), noise["next"])
            next_q = self.target_critic.evaluate(next_obs, next_actions).min(-1).values  # [B, M]
            soft_next = next_q - float(cfg.backup_entropy) * alpha * next_log_pi
            chosen = next_q.argmax(-1, keepdim=True)  # M = 1 without the max-Q backup
            next_value = soft_next.gather(-1, chosen)  # [B, 1]
            td_target = self.value_estimator.value_estimate(tensordict, next_value=next_value)  # [B, 1]

        out = {}
        if self.uses_cql:
            q_data, penalty, gap, out = self._cql(tensordict, obs, data_action, noise, loc_s, scale_s, loc_next, scale_next)
        else:
            q_data = self.critic.evaluate(obs, data_action.unsqueeze(1)).squeeze(1)
            penalty = gap = torch.zeros((), device=obs.device)
        td_loss = (q_data - td_target).pow(2).mean(0)  # [E]
        loss_qvalue = (td_loss + penalty).sum()

        return TensorDict(
            {
                "loss_actor": loss_actor,
                "loss_qvalue": loss_qvalue,
                "loss_alpha": loss_alpha,
                **out,
                "alpha": alpha.detach(),
                "entropy": -log_pi.detach().mean(),
                "q_data": q_data.detach().mean(),
                "td_target": td_target.mean(),
                "cql_gap": gap.detach().mean(),
            },
            batch_size=[],
        )

    def _cql(self, tensordict, obs, data_action, noise, loc_s, scale_s, loc_next, scale_next):
        """Q at the data actions and the CQL(H) penalty per critic (docs/loss.md sections 2 and 4)."""
        cfg = self.cfg
        with torch.no_grad():
            current_actions, current_log_pi = self.squashed_sample(
                loc_s.unsqueeze(1), scale_s.unsqueeze(1), noise["cql_current"])
            next_actions, next_log_pi = self.squashed_sample(
                loc_next.unsqueeze(1), scale_next.unsqueeze(1), noise["cql_next"])
            uniform_actions = self.action_low + (self.action_high - self.action_low) * noise["uniform"]
        # One ensemble evaluation at s for the data action and all 3N sampled actions.
        actions = torch.cat([data_action.unsqueeze(1), uniform_actions, current_actions, next_actions], 1)
        q_all = self.critic.evaluate(obs, actions)  # [B, 3N+1, E]
        q_data = q_all[:, 0]
        q_uniform, q_current, q_next = q_all[:, 1:].split(cfg.num_actions, dim=1)  # [B, N, E] each
        if cfg.calibrated:
            bound = tensordict.get(self.tensor_keys.mc_return).reshape(-1, 1, 1)
            q_current = torch.maximum(q_current, bound)
            q_next = torch.maximum(q_next, bound)
        weighted = torch.cat([
            q_uniform - self.uniform_log_density,
            q_current - current_log_pi.unsqueeze(-1),
            q_next - next_log_pi.unsqueeze(-1),
        ], dim=1)  # [B, 3N, E]
        temperature = cfg.cql_temperature
        lse = temperature * torch.logsumexp(weighted / temperature, dim=1)  # [B, E]
        gap = (lse - q_data).mean(0)  # [E]
        if not cfg.lagrange:
            return q_data, cfg.cql_weight * gap, gap, {}
        alpha_prime = self.log_alpha_prime.exp().clamp(0, ALPHA_PRIME_MAX)
        penalty = alpha_prime.detach() * cfg.cql_weight * (gap - cfg.lagrange_threshold)
        loss_alpha_prime = -(alpha_prime * cfg.cql_weight * (gap.detach() - cfg.lagrange_threshold)).mean()
        return q_data, penalty, gap, {"loss_alpha_prime": loss_alpha_prime, "alpha_prime": alpha_prime.detach()}

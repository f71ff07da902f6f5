"""CQL-SAC loss module: every term of docs/loss.md sections 1-4 (section 7: discrete actions), in the
manner of `torchrl.objectives`.

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
from cqlsac.components.networks import EnsembleMLP, action_bounds, is_discrete

LOG_TWO = math.log(2.0)
HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
ALPHA_PRIME_MAX = 1e6


def squash_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(x)^2) in a form that stays finite for large |x|."""
    return 2.0 * (LOG_TWO - pre_tanh - F.softplus(-2.0 * pre_tanh))


class CQLSACLoss(LossModule):
    """CQL(H)-SAC loss for a TanhNormal or a categorical actor and an ensemble of critics with Polyak targets.

    Reads `observation`, `action`, `("next", "observation")`, `("next", "reward")`,
    `("next", "done")`, `("next", "terminated")` and, with `calibrated=True`, `mc_return`.
    Writes `loss_actor`, `loss_qvalue`, `loss_alpha` (and `loss_alpha_prime` in the Lagrange form
    with w > 0) plus detached diagnostics; a batch without one of `in_keys` is a `KeyError`.
    `loss(batch, actor=False)` computes the critics' part only (no `loss_actor`, `loss_alpha`, `entropy`).
    Continuous and discrete actions share every term; where they differ (sampled actions and
    importance weights against exact sums over the actions), the helpers below branch.
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

    def __init__(self, actor: ProbabilisticActor, critic: ValueOperator, cfg: LossConfig, compile: bool = False):
        super().__init__()
        self.cfg = cfg
        self.actor_network = actor
        self.critic_network = critic
        if not isinstance(critic.module, EnsembleMLP):
            raise TypeError("critic must be a ValueOperator around EnsembleMLP (see make_critics)")
        if cfg.target_subset is not None and cfg.target_subset > critic.module.num_members:
            raise ValueError(f"target_subset={cfg.target_subset} is more than the {critic.module.num_members} critics")
        self.target_critic = copy.deepcopy(critic.module).requires_grad_(False)  # Polyak target
        action_spec = actor.spec["action"]
        self.discrete = is_discrete(action_spec)
        if self.discrete:
            num_actions = int(action_spec.space.n)
            # Close to the entropy of the uniform policy, as torchrl's DiscreteSACLoss and discrete SAC
            # (Christodoulou, 2019) set it; docs/loss.md section 7.
            entropy = 0.98 * math.log(num_actions)
        else:
            if cfg.cql_subtracted != "data_action":
                raise ValueError(f"cql_subtracted={cfg.cql_subtracted!r} is for discrete actions; continuous CQL "
                                 "subtracts Q at the data action")
            low, high = action_bounds(action_spec)
            self.register_buffer("action_low", low)
            self.register_buffer("action_high", high)
            self.register_buffer("log_half_range", torch.log((high - low) / 2))
            # Log-density of the uniform distribution on the action box: -log(vol(box)).
            self.register_buffer("uniform_log_density", -torch.log(high - low).sum())
            entropy = -float(low.shape[-1])
        entropy = entropy if cfg.target_entropy is None else cfg.target_entropy
        self.register_buffer("target_entropy", torch.tensor(entropy))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.initial_alpha)))
        self.log_alpha_prime = nn.Parameter(torch.tensor(math.log(cfg.initial_alpha_prime)),
                                            requires_grad=self.tunes_alpha_prime)
        # Updates done so far; decides the BC warm start and is saved with the module.
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        self.make_value_estimator(gamma=cfg.gamma)
        # `compute` through torch.compile: its many small ops fused into a few kernels, forward and
        # backward (the noise is drawn outside, so the random stream is eager's). The critics then
        # take the batched-matmul path, which compiles without a graph break.
        if compile:
            critic.module.use_onednn = False
        self._compute = torch.compile(self.compute) if compile else self.compute

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
    def policy_outputs(self, observation: torch.Tensor):
        """What the actor's network gives: (loc, scale) of the Gaussian before the tanh squashing,
        or the logits of the categorical policy."""
        params_module: TensorDictModule = self.actor_network.module[0]
        return params_module.module(observation)

    def squashed_sample(self, loc, scale, noise):
        """Reparameterised action in the box and its log-density, from standard-normal `noise`."""
        pre_tanh = loc + scale * noise
        action = self.action_low + (self.action_high - self.action_low) * (torch.tanh(pre_tanh) + 1) / 2
        log_prob = -0.5 * noise.pow(2) - scale.log() - HALF_LOG_TWO_PI - squash_log_det(pre_tanh) - self.log_half_range
        return action, log_prob.sum(-1)

    def log_prob_of(self, policy, action):
        """log pi(action|s) of given data actions (the BC warm start)."""
        if self.discrete:
            return F.log_softmax(policy, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        loc, scale = policy
        unit = 2 * (action - self.action_low) / (self.action_high - self.action_low) - 1
        pre_tanh = torch.atanh(unit.clamp(-1 + 1e-6, 1 - 1e-6))
        noise = (pre_tanh - loc) / scale
        log_prob = -0.5 * noise.pow(2) - scale.log() - HALF_LOG_TWO_PI - squash_log_det(pre_tanh) - self.log_half_range
        return log_prob.sum(-1)

    def draw_noise(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        """All randomness of one loss evaluation, drawn up front so that it can be replayed in tests.
        Discrete actions need none but the critic subset: their expectations are exact sums over the actions."""
        subset = {}
        if self.cfg.target_subset is not None:  # one random subset of target critics per update (REDQ)
            subset["critic_subset"] = torch.randperm(self.critic.num_members, device=device)[:self.cfg.target_subset]
        if self.discrete:
            return subset
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
        return {**noise, **subset}

    # --- the loss -------------------------------------------------------------------------
    def forward(self, tensordict: TensorDictBase, actor: bool = True) -> TensorDict:
        return self._compute(tensordict, self.draw_noise(tensordict.shape[0], tensordict.device), actor)

    def compute(self, tensordict: TensorDictBase, noise: dict[str, torch.Tensor], actor: bool = True) -> TensorDict:
        """All losses and diagnostics for a batch, given the noise of `draw_noise`. Without `actor` (a
        critic-only update), `loss_actor`, `loss_alpha` and `entropy` are neither computed nor written:
        the policy's action at s and the critics' values there are not needed for anything else. The
        noise is drawn all the same, so the random stream does not depend on it."""
        cfg, keys = self.cfg, self.tensor_keys
        missing = [key for key in self.in_keys if tensordict.get(key, None) is None]
        if missing:  # e.g. without `terminated` torchrl would bootstrap on `done`, time limits included
            raise KeyError(f"the batch lacks {missing}, which CQLSACLoss reads (in_keys: {self.in_keys})")
        obs = tensordict.get(keys.observation)
        data_action = tensordict.get(keys.action)
        next_obs = tensordict.get(("next", keys.observation))
        alpha = self.log_alpha.exp()

        with torch.set_grad_enabled(actor and torch.is_grad_enabled()):  # the CQL samples alone need no backward
            policy = self.policy_outputs(obs) if actor or (self.uses_cql and not self.discrete) else None
        with torch.no_grad():  # s' only feeds the TD target and the CQL samples: no backward through it
            next_policy = self.policy_outputs(next_obs)
        # Discrete actions: Q(s, .) of every action once, for the critic loss and (detached) for the actor.
        q_obs = self.critic.evaluate_all(obs) if self.discrete else None

        # Actor and temperature (docs/loss.md section 3). The critics' weights get no gradient from them.
        actor_losses = {}
        if actor:
            log_pi, policy_objective = self._actor_terms(obs, policy, noise, q_obs)
            if cfg.bc_steps:  # a tensor select, not a Python `if` on a tensor: no device sync, capturable in a CUDA graph
                bc_objective = self.log_prob_of(policy, data_action)
                policy_objective = torch.where(self.update_count < cfg.bc_steps, bc_objective, policy_objective)
            actor_losses = {"loss_actor": (alpha.detach() * log_pi - policy_objective).mean(),
                            "loss_alpha": -(self.log_alpha * (log_pi + self.target_entropy).detach()).mean(),
                            "entropy": -log_pi.detach().mean()}

        # TD target (docs/loss.md section 1), no gradient.
        with torch.no_grad():
            next_value = self._next_value(next_obs, next_policy, noise, alpha)  # [B, 1]
            td_target = self.value_estimator.value_estimate(tensordict, next_value=next_value)  # [B, 1]

        out = {}
        if self.uses_cql:
            q_data, penalty, gap, out = self._cql(tensordict, obs, data_action, noise, policy, next_policy, q_obs)
        else:
            q_data = (self._gather_actions(q_obs, data_action) if self.discrete
                      else self.critic.evaluate(obs, data_action.unsqueeze(1)).squeeze(1))
            penalty = gap = torch.zeros((), device=obs.device)
        td_loss = (q_data - td_target).pow(2).mean(0)  # [E]
        loss_qvalue = (td_loss + penalty).sum()

        return TensorDict(
            {
                **actor_losses,
                "loss_qvalue": loss_qvalue,
                **out,
                "alpha": alpha.detach(),
                "q_data": q_data.detach().mean(),
                "td_target": td_target.mean(),
                "cql_gap": gap.detach().mean(),
            },
            batch_size=[],
        )

    def _actor_terms(self, obs, policy, noise, q_obs):
        """(log pi [B], the policy's value [B]) for the actor and temperature losses: at one
        reparameterised action (the critics evaluated with detached weights), or as exact
        expectations over the discrete actions (with the detached Q(s, .) of every action)."""
        if self.discrete:
            log_probs = F.log_softmax(policy, -1)  # [B, n]
            probs = log_probs.exp()
            q_value = self._combine_for_actor(q_obs.detach())  # [B, n]
            return (probs * log_probs).sum(-1), (probs * q_value).sum(-1)
        detached_w = [w.detach() for w in self.critic.weights]
        detached_b = [b.detach() for b in self.critic.biases]
        action_pi, log_pi = self.squashed_sample(*policy, noise["actor"])
        q_pi = self.critic.evaluate(obs, action_pi.unsqueeze(1), detached_w, detached_b).squeeze(1)
        return log_pi, self._combine_for_actor(q_pi)

    def _combine_for_actor(self, q):
        """The critics' values for the actor: their minimum (clipped double-Q) or their mean (`actor_q`)."""
        return q.mean(-1) if self.cfg.actor_q == "mean" else q.min(-1).values

    def _target_min(self, q, noise):
        """Min over the target critics, or over the update's random subset of them (`target_subset`)."""
        if self.cfg.target_subset is not None:
            q = q.index_select(-1, noise["critic_subset"])
        return q.min(-1).values

    def _next_value(self, next_obs, next_policy, noise, alpha):
        """min_j Q̄_j(s', a') - beta alpha log pi(a'|s') at a' ~ pi(.|s') (its expectation over the
        discrete actions), or at the action of the max-Q backup: `[B, 1]`."""
        beta = float(self.cfg.backup_entropy)
        if self.discrete:
            next_log_pi = F.log_softmax(next_policy, -1)  # [B, n]
            next_q = self._target_min(self.target_critic.evaluate_all(next_obs), noise)  # [B, n]
            soft_next = next_q - beta * alpha * next_log_pi
            if self.cfg.max_q_backup:
                return soft_next.gather(-1, next_q.argmax(-1, keepdim=True))
            return (next_log_pi.exp() * soft_next).sum(-1, keepdim=True)
        loc_next, scale_next = next_policy
        next_actions, next_log_pi = self.squashed_sample(loc_next.unsqueeze(1), scale_next.unsqueeze(1), noise["next"])
        next_q = self._target_min(self.target_critic.evaluate(next_obs, next_actions), noise)  # [B, M]
        soft_next = next_q - beta * alpha * next_log_pi
        chosen = next_q.argmax(-1, keepdim=True)  # M = 1 without the max-Q backup
        return soft_next.gather(-1, chosen)

    @staticmethod
    def _gather_actions(q_all, action):
        """`q_all[b, action[b], e]`: `[B, n, E]` -> `[B, E]`."""
        index = action.reshape(-1, 1, 1).expand(-1, 1, q_all.shape[-1])
        return q_all.gather(1, index).squeeze(1)

    def _cql(self, tensordict, obs, data_action, noise, policy, next_policy, q_obs):
        """Q at the data actions and the CQL(H) penalty per critic (docs/loss.md sections 2, 4 and 7)."""
        cfg = self.cfg
        bound = tensordict.get(self.tensor_keys.mc_return).reshape(-1, 1, 1) if cfg.calibrated else None
        if self.discrete:
            # The logsumexp runs over every action, exactly; Cal-QL bounds each of them.
            q_all = q_obs  # [B, n, E]
            q_data = self._gather_actions(q_all, data_action)
            values = q_all if bound is None else torch.maximum(q_all, bound)
            subtracted = q_data if cfg.cql_subtracted == "data_action" else q_all.mean(1)
        else:
            values, q_data = self._importance_weighted_values(obs, data_action, noise, policy, next_policy, bound)
            subtracted = q_data
        temperature = cfg.cql_temperature
        lse = temperature * torch.logsumexp(values / temperature, dim=1)  # [B, E]
        gap = (lse - subtracted).mean(0)  # [E]
        if not cfg.lagrange:
            return q_data, cfg.cql_weight * gap, gap, {}
        alpha_prime = self.log_alpha_prime.exp().clamp(0, ALPHA_PRIME_MAX)
        penalty = alpha_prime.detach() * cfg.cql_weight * (gap - cfg.lagrange_threshold)
        loss_alpha_prime = -(alpha_prime * cfg.cql_weight * (gap.detach() - cfg.lagrange_threshold)).mean()
        return q_data, penalty, gap, {"loss_alpha_prime": loss_alpha_prime, "alpha_prime": alpha_prime.detach()}

    def _importance_weighted_values(self, obs, data_action, noise, policy, next_policy, bound):
        """The 3N importance-weighted values of each state for the logsumexp `[B, 3N, E]`, and Q at the
        data actions `[B, E]`, from one ensemble evaluation at s (docs/loss.md section 2)."""
        n = self.cfg.num_actions
        with torch.no_grad():
            (loc_s, scale_s), (loc_next, scale_next) = policy, next_policy
            current_actions, current_log_pi = self.squashed_sample(
                loc_s.unsqueeze(1), scale_s.unsqueeze(1), noise["cql_current"])
            next_actions, next_log_pi = self.squashed_sample(
                loc_next.unsqueeze(1), scale_next.unsqueeze(1), noise["cql_next"])
            uniform_actions = self.action_low + (self.action_high - self.action_low) * noise["uniform"]
        actions = torch.cat([data_action.unsqueeze(1), uniform_actions, current_actions, next_actions], 1)
        q_all = self.critic.evaluate(obs, actions)  # [B, 3N+1, E]
        q_uniform, q_current, q_next = q_all[:, 1:].split(n, dim=1)  # [B, N, E] each
        if bound is not None:
            q_current = torch.maximum(q_current, bound)
            q_next = torch.maximum(q_next, bound)
        weighted = torch.cat([
            q_uniform - self.uniform_log_density,
            q_current - current_log_pi.unsqueeze(-1),
            q_next - next_log_pi.unsqueeze(-1),
        ], dim=1)
        return weighted, q_all[:, 0]

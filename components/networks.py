"""Policy and critic networks as TensorDict modules, for continuous (Box) and discrete actions.

`make_actor` returns a `ProbabilisticActor`: over a `TanhNormal` in the action box, or over a
`Categorical` for discrete actions. `make_critics` returns one `ValueOperator` wrapping a critic
ensemble with stacked parameters, so all critics are evaluated in one call (see `EnsembleMLP`):
Q(s, a) for continuous actions, Q(s, .) over every action for discrete ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded, Categorical, TensorSpec
from torchrl.envs.utils import exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator

from cqlsac.components import onednn_ensemble
from cqlsac.components.config import NetworkConfig

ACTIVATION_CLASSES = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


def is_discrete(action_spec: TensorSpec) -> bool:
    """Whether the actions are integers in [0, n) (a gymnasium `Discrete` space)."""
    return isinstance(action_spec, Categorical)


def action_bounds(action_spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high of a bounded action spec, as float tensors."""
    if not isinstance(action_spec, Bounded):
        raise TypeError(f"CQL-SAC needs a bounded (Box) or a discrete action space, got {type(action_spec).__name__}")
    return action_spec.space.low.float(), action_spec.space.high.float()


class TensorOutputModule(TensorDictModule):
    """A `TensorDictModule` that writes its plain-tensor outputs straight into the tensordict.

    The parent converts every output with `TensorDict.from_any`, which calls
    `importlib.util.find_spec("pandas")` each time: about 0.1 ms per output, a fifth of a 64x64
    policy call through torchrl's path (docs/performance.md). The actors' parameter modules are
    these: the categorical actor's calls and the continuous actor's calls through its distribution
    go through them. Anything but plain tensors into the parent's tensordict takes the parent's path.
    """

    def _write_to_tensordict(self, tensordict, tensors, tensordict_out=None, out_keys=None):
        if (tensordict_out is None and out_keys is None and self.inplace is True
                and len(tensors) == len(self.out_keys_source) and all(type(t) is torch.Tensor for t in tensors)):
            for key, tensor in zip(self.out_keys_source, tensors):
                if key != "_":
                    tensordict.set(key, tensor)
            return tensordict
        return super()._write_to_tensordict(tensordict, tensors, tensordict_out, out_keys)


class SquashedGaussianActor(ProbabilisticActor):
    """The continuous policy: a `ProbabilisticActor` over a `TanhNormal` whose plain action calls
    skip building the distribution.

    In collection and evaluation a call is one small MLP, and building the `TanhNormal` and
    sampling through its transforms costs several times the MLP (docs/performance.md). A call on a
    tensordict alone, without gradients, under the RANDOM or DETERMINISTIC interaction type,
    computes what the distribution would, with the same random draw: the Gaussian sample
    `loc + eps * scale` (eps drawn as `Normal.rsample` draws it) or `loc`, then tanh clamped within
    float resolution of +-1 (torchrl's `SafeTanhTransform`), then into the action box. Every other
    call takes the parent's path.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        low, high = (self.module[-1].distribution_kwargs[k] for k in ("low", "high"))
        # (centre, half-width) of the action box, as `TanhNormal` maps [-1, 1] into it; None for [-1, 1].
        trivial = not ((high != 1.0).any() or (low != -1.0).any())
        self.box_affine = None if trivial else ((high + low) / 2, (high - low) / 2)

    def forward(self, *args, **kwargs):
        mode = exploration_type() or self.module[-1].default_interaction_type
        if (len(args) != 1 or kwargs or not isinstance(args[0], TensorDictBase) or torch.is_grad_enabled()
                or mode not in (InteractionType.RANDOM, InteractionType.DETERMINISTIC)):
            return super().forward(*args, **kwargs)
        tensordict = args[0]
        loc, scale = self.module[0].module(tensordict.get("observation"))
        pre_tanh = loc if mode is InteractionType.DETERMINISTIC else loc + torch.empty_like(loc).normal_() * scale
        limit = 1.0 - torch.finfo(pre_tanh.dtype).resolution
        action = pre_tanh.tanh().clamp(-limit, limit)
        if self.box_affine is not None:
            centre, half_width = self.box_affine
            if centre.device != action.device:
                self.box_affine = centre, half_width = centre.to(action.device), half_width.to(action.device)
            action = centre + half_width * action
        tensordict.set("loc", loc)
        tensordict.set("scale", scale)
        tensordict.set("action", action)
        return tensordict


def make_actor(observation_spec: TensorSpec, action_spec: TensorSpec, cfg: NetworkConfig) -> ProbabilisticActor:
    """The policy: a squashed Gaussian (MLP -> (loc, scale) -> TanhNormal in the action box, a
    `SquashedGaussianActor`), or for discrete actions a categorical one (MLP -> logits -> Categorical).

    Samples at random under the default (training) exploration type; under
    `ExplorationType.DETERMINISTIC` it returns the squashed mean, or the most probable action,
    used for evaluation.
    """
    obs_dim = observation_spec.shape[-1]
    activation = ACTIVATION_CLASSES[cfg.activation]
    if is_discrete(action_spec):
        logits = MLP(in_features=obs_dim, out_features=int(action_spec.space.n), num_cells=list(cfg.actor_hidden),
                     activation_class=activation)
        return ProbabilisticActor(TensorOutputModule(logits, in_keys=["observation"], out_keys=["logits"]),
                                  in_keys=["logits"], spec=action_spec, distribution_class=torch.distributions.Categorical,
                                  return_log_prob=False, default_interaction_type=InteractionType.RANDOM)
    act_dim = action_spec.shape[-1]
    low, high = action_bounds(action_spec)
    net = nn.Sequential(
        MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=list(cfg.actor_hidden),
            activation_class=activation),
        NormalParamExtractor(scale_mapping="biased_softplus_1.0", scale_lb=cfg.scale_lb),
    )
    params = TensorOutputModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
    return SquashedGaussianActor(
        params,
        in_keys=["loc", "scale"],
        spec=action_spec,
        distribution_class=TanhNormal,
        distribution_kwargs={"low": low, "high": high, "tanh_loc": False},
        return_log_prob=False,
        default_interaction_type=InteractionType.RANDOM,
    )


class EnsembleMLP(nn.Module):
    """`num_members` independent MLPs whose weights are stacked along a leading dim: critics Q(s, a)
    of continuous actions (`act_dim` inputs for the action, one output), or Q(s, .) of every one of
    `num_discrete` actions (`act_dim = 0`, one output per action).

    Weights are `[num_members, fan_in, fan_out]`, biases `[num_members, 1, fan_out]`. All members
    are evaluated in one call on the same rows: on CPU in float32 with ReLU and one output through
    oneDNN (`onednn_ensemble`; `use_onednn = False` turns it off) when a call has at least
    `onednn_min_rows` rows, otherwise, and with `layer_norm` (normalisation without affine
    parameters before each hidden activation), one batched matmul per layer.
    """

    use_onednn: bool = True
    # oneDNN pays on the CQL call's B(3N+1) rows; on a batch of B = 256 rows its one call per member
    # and layer costs more than it saves: SAC-mode updates were 1.2-1.45x faster with those calls
    # batched on the Intel Xeon (benchmarks/critic_paths.py, docs/performance.md).
    onednn_min_rows: int = 1024

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], num_members: int,
                 activation: type[nn.Module] = nn.ReLU, layer_norm: bool = False, num_discrete: int | None = None):
        super().__init__()
        self.num_members = num_members
        self.layer_norm = layer_norm
        self.obs_dim = obs_dim
        sizes = [obs_dim + act_dim, *hidden, num_discrete or 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            weight = torch.empty(num_members, fan_in, fan_out)
            bias = torch.empty(num_members, 1, fan_out)
            bound = 1.0 / math.sqrt(fan_in)
            for member in range(num_members):  # independent draws, as nn.Linear would make them
                nn.init.kaiming_uniform_(weight[member].T, a=math.sqrt(5))
                nn.init.uniform_(bias[member], -bound, bound)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))
        # ReLU's backward reads its output, not its input, so it may overwrite the matmul's output.
        self.activation = activation(inplace=True) if activation is nn.ReLU else activation()

    def forward(self, observation: torch.Tensor, action: torch.Tensor | None = None) -> torch.Tensor:
        """Q of every member: `[*B, E]` at the given continuous actions, `[*B, n, E]` over all discrete ones."""
        if action is None:
            return self.evaluate_all(observation)
        return self.evaluate(observation, action.unsqueeze(-2)).squeeze(-2)

    def evaluate(self, observation: torch.Tensor, actions: torch.Tensor, weights=None, biases=None) -> torch.Tensor:
        """Q of every member for K continuous actions per state.

        observation `[*B, obs_dim]`, actions `[*B, K, act_dim]` -> `[*B, K, num_members]`.
        `weights`/`biases` replace the module's parameters (e.g. detached ones for the actor loss).
        """
        weights = list(self.weights) if weights is None else weights
        biases = list(self.biases) if biases is None else biases
        batch_shape = observation.shape[:-1]
        num_actions = actions.shape[-2]
        # One row (s, a) per state and action, shared by all members: [S*K, obs+act].
        rows = torch.cat([observation.unsqueeze(-2).expand(*actions.shape[:-1], self.obs_dim), actions], -1)
        rows = rows.reshape(-1, rows.shape[-1])
        if (not self.layer_norm and self.use_onednn and rows.shape[0] >= self.onednn_min_rows
                and onednn_ensemble.available_for(rows, weights, self.activation)):
            q = onednn_ensemble.ensemble_q(rows, weights, biases)  # [E, S*K]
        else:
            hidden = self.hidden(rows, weights, biases)
            # The `fan_in -> 1` output layer as a dot product per row: faster than a batched
            # matrix-vector matmul here, forward and backward.
            q = torch.linalg.vecdot(hidden, weights[-1].transpose(-1, -2)) + biases[-1].squeeze(-1)  # [E, S*K]
        return q.movedim(0, -1).reshape(*batch_shape, num_actions, self.num_members)

    def evaluate_all(self, observation: torch.Tensor, weights=None, biases=None) -> torch.Tensor:
        """Q of every member for every discrete action: observation `[*B, obs_dim]` -> `[*B, n, num_members]`."""
        weights = list(self.weights) if weights is None else weights
        biases = list(self.biases) if biases is None else biases
        batch_shape = observation.shape[:-1]
        hidden = self.hidden(observation.reshape(-1, self.obs_dim), weights, biases)
        q = torch.baddbmm(biases[-1], hidden, weights[-1])  # [E, S, n]
        return q.permute(1, 2, 0).reshape(*batch_shape, q.shape[-1], self.num_members)

    def hidden(self, rows: torch.Tensor, weights, biases) -> torch.Tensor:
        """The last hidden layer of every member on shared rows `[R, in]`: `[E, R, hidden]`, by batched matmuls."""
        hidden = rows.expand(self.num_members, -1, -1)  # [E, R, in], a view
        for w, b in zip(weights[:-1], biases[:-1]):
            hidden = torch.baddbmm(b, hidden, w)
            if self.layer_norm:
                hidden = F.layer_norm(hidden, hidden.shape[-1:])
            hidden = self.activation(hidden)
        return hidden


def make_critics(observation_spec: TensorSpec, action_spec: TensorSpec, cfg: NetworkConfig) -> ValueOperator:
    """The critic ensemble as one `ValueOperator`: writes `state_action_value` `[*B, E]` (continuous
    actions) or `action_value` `[*B, n, E]` (discrete actions, Q of every action)."""
    activation = ACTIVATION_CLASSES[cfg.activation]
    if is_discrete(action_spec):
        ensemble = EnsembleMLP(observation_spec.shape[-1], 0, cfg.critic_hidden, cfg.num_critics, activation,
                               cfg.critic_layer_norm, num_discrete=int(action_spec.space.n))
        return ValueOperator(ensemble, in_keys=["observation"], out_keys=["action_value"])
    ensemble = EnsembleMLP(observation_spec.shape[-1], action_spec.shape[-1], cfg.critic_hidden,
                           cfg.num_critics, activation, cfg.critic_layer_norm)
    return ValueOperator(ensemble, in_keys=["observation", "action"], out_keys=["state_action_value"])

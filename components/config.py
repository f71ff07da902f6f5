"""Typed options of the components: networks, loss, optimiser.

Plain dataclasses with a docstring per field, importable without torch, so that loading a config
(or `cqlsac config`) costs no deep-learning import. Measured effects of the defaults are in
`docs/`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ACTIVATIONS = ("relu", "tanh", "elu", "silu")
# For configs validated by pydantic: unknown keys are errors, and so are inf and nan (a `utd_ratio` of
# .inf would loop for ever).
STRICT = {"extra": "forbid", "allow_inf_nan": False}


@dataclass
class NetworkConfig:
    """Sizes of the actor and critic MLPs."""

    __pydantic_config__ = STRICT

    actor_hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the actor."""
    critic_hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of each critic."""
    activation: str = "relu"
    """Hidden activation of both networks: relu, tanh, elu or silu."""
    num_critics: int = 2
    """Critics in the ensemble; the TD target takes the minimum over them (clipped double-Q with 2)."""
    scale_lb: float = 1e-4
    """Lower bound of the Gaussian scale before the tanh squashing."""
    critic_layer_norm: bool = False
    """Layer normalisation (no affine) before each hidden activation of the critics: it bounds how far
    their values extrapolate to actions and states the data does not hold (RLPD)."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.num_critics < 1:
            raise ValueError(f"num_critics must be at least 1, got {self.num_critics}")
        self.actor_hidden = tuple(int(h) for h in self.actor_hidden)
        self.critic_hidden = tuple(int(h) for h in self.critic_hidden)
        for name in ("actor_hidden", "critic_hidden"):
            if any(h < 1 for h in getattr(self, name)):
                raise ValueError(f"{name} sizes must be positive, got {list(getattr(self, name))}")


@dataclass
class LossConfig:
    """Options of the CQL-SAC loss (docs/loss.md); `cql_weight = 0` with `backup_entropy = True` is SAC."""

    __pydantic_config__ = STRICT

    gamma: float = 0.99
    """Discount. Bootstrapping stops on `terminated` only; a time-limit truncation still bootstraps."""
    backup_entropy: bool = True
    """beta in the TD target: true = SAC's soft backup, false = the deterministic backup of offline CQL code."""
    max_q_backup: bool = False
    """Max-Q backup (CQL paper, AntMaze): max over `num_actions` next actions of the min over target critics."""
    cql_weight: float = 5.0
    """w, the weight of the CQL(H) gap; 0 turns the regulariser off (SAC)."""
    num_actions: int = 10
    """N, actions per set (uniform, pi(.|s), pi(.|s')) in the logsumexp."""
    cql_temperature: float = 1.0
    """T, the temperature of the logsumexp."""
    cql_subtracted: Literal["data_action", "mean_over_actions"] = "data_action"
    """What the CQL gap subtracts from the logsumexp: Q at the data action (CQL(H) as derived), or, for
    discrete actions only, the mean of Q over every action (what the seed's code computes)."""
    lagrange: bool = False
    """Lagrange (dual) form: alpha' is tuned so that the gap approaches `lagrange_threshold`."""
    lagrange_threshold: float = 5.0
    """The target gap tau of the Lagrange form; set it relative to the reward scale."""
    initial_alpha_prime: float = 1.0
    """Initial alpha' of the Lagrange form."""
    calibrated: bool = False
    """Cal-QL: policy-action Q-values in the logsumexp are bounded below by the Monte-Carlo return-to-go."""
    target_subset: int | None = None
    """The TD target's minimum runs over this many target critics, drawn at random each update
    (REDQ, RLPD; null: over all of them)."""
    actor_q: Literal["min", "mean"] = "min"
    """How the actor combines the critics' values: their minimum (clipped double-Q) or their mean
    (REDQ and RLPD with large ensembles)."""
    bc_steps: int = 0
    """Behaviour-cloning warm start: the actor maximises log pi(a_data|s) for the first K updates."""
    initial_alpha: float = 1.0
    """Initial SAC temperature alpha."""
    target_entropy: float | None = None
    """Target entropy of the automatic temperature; null means -dim(A) for continuous actions and
    0.98 log(n) for n discrete ones (docs/loss.md section 7)."""

    def __post_init__(self):
        checks = {
            "gamma": 0.0 <= self.gamma <= 1.0,
            "cql_weight": self.cql_weight >= 0,
            "num_actions": self.num_actions >= 1,
            "cql_temperature": self.cql_temperature > 0,
            "initial_alpha_prime": self.initial_alpha_prime > 0,
            "initial_alpha": self.initial_alpha > 0,
            "bc_steps": self.bc_steps >= 0,
            "target_subset": self.target_subset is None or self.target_subset >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid loss option(s): {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


@dataclass
class OptimConfig:
    """Learning rates of the four parameter groups and the Polyak rate of the target critics."""

    __pydantic_config__ = STRICT

    actor_lr: float = 1e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    alpha_lr: float = 3e-4
    """Adam learning rate of log alpha (the SAC temperature)."""
    alpha_prime_lr: float = 3e-4
    """Adam learning rate of log alpha' (Lagrange form only)."""
    tau: float = 0.005
    """Polyak rate: target <- (1 - tau) target + tau online, after every update."""
    critic_grad_clip: float | None = None
    """Clip the gradient norm of each critic to this before the step (null: no clipping)."""
    actor_every: int = 1
    """The actor and the temperature are updated at every k-th update, the critics at every one (several
    critic updates per actor update, as WSRL and RLPD make them)."""

    def __post_init__(self):
        for name in ("actor_lr", "critic_lr", "alpha_lr", "alpha_prime_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.actor_every < 1:
            raise ValueError(f"actor_every must be at least 1, got {self.actor_every}")
        if self.critic_grad_clip is not None and not self.critic_grad_clip > 0:
            raise ValueError(f"critic_grad_clip must be positive or null, got {self.critic_grad_clip}")

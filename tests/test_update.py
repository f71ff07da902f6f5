"""`update_step` against a hand computation: per-loss gradients, Adam's first step per group, Polyak."""

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Unbounded

from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.networks import EnsembleMLP, make_actor, make_critics
from cqlsac.components.update import clip_grad_norm_per_member, make_optimizer, polyak_update, update_step

OBS_DIM, ACT_DIM, BATCH, NUM_ACTIONS = 3, 2, 6, 4
# Four different rates, so that a parameter in the wrong group shows.
OPTIM = OptimConfig(actor_lr=1e-2, critic_lr=3e-3, alpha_lr=7e-4, alpha_prime_lr=2e-4, tau=0.1)


def small_loss(discrete: bool = False, **options) -> CQLSACLoss:
    torch.manual_seed(0)
    net = NetworkConfig(actor_hidden=(8,), critic_hidden=(8,))
    obs_spec = Unbounded(shape=(OBS_DIM,))
    act_spec = (Categorical(NUM_ACTIONS) if discrete else
                Bounded(low=-torch.ones(ACT_DIM), high=torch.ones(ACT_DIM), shape=(ACT_DIM,)))
    return CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net),
                      LossConfig(num_actions=2, **options))


def small_batch(discrete: bool = False) -> TensorDict:
    g = torch.Generator().manual_seed(1)
    zeros = torch.zeros(BATCH, 1, dtype=torch.bool)
    action = (torch.randint(NUM_ACTIONS, (BATCH,), generator=g) if discrete
              else torch.rand(BATCH, ACT_DIM, generator=g) * 1.8 - 0.9)
    return TensorDict({"observation": torch.randn(BATCH, OBS_DIM, generator=g),
                       "action": action,
                       "next": {"observation": torch.randn(BATCH, OBS_DIM, generator=g),
                                "reward": torch.randn(BATCH, 1, generator=g), "done": zeros, "terminated": zeros}},
                      [BATCH])


def test_polyak_update_moves_each_target_weight_by_tau():
    target, source = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, -2.0]]))
        target.bias.fill_(4.0)
        source.weight.copy_(torch.tensor([[3.0, 2.0]]))
        source.bias.fill_(0.0)
    polyak_update(target, source, tau=0.25)
    torch.testing.assert_close(target.weight, torch.tensor([[1.5, -1.0]]))  # 0.75 * target + 0.25 * source
    torch.testing.assert_close(target.bias, torch.tensor([3.0]))
    torch.testing.assert_close(source.weight, torch.tensor([[3.0, 2.0]]))  # the source is left alone


def test_clipping_scales_each_critics_own_gradient_to_the_norm():
    """Each member's gradient over all its layers, scaled by min(1, max_norm / (its norm + 1e-6))."""
    ensemble = EnsembleMLP(2, 1, (2,), num_members=3)
    params = list(ensemble.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    # Member 0: gradient entries 3 and 4 (norm 5); member 1: 0.3 and 0.4 (norm 0.5); member 2: none.
    params[0].grad[0, 0, 0], params[-1].grad[0, 0, 0] = 3.0, 4.0
    params[0].grad[1, 0, 0], params[-1].grad[1, 0, 0] = 0.3, 0.4
    clip_grad_norm_per_member(ensemble, max_norm=1.0)
    scale = 1.0 / (5.0 + 1e-6)
    assert params[0].grad[0, 0, 0].item() == pytest.approx(3.0 * scale, rel=1e-6)
    assert params[-1].grad[0, 0, 0].item() == pytest.approx(4.0 * scale, rel=1e-6)
    assert (params[0].grad[1, 0, 0].item(), params[-1].grad[1, 0, 0].item()) == pytest.approx((0.3, 0.4))  # under the norm
    assert all(float(p.grad[2].abs().sum()) == 0.0 for p in params)
    assert sum(float(p.grad[0].pow(2).sum()) for p in params) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("options, has_alpha_prime", [(dict(), False), (dict(lagrange=True), True),
                                                      (dict(lagrange=True, cql_weight=0.0), False)])
def test_optimizer_groups_hold_their_own_parameters_and_rates(options, has_alpha_prime):
    loss = small_loss(**options)
    groups = make_optimizer(loss, OPTIM).param_groups
    expected = [(list(loss.actor_network.parameters()), OPTIM.actor_lr),
                (list(loss.critic_network.parameters()), OPTIM.critic_lr),
                ([loss.log_alpha], OPTIM.alpha_lr)]
    if has_alpha_prime:
        expected.append(([loss.log_alpha_prime], OPTIM.alpha_prime_lr))
    assert len(groups) == len(expected)
    for group, (params, lr) in zip(groups, expected):
        assert group["lr"] == lr
        assert [id(p) for p in group["params"]] == [id(p) for p in params]


def clipped_per_critic(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Each critic's gradient (its slice of every stacked parameter) times min(1, max_norm / (norm + 1e-6)),
    critic by critic."""
    out = [g.clone() for g in grads]
    for member in range(grads[0].shape[0]):
        norm = math.sqrt(sum(float(g[member].pow(2).sum()) for g in grads))
        for g in out:
            g[member] *= min(1.0, max_norm / (norm + 1e-6))
    return out


@pytest.mark.parametrize("options, clip", [(dict(), None), (dict(lagrange=True), None), (dict(), 0.05)])
def test_update_step_is_adams_first_step_on_each_loss_then_polyak(options, clip):
    """Adam reads each parameter's gradient of its own loss, each critic's clipped to norm `clip`, and its
    first step moves the parameter by lr * g / (|g| + eps)."""
    loss = small_loss(**options)
    optimizer = make_optimizer(loss, OPTIM)
    batch = small_batch()
    owners = [("loss_actor", list(loss.actor_network.parameters()), OPTIM.actor_lr),
              ("loss_qvalue", list(loss.critic_network.parameters()), OPTIM.critic_lr),
              ("loss_alpha", [loss.log_alpha], OPTIM.alpha_lr)]
    if loss.tunes_alpha_prime:
        owners.append(("loss_alpha_prime", [loss.log_alpha_prime], OPTIM.alpha_prime_lr))
    torch.manual_seed(5)
    losses = loss.compute(batch, loss.draw_noise(BATCH))  # the noise update_step will draw below
    expected = {}  # parameter -> its value after the step
    expected_grads = {}  # parameter -> the gradient of its own loss
    for key, params, lr in owners:
        grads = torch.autograd.grad(losses[key], params, retain_graph=True)
        if key == "loss_qvalue" and clip is not None:
            assert max(float(g.flatten(1).norm(dim=1).max()) for g in grads) > clip  # the clip binds
            grads = clipped_per_critic(grads, clip)
        expected_grads.update(zip(params, grads))
        expected.update({p: p.detach() - lr * g / (g.abs() + 1e-8) for p, g in zip(params, grads)})
    expected_targets = [t.detach() + OPTIM.tau * (expected[c] - t.detach())
                        for t, c in zip(loss.target_critic.parameters(), loss.critic_network.parameters())]
    # Adam's first step sees only the sign of a gradient: its size is checked where Adam reads it.
    seen_grads = {}
    adam_step = optimizer.step

    def recording_step(*args, **kwargs):
        seen_grads.update({p: p.grad.clone() for group in optimizer.param_groups for p in group["params"]})
        return adam_step(*args, **kwargs)

    optimizer.step = recording_step

    torch.manual_seed(5)
    update_step(loss, optimizer, batch, OPTIM.tau, critic_grad_clip=clip)

    assert seen_grads.keys() == expected_grads.keys()
    for param, grad in expected_grads.items():
        torch.testing.assert_close(seen_grads[param], grad, rtol=1e-5, atol=1e-7)
    for param, value in expected.items():
        torch.testing.assert_close(param.detach(), value, rtol=1e-5, atol=1e-6)
    for target, value in zip(loss.target_critic.parameters(), expected_targets):
        torch.testing.assert_close(target, value, rtol=1e-5, atol=1e-6)
    assert int(loss.update_count) == 1


def test_with_actor_every_k_the_actor_and_temperature_move_on_every_kth_update_only():
    from cqlsac.components.envs import make_env
    from cqlsac.components.update import make_agent

    torch.manual_seed(0)
    agent = make_agent(make_env("Pendulum-v1"), NetworkConfig(actor_hidden=(8,), critic_hidden=(8,)), LossConfig(),
                       OptimConfig(actor_every=3))
    batch = TensorDict({"observation": torch.randn(16, 3), "action": torch.rand(16, 1) * 4 - 2,
                        "next": {"observation": torch.randn(16, 3), "reward": torch.randn(16, 1),
                                 "done": torch.zeros(16, 1, dtype=torch.bool),
                                 "terminated": torch.zeros(16, 1, dtype=torch.bool)}}, [16])
    actor_moves, alpha_moves, critic_moves = [], [], []
    for _ in range(6):
        actor, critic = ([p.detach().clone() for p in module.parameters()]
                         for module in (agent.loss.actor_network, agent.loss.critic_network))
        alpha = agent.loss.log_alpha.detach().clone()
        agent.update(batch)
        actor_moves.append(any(not torch.equal(a, b) for a, b in zip(actor, agent.loss.actor_network.parameters())))
        alpha_moves.append(not torch.equal(alpha, agent.loss.log_alpha))
        critic_moves.append(any(not torch.equal(a, b) for a, b in zip(critic, agent.loss.critic_network.parameters())))
    assert actor_moves == alpha_moves == [False, False, True, False, False, True] and all(critic_moves)


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
@pytest.mark.parametrize("options", [dict(), dict(cql_weight=0.0), dict(lagrange=True), dict(bc_steps=5)])
def test_a_critic_only_update_is_the_full_losses_without_the_actors(options, discrete):
    """`update_actor=False` skips the actor's and the temperature's losses: the step equals a full
    computation from the same noise with those two losses left out of the sum, and it draws the same noise."""
    loss = small_loss(discrete, **options)
    optimizer = make_optimizer(loss, OPTIM)
    batch = small_batch(discrete)
    torch.manual_seed(5)
    full = loss.compute(batch, loss.draw_noise(BATCH))
    after_full = torch.rand(())
    total = sum(value for key, value in full.items() if key.startswith("loss_") and key not in ("loss_actor", "loss_alpha"))
    params = [p for p in loss.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    expected = {p: p.detach().clone() if g is None else p.detach() - lr_of(optimizer, p) * g / (g.abs() + 1e-8)
                for p, g in zip(params, grads)}
    expected_targets = [t.detach() + OPTIM.tau * (expected[c] - t.detach())
                        for t, c in zip(loss.target_critic.parameters(), loss.critic_network.parameters())]

    torch.manual_seed(5)
    losses = update_step(loss, optimizer, batch, OPTIM.tau, update_actor=False)

    assert not {"loss_actor", "loss_alpha", "entropy"} & set(losses.keys())
    torch.testing.assert_close(losses["loss_qvalue"], full["loss_qvalue"].detach(), rtol=0, atol=0)
    assert torch.rand(()) == after_full  # the same noise was drawn
    for param, value in expected.items():
        torch.testing.assert_close(param.detach(), value, rtol=1e-6, atol=1e-7)
    assert torch.equal(loss.log_alpha.detach(), expected[loss.log_alpha])  # the temperature stays
    for target, value in zip(loss.target_critic.parameters(), expected_targets):  # Polyak on every update
        torch.testing.assert_close(target, value, rtol=1e-6, atol=1e-7)


def lr_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    return next(group["lr"] for group in optimizer.param_groups if any(p is param for p in group["params"]))

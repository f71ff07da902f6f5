"""The CQL-SAC loss with discrete actions against an independent plain computation.

The reference loops over critics, states and actions: each critic member is evaluated state by
state with its own slice of the stacked weights, the policy's probabilities come from
`torch.distributions.Categorical`, and every expectation and logsumexp is an explicit sum over the
actions. It shares only the networks' parameters with the module under test, and runs in float64.
"""

import itertools
import math

import pytest
import torch
from loss_reference import penalised_critic_loss
from tensordict import TensorDict
from torch.distributions import Categorical
from torchrl.data import Categorical as CategoricalSpec
from torchrl.data import Unbounded

from cqlsac.components.config import LossConfig, NetworkConfig
from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.networks import make_actor, make_critics

OBS_DIM, NUM_ACTIONS, BATCH = 3, 4, 5
TOL = dict(rtol=1e-5, atol=1e-5)


def build_loss(seed=0, num_critics=2, critic_layer_norm=False, **options) -> CQLSACLoss:
    torch.manual_seed(seed)
    obs_spec = Unbounded(shape=(OBS_DIM,))
    act_spec = CategoricalSpec(NUM_ACTIONS)
    net = NetworkConfig(actor_hidden=(8, 8), critic_hidden=(8, 8), num_critics=num_critics,
                        critic_layer_norm=critic_layer_norm)
    loss = CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net), LossConfig(**options))
    with torch.no_grad():
        for p in loss.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
        loss.log_alpha.fill_(math.log(0.3))
        loss.log_alpha_prime.fill_(math.log(2.5))
    return loss.double()


def make_batch(seed=1, terminated=None, truncated=None) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    term = torch.tensor([[False], [True], [False], [False], [True]]) if terminated is None else terminated
    trunc = torch.tensor([[False], [False], [True], [False], [False]]) if truncated is None else truncated
    n = term.shape[0]
    return TensorDict({
        "observation": torch.randn(n, OBS_DIM, generator=g, dtype=torch.float64),
        "action": torch.randint(NUM_ACTIONS, (n,), generator=g),
        "mc_return": torch.randn(n, 1, generator=g, dtype=torch.float64) * 3,
        "next": {"observation": torch.randn(n, OBS_DIM, generator=g, dtype=torch.float64),
                 "reward": torch.randn(n, 1, generator=g, dtype=torch.float64),
                 "terminated": term, "truncated": trunc, "done": term | trunc},
    }, batch_size=[n])


# ---- the plain reference -----------------------------------------------------------------
def ref_q_values(ensemble, member, obs):
    """Q(s, .) of one critic member at one state, layer by layer: `[n]`."""
    x = obs
    layers = list(zip(ensemble.weights, ensemble.biases))
    for depth, (w, b) in enumerate(layers):
        x = x @ w[member] + b[member, 0]
        if depth < len(layers) - 1:
            if ensemble.layer_norm:  # no affine parameters, the biased variance, eps 1e-5
                x = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-5)
            x = torch.relu(x)
    return x


def ref_policy(loss, obs) -> Categorical:
    logits = loss.actor_network.module[0](TensorDict({"observation": obs}, []))["logits"]
    return Categorical(logits=logits)


def reference_losses(loss, batch, noise=None) -> dict:
    cfg = loss.cfg
    target_members = noise["critic_subset"].tolist() if cfg.target_subset is not None else range(loss.critic.num_members)
    alpha = loss.log_alpha.exp()
    members = range(loss.critic.num_members)
    entropy = cfg.target_entropy if cfg.target_entropy is not None else 0.98 * math.log(NUM_ACTIONS)
    actor_terms, alpha_terms, entropies, targets = [], [], [], []
    q_data = [[] for _ in members]
    gaps = [[] for _ in members]
    for b in range(batch.shape[0]):
        s, a = batch["observation"][b], int(batch["action"][b])
        pi = ref_policy(loss, s)
        q_each = torch.stack([ref_q_values(loss.critic, e, s) for e in members])
        q_min = q_each.mean(0) if cfg.actor_q == "mean" else q_each.min(0).values
        expected_log_pi = sum(pi.probs[k] * pi.log_prob(torch.tensor(k)) for k in range(NUM_ACTIONS))
        value = sum(pi.probs[k] * q_min[k] for k in range(NUM_ACTIONS))
        if cfg.bc_steps and int(loss.update_count) < cfg.bc_steps:
            value = pi.log_prob(torch.tensor(a))
        actor_terms.append(alpha * expected_log_pi - value)
        alpha_terms.append(-loss.log_alpha * (expected_log_pi + entropy))
        entropies.append(-expected_log_pi)
        # TD target.
        s2 = batch["next", "observation"][b]
        pi2 = ref_policy(loss, s2)
        q2 = torch.stack([ref_q_values(loss.target_critic, e, s2) for e in target_members]).min(0).values
        soft = [q2[k] - float(cfg.backup_entropy) * alpha * pi2.log_prob(torch.tensor(k)) for k in range(NUM_ACTIONS)]
        if cfg.max_q_backup:
            next_value = soft[int(q2.argmax())]
        else:
            next_value = sum(pi2.probs[k] * soft[k] for k in range(NUM_ACTIONS))
        bootstrap = 0.0 if bool(batch["next", "terminated"][b]) else 1.0
        targets.append(batch["next", "reward"][b, 0] + cfg.gamma * bootstrap * next_value)
        # CQL(H): a logsumexp over every action per critic.
        for e in members:
            q = ref_q_values(loss.critic, e, s)
            q_data[e].append(q[a])
            values = [torch.maximum(q[k], batch["mc_return"][b, 0]) if cfg.calibrated else q[k]
                      for k in range(NUM_ACTIONS)]
            temperature = cfg.cql_temperature
            lse = temperature * torch.log(sum(torch.exp(v / temperature) for v in values))
            subtracted = q[a] if cfg.cql_subtracted == "data_action" else sum(q) / NUM_ACTIONS
            gaps[e].append(lse - subtracted)
    n = batch.shape[0]
    out = {"loss_actor": sum(actor_terms) / n, "loss_alpha": sum(alpha_terms) / n, "entropy": sum(entropies) / n,
           "td_target": sum(targets) / n, "alpha": alpha}
    td_losses = [sum((q_data[e][b] - targets[b]) ** 2 for b in range(n)) / n for e in members]
    gap_means = [sum(gaps[e]) / n for e in members]
    out["q_data"] = sum(sum(q_data[e]) for e in members) / (n * len(members))
    if cfg.cql_weight == 0:
        out["loss_qvalue"] = sum(td_losses)
        return out
    out["cql_gap"] = sum(gap_means) / len(gap_means)
    return {**out, **penalised_critic_loss(cfg, loss.log_alpha_prime, td_losses, gap_means)}


OPTION_GRID = [
    dict(zip(("backup_entropy", "max_q_backup", "lagrange", "cql_temperature", "calibrated", "bc_steps",
              "cql_subtracted"), values))
    for values in itertools.product([True, False], [False, True], [False, True], [1.0, 0.5], [False, True], [0, 5],
                                    ["data_action", "mean_over_actions"])
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_module_matches_plain_reference(options):
    loss = build_loss(**options)
    batch = make_batch()
    got = loss.compute(batch, loss.draw_noise(BATCH))
    with torch.no_grad():
        expected = reference_losses(loss, batch)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], torch.as_tensor(value).to(got[key]), **TOL, msg=f"{key} differs")


@pytest.mark.parametrize("options", [dict(target_subset=2), dict(actor_q="mean", target_subset=3, lagrange=True),
                                     dict(critic_layer_norm=True, target_subset=2)])
def test_critic_ensembles_with_random_subset_targets_match_the_reference(options):
    loss = build_loss(num_critics=5, **options)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    assert set(noise) == {"critic_subset"}
    got = loss.compute(batch, noise)
    with torch.no_grad():
        expected = reference_losses(loss, batch, noise)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], torch.as_tensor(value).to(got[key]), **TOL, msg=f"{key} differs")


def test_sac_mode_matches_reference_and_draws_no_noise():
    loss = build_loss(cql_weight=0.0, target_entropy=-4.0)
    assert loss.draw_noise(BATCH) == {}
    batch = make_batch()
    got = loss.compute(batch, {})
    with torch.no_grad():
        expected = reference_losses(loss, batch)
    for key in ("loss_actor", "loss_qvalue", "loss_alpha", "td_target", "entropy"):
        torch.testing.assert_close(got[key], torch.as_tensor(expected[key]).to(got[key]), **TOL)
    assert got["cql_gap"] == 0


# ---- closed-form cases -------------------------------------------------------------------
@pytest.mark.parametrize("constant", [0.0, 7.0])
@torch.no_grad()
def test_constant_critic_gives_logsumexp_c_plus_log_n(constant):
    loss = build_loss(cql_weight=1.0)
    for ensemble in (loss.critic, loss.target_critic):
        ensemble.weights[-1].zero_()
        ensemble.biases[-1].fill_(constant)
    got = loss.compute(make_batch(), {})
    # logsumexp over n equal values c is c + log n; the gap subtracts Q(s, a_data) = c.
    assert got["cql_gap"].item() == pytest.approx(math.log(NUM_ACTIONS), rel=1e-12)
    assert got["q_data"].item() == pytest.approx(constant)


def test_default_target_entropy_is_near_the_uniform_policys():
    assert build_loss().target_entropy.item() == pytest.approx(0.98 * math.log(NUM_ACTIONS))
    assert build_loss(target_entropy=-4.0).target_entropy.item() == -4.0


@torch.no_grad()
def test_terminated_does_not_bootstrap_and_truncated_does():
    loss = build_loss(cql_weight=0.0)
    for ensemble in (loss.critic, loss.target_critic):
        ensemble.weights[-1].zero_()
        ensemble.biases[-1].fill_(4.0)
    for terminated, truncated in ((True, False), (False, True), (False, False)):
        batch = make_batch(terminated=torch.tensor([[terminated]]), truncated=torch.tensor([[truncated]]))
        batch["next", "reward"].fill_(1.5)
        got = loss.compute(batch, {})["td_target"].item()
        pi2 = ref_policy(loss, batch["next", "observation"][0])
        entropy = pi2.entropy().item()
        expected = 1.5 if terminated else 1.5 + loss.cfg.gamma * (4.0 + loss.log_alpha.exp().item() * entropy)
        assert got == pytest.approx(expected, rel=1e-7)  # gamma is held in float32 by the estimator


# ---- gradients ------------------------------------------------------------------------------
def own_parameters(loss) -> dict[str, list]:
    """Each loss's own parameters: the only ones it may move."""
    return {"loss_actor": list(loss.actor_network.parameters()), "loss_qvalue": list(loss.critic_network.parameters()),
            "loss_alpha": [loss.log_alpha], "loss_alpha_prime": [loss.log_alpha_prime]}


def gradients(value, params) -> list[torch.Tensor]:
    """d value / d params, zeros where a parameter is not reached."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("key", ["loss_actor", "loss_qvalue", "loss_alpha", "loss_alpha_prime"])
def test_each_loss_moves_only_its_own_parameters(key):
    loss = build_loss(lagrange=True)
    out = loss.compute(make_batch(), {})
    for owner, params in own_parameters(loss).items():
        moved = any(torch.count_nonzero(g) > 0 for g in gradients(out[key], params))
        assert moved == (owner == key), f"{key} {'moves' if moved else 'does not move'} the parameters of {owner}"


@pytest.mark.parametrize("options", [dict(lagrange=True, calibrated=True), dict(bc_steps=10),
                                     dict(max_q_backup=True, backup_entropy=False, cql_temperature=0.5),
                                     dict(cql_subtracted="mean_over_actions", target_entropy=-4.0),
                                     dict(cql_weight=0.0), dict(critic_layer_norm=True, lagrange=True)], ids=str)
def test_gradients_match_autograd_through_the_reference(options):
    """On each loss's own parameters, every gradient (zero ones included) equals the plain reference's."""
    loss = build_loss(**options)
    batch = make_batch()
    got = loss.compute(batch, {})
    expected = reference_losses(loss, batch)
    for key, params in own_parameters(loss).items():
        if key not in expected:
            assert key not in got.keys() or not got[key].requires_grad, key
            continue
        for i, (g, e) in enumerate(zip(gradients(got[key], params), gradients(expected[key], params))):
            torch.testing.assert_close(g, e, **TOL, msg=f"{key}: parameter {i}")


def test_mean_over_actions_is_for_discrete_actions_only():
    from torchrl.data import Bounded

    obs_spec, act_spec = Unbounded(shape=(OBS_DIM,)), Bounded(low=-1.0, high=1.0, shape=(2,))
    net = NetworkConfig(actor_hidden=(8,), critic_hidden=(8,))
    with pytest.raises(ValueError, match="cql_subtracted='mean_over_actions' is for discrete actions"):
        CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net),
                   LossConfig(cql_subtracted="mean_over_actions"))

"""The CQL-SAC loss against an independent plain computation.

The reference below loops over critics, states and actions, evaluates each critic member with its
own slice of the stacked weights, and scores actions with `torch.distributions.Normal`; it shares
only the networks' parameters and the noise with the module under test. It runs in float64 so that
differences above 1e-5 are the module's, not rounding.
"""

import itertools
import math

import pytest
import torch
from loss_reference import penalised_critic_loss
from tensordict import TensorDict
from torch.distributions import Normal
from torchrl.data import Bounded, Unbounded
from torchrl.modules import TanhNormal

from cqlsac.components.config import LossConfig, NetworkConfig
from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.networks import make_actor, make_critics

OBS_DIM, ACT_DIM, BATCH = 3, 2, 5
LOW = torch.tensor([-2.0, -1.0])
HIGH = torch.tensor([2.0, 3.0])
TOL = dict(rtol=1e-5, atol=1e-5)


def build_loss(seed=0, dtype=torch.float64, critic_hidden=(8, 8), num_critics=2, critic_layer_norm=False,
               **options) -> CQLSACLoss:
    torch.manual_seed(seed)
    obs_spec = Unbounded(shape=(OBS_DIM,))
    act_spec = Bounded(low=LOW, high=HIGH, shape=(ACT_DIM,))
    net = NetworkConfig(actor_hidden=(8, 8), critic_hidden=critic_hidden, num_critics=num_critics,
                        critic_layer_norm=critic_layer_norm)
    loss = CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net),
                      LossConfig(**{"num_actions": 3, **options}))
    with torch.no_grad():
        # Targets differ from the online critics, and alpha / alpha' are away from 1.
        for p in loss.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
        loss.log_alpha.fill_(math.log(0.3))
        loss.log_alpha_prime.fill_(math.log(2.5))
    return loss.to(dtype)


def make_batch(seed=1, dtype=torch.float64, terminated=None, truncated=None) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    term = torch.tensor([[False], [True], [False], [False], [True]]) if terminated is None else terminated
    trunc = torch.tensor([[False], [False], [True], [False], [False]]) if truncated is None else truncated
    n = term.shape[0]
    unit = torch.rand(n, ACT_DIM, generator=g) * 1.8 - 0.9
    return TensorDict({
        "observation": torch.randn(n, OBS_DIM, generator=g, dtype=dtype),
        "action": (LOW + (HIGH - LOW) * (unit + 1) / 2).to(dtype),
        "mc_return": torch.randn(n, 1, generator=g, dtype=dtype) * 3,
        "next": {
            "observation": torch.randn(n, OBS_DIM, generator=g, dtype=dtype),
            "reward": torch.randn(n, 1, generator=g, dtype=dtype),
            "terminated": term,
            "truncated": trunc,
            "done": term | trunc,
        },
    }, batch_size=[n])


# ---- the plain reference -----------------------------------------------------------------
def ref_q(ensemble, member, obs, act):
    """Q of one critic member at one (s, a), layer by layer."""
    x = torch.cat([obs, act])
    layers = list(zip(ensemble.weights, ensemble.biases))
    for depth, (w, b) in enumerate(layers):
        x = x @ w[member] + b[member, 0]
        if depth < len(layers) - 1:
            if ensemble.layer_norm:  # no affine parameters, the biased variance, eps 1e-5
                x = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-5)
            x = torch.relu(x)
    return x[0]


def ref_policy(loss, obs):
    return loss.actor_network.module[0](TensorDict({"observation": obs}, [])).select("loc", "scale").values()


def ref_sample(loss, obs, xi):
    loc, scale = ref_policy(loss, obs)
    pre = loc + scale * xi
    action = LOW.to(pre) + (HIGH - LOW).to(pre) * (torch.tanh(pre) + 1) / 2
    log_prob = Normal(loc, scale).log_prob(pre) - torch.log(1 - torch.tanh(pre) ** 2) - torch.log((HIGH - LOW).to(pre) / 2)
    return action, log_prob.sum()


def ref_log_prob(loss, obs, action):
    loc, scale = ref_policy(loss, obs)
    unit = (2 * (action - LOW.to(action)) / (HIGH - LOW).to(action) - 1)
    pre = torch.atanh(unit)
    log_prob = Normal(loc, scale).log_prob(pre) - torch.log(1 - unit ** 2) - torch.log((HIGH - LOW).to(action) / 2)
    return log_prob.sum()


def reference_losses(loss, batch, noise):
    cfg = loss.cfg
    critics, targets = loss.critic, loss.target_critic
    members = range(critics.num_members)
    alpha = loss.log_alpha.exp()
    entropy_target = -ACT_DIM if cfg.target_entropy is None else cfg.target_entropy
    n_batch = batch.shape[0]
    target_members = noise["critic_subset"].tolist() if cfg.target_subset is not None else members
    actor_terms, alpha_terms, targets_y, log_pis, q_datas = [], [], [], [], []
    for b in range(n_batch):
        s, s_next = batch["observation"][b], batch["next", "observation"][b]
        a_pi, logp_pi = ref_sample(loss, s, noise["actor"][b])
        log_pis.append(logp_pi)
        if int(loss.update_count) < cfg.bc_steps:
            objective = ref_log_prob(loss, s, batch["action"][b])
        else:
            values = [ref_q(critics, i, s, a_pi) for i in members]
            objective = sum(values) / len(values) if cfg.actor_q == "mean" else min(values)
        actor_terms.append(alpha * logp_pi - objective)
        alpha_terms.append(-loss.log_alpha * (logp_pi + entropy_target))
        candidates = []
        for m in range(noise["next"].shape[1]):
            a_next, logp_next = ref_sample(loss, s_next, noise["next"][b, m])
            q_min = min(ref_q(targets, i, s_next, a_next) for i in target_members)
            candidates.append((q_min, q_min - float(cfg.backup_entropy) * alpha * logp_next))
        next_value = max(candidates, key=lambda c: c[0])[1]
        not_terminated = 1.0 - float(batch["next", "terminated"][b])
        targets_y.append(batch["next", "reward"][b, 0] + cfg.gamma * not_terminated * next_value)

    td_losses, gaps = [], []
    for i in members:
        squared, gap_terms = [], []
        for b in range(n_batch):
            s = batch["observation"][b]
            q_data = ref_q(critics, i, s, batch["action"][b])
            q_datas.append(q_data)
            squared.append((q_data - targets_y[b]) ** 2)
            if cfg.cql_weight == 0:
                continue
            values = []
            volume = torch.prod(HIGH - LOW).double()
            for k in range(cfg.num_actions):
                u = LOW.to(s) + (HIGH - LOW).to(s) * noise["uniform"][b, k]
                values.append(ref_q(critics, i, s, u) + torch.log(volume))
            for key, state in (("cql_current", s), ("cql_next", batch["next", "observation"][b])):
                for k in range(cfg.num_actions):
                    a_k, logp_k = ref_sample(loss, state, noise[key][b, k])
                    q = ref_q(critics, i, s, a_k)  # evaluated at s, also for actions drawn at s'
                    if cfg.calibrated:
                        q = torch.maximum(q, batch["mc_return"][b, 0])
                    values.append(q - logp_k)
            temperature = cfg.cql_temperature
            lse = temperature * torch.log(sum(torch.exp(v / temperature) for v in values))
            gap_terms.append(lse - q_data)
        td_losses.append(sum(squared) / n_batch)
        gaps.append(sum(gap_terms) / n_batch if gap_terms else torch.zeros(()))

    out = {
        "loss_actor": sum(actor_terms) / n_batch,
        "loss_alpha": sum(alpha_terms) / n_batch,
        "td_target": sum(targets_y) / n_batch,
        "cql_gap": sum(gaps) / len(gaps),
        "entropy": -sum(log_pis) / n_batch,
        "q_data": sum(q_datas) / len(q_datas),
        "alpha": alpha,
    }
    return {**out, **penalised_critic_loss(cfg, loss.log_alpha_prime, td_losses, gaps)}


OPTION_GRID = [
    dict(zip(("backup_entropy", "max_q_backup", "lagrange", "cql_temperature", "calibrated", "bc_steps"), values))
    for values in itertools.product([True, False], [False, True], [False, True], [1.0, 0.5], [False, True], [0, 5])
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_module_matches_plain_reference(options):
    loss = build_loss(**options)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    got = loss.compute(batch, noise)
    with torch.no_grad():
        expected = reference_losses(loss, batch, noise)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.to(got[key]), **TOL, msg=f"{key} differs")


LAYER_NORM_AND_TARGET_ENTROPY = [dict(critic_layer_norm=True), dict(target_entropy=-0.7),
                                 dict(critic_layer_norm=True, num_critics=5, target_subset=2, lagrange=True)]


@pytest.mark.parametrize("options", [dict(target_subset=2), dict(actor_q="mean"),
                                     dict(target_subset=3, actor_q="mean", max_q_backup=True, lagrange=True),
                                     *LAYER_NORM_AND_TARGET_ENTROPY])
def test_critic_ensembles_and_network_options_match_the_reference(options):
    loss = build_loss(**{"num_critics": 5, **options})
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    if "target_subset" in options:
        subset = noise["critic_subset"].tolist()
        assert len(subset) == options["target_subset"] == len(set(subset)) and set(subset) <= set(range(5))
    got = loss.compute(batch, noise)
    with torch.no_grad():
        expected = reference_losses(loss, batch, noise)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.to(got[key]), **TOL, msg=f"{key} differs")


def test_the_target_critics_subset_is_drawn_uniformly():
    """Every pair of the 5 critics comes up, each critic in about 2/5 of the draws (seeded: 400 draws)."""
    loss = build_loss(num_critics=5, target_subset=2)
    torch.manual_seed(3)
    draws = [tuple(sorted(loss.draw_noise(BATCH)["critic_subset"].tolist())) for _ in range(400)]
    assert set(draws) == set(itertools.combinations(range(5), 2))
    counts = [sum(member in draw for draw in draws) for member in range(5)]
    assert all(abs(count - 160) < 40 for count in counts), counts  # binomial(400, 0.4): sd 9.8


def test_sac_mode_matches_reference_and_has_no_cql_terms():
    loss = build_loss(cql_weight=0.0)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    assert set(noise) == {"actor", "next"}
    got = loss.compute(batch, noise)
    with torch.no_grad():
        expected = reference_losses(loss, batch, noise)
    for key in ("loss_actor", "loss_qvalue", "loss_alpha", "td_target"):
        torch.testing.assert_close(got[key], expected[key].to(got[key]), **TOL)
    assert got["cql_gap"] == 0


@pytest.mark.parametrize("path", ["batched", "onednn"])
def test_float32_module_matches_float64_reference(path, monkeypatch):
    """In float32 on CPU, through either critic path: these few rows take the batched matmuls, and
    with no row minimum every critic call takes oneDNN (a batch of 256 rows does in training)."""
    import cqlsac.components.onednn_ensemble as onednn_ensemble
    from cqlsac.components.networks import EnsembleMLP

    onednn_calls = []
    if path == "onednn":
        monkeypatch.setattr(EnsembleMLP, "onednn_min_rows", 0)
        original = onednn_ensemble.ensemble_q
        monkeypatch.setattr(onednn_ensemble, "ensemble_q", lambda *a: onednn_calls.append(1) or original(*a))
    loss32 = build_loss(dtype=torch.float32, lagrange=True, calibrated=True)
    loss64 = build_loss(dtype=torch.float64, lagrange=True, calibrated=True)
    noise = loss32.draw_noise(BATCH)
    got = loss32.compute(make_batch(dtype=torch.float32), noise)
    got32 = {key: [g.double() for g in torch.autograd.grad(got[key], params, retain_graph=True)]
             for key, params in own_parameters(loss32).items() if key in got.keys()}
    expected = reference_losses(loss64, make_batch(), {k: v.double() for k, v in noise.items()})
    assert bool(onednn_calls) == (path == "onednn")  # the path under test ran
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value.detach(), rtol=1e-4, atol=1e-4)
    for key, grads in got32.items():
        for g, e in zip(grads, torch.autograd.grad(expected[key], own_parameters(loss64)[key], retain_graph=True)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"gradient of {key} differs")


# ---- closed-form cases -------------------------------------------------------------------
def constant_critics(loss, value):
    with torch.no_grad():
        for ensemble in (loss.critic, loss.target_critic):
            ensemble.weights[-1].zero_()
            ensemble.biases[-1].fill_(value)


@pytest.mark.parametrize("constant", [0.0, 7.0])
@torch.no_grad()
def test_constant_critic_gives_closed_form_logsumexp(constant):
    loss = build_loss(cql_weight=1.0)
    constant_critics(loss, constant)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    got = loss.compute(batch, noise)
    # lse(s) - c = log(N * vol + sum_k 1/pi(a_k|s) + sum_k 1/pi(a'_k|s')), independent of c.
    volume = float(torch.prod(HIGH - LOW))
    gaps = []
    for b in range(BATCH):
        total = loss.cfg.num_actions * volume
        for key, state in (("cql_current", batch["observation"][b]), ("cql_next", batch["next", "observation"][b])):
            for k in range(loss.cfg.num_actions):
                total += math.exp(-ref_sample(loss, state, noise[key][b, k])[1].item())
        gaps.append(math.log(total))
    assert got["cql_gap"].item() == pytest.approx(sum(gaps) / BATCH, rel=1e-7)
    assert got["q_data"].item() == pytest.approx(constant)


def test_uniform_log_density_of_unit_box():
    obs_spec = Unbounded(shape=(OBS_DIM,))
    act_spec = Bounded(low=-1.0, high=1.0, shape=(4,))
    net = NetworkConfig(actor_hidden=(8,), critic_hidden=(8,))
    loss = CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net), LossConfig())
    assert loss.uniform_log_density.item() == pytest.approx(4 * math.log(0.5))


@torch.no_grad()
def test_terminated_does_not_bootstrap_and_truncated_does():
    loss = build_loss(cql_weight=0.0)
    constant_critics(loss, 4.0)
    reward = 1.5
    for terminated, truncated in ((True, False), (False, True), (False, False)):
        batch = make_batch(terminated=torch.tensor([[terminated]]), truncated=torch.tensor([[truncated]]))
        batch["next", "reward"].fill_(reward)
        noise = loss.draw_noise(1)
        got = loss.compute(batch, noise)["td_target"].item()
        if terminated:
            assert got == pytest.approx(reward, rel=1e-12)
        else:
            _, logp_next = ref_sample(loss, batch["next", "observation"][0], noise["next"][0, 0])
            expected = reward + loss.cfg.gamma * (4.0 - loss.log_alpha.exp().item() * logp_next.item())
            assert got == pytest.approx(expected, rel=1e-7)


def test_policy_log_density_equals_torchrl_tanh_normal():
    loss = build_loss()
    obs = make_batch()["observation"]
    loc, scale = loss.policy_outputs(obs)
    noise = 0.5 * torch.randn_like(loc)
    action, log_prob = loss.squashed_sample(loc, scale, noise)
    dist = TanhNormal(loc, scale, low=LOW.double(), high=HIGH.double())
    torch.testing.assert_close(log_prob, dist.log_prob(action), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.log_prob_of((loc, scale), action), log_prob, rtol=1e-6, atol=1e-6)


# ---- the three torchrl CQLLoss defects do not occur here ------------------------------------
def per_action_logsumexp_gap(loss, batch, noise):
    """torchrl 0.14.1's reading: logsumexp over the 3 sets for each sampled action, then the mean."""
    critics = loss.critic
    obs = batch["observation"]
    loc, scale = loss.policy_outputs(obs)
    loc_n, scale_n = loss.policy_outputs(batch["next", "observation"])
    a_cur, lp_cur = loss.squashed_sample(loc.unsqueeze(1), scale.unsqueeze(1), noise["cql_current"])
    a_nxt, lp_nxt = loss.squashed_sample(loc_n.unsqueeze(1), scale_n.unsqueeze(1), noise["cql_next"])
    u = loss.action_low + (loss.action_high - loss.action_low) * noise["uniform"]
    stacked = torch.stack([
        critics.evaluate(obs, u) - loss.uniform_log_density,
        critics.evaluate(obs, a_cur) - lp_cur.unsqueeze(-1),
        critics.evaluate(obs, a_nxt) - lp_nxt.unsqueeze(-1),
    ])  # [3, B, N, E]
    q_data = critics.evaluate(obs, batch["action"].unsqueeze(1)).squeeze(1)
    return (torch.logsumexp(stacked, 0).mean(1) - q_data).mean()


def test_logsumexp_runs_over_all_3n_actions_of_a_state():
    loss = build_loss(cql_weight=1.0, num_actions=4)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    got = loss.compute(batch, noise)["cql_gap"]
    with torch.no_grad():
        per_state = reference_losses(loss, batch, noise)["cql_gap"]
        per_action = per_action_logsumexp_gap(loss, batch, noise)
    torch.testing.assert_close(got, per_state, **TOL)
    # Over 3N values the logsumexp exceeds the per-action one by about log(N).
    assert (got - per_action).item() > 0.5 * math.log(4)


def test_next_state_actions_are_evaluated_at_the_current_state():
    loss = build_loss(cql_weight=1.0)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    got = loss.compute(batch, noise)["cql_gap"]
    # Same computation, but with Q(s', a'_k): must differ from what the module gives.
    critics = loss.critic
    obs, next_obs = batch["observation"], batch["next", "observation"]
    loc_n, scale_n = loss.policy_outputs(next_obs)
    a_nxt, lp_nxt = loss.squashed_sample(loc_n.unsqueeze(1), scale_n.unsqueeze(1), noise["cql_next"])
    loc, scale = loss.policy_outputs(obs)
    a_cur, lp_cur = loss.squashed_sample(loc.unsqueeze(1), scale.unsqueeze(1), noise["cql_current"])
    u = loss.action_low + (loss.action_high - loss.action_low) * noise["uniform"]
    values = torch.cat([critics.evaluate(obs, u) - loss.uniform_log_density,
                        critics.evaluate(obs, a_cur) - lp_cur.unsqueeze(-1),
                        critics.evaluate(next_obs, a_nxt) - lp_nxt.unsqueeze(-1)], 1)
    q_data = critics.evaluate(obs, batch["action"].unsqueeze(1)).squeeze(1)
    at_next_state = (torch.logsumexp(values, 1) - q_data).mean()
    with torch.no_grad():
        torch.testing.assert_close(got, reference_losses(loss, batch, noise)["cql_gap"], **TOL)
    assert abs((got - at_next_state).item()) > 1e-3


def test_lagrange_penalty_scaled_by_detached_alpha_prime_and_dual_loss_detached():
    loss = build_loss(lagrange=True, cql_weight=2.0, lagrange_threshold=0.5)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    out = loss.compute(batch, noise)
    critic_params = list(loss.critic_network.parameters())
    # The dual loss reaches log_alpha' only.
    grads = torch.autograd.grad(out["loss_alpha_prime"], critic_params + [loss.log_alpha_prime], allow_unused=True,
                                retain_graph=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[:-1])
    # d loss_alpha' / d log_alpha' = -alpha' * w * mean(gap - threshold): it grows while the gap exceeds it.
    expected = -2.5 * 2.0 * (out["cql_gap"] - 0.5)
    torch.testing.assert_close(grads[-1], expected, **TOL)
    # The critic loss does not reach log_alpha'.
    (grad_ap,) = torch.autograd.grad(out["loss_qvalue"], [loss.log_alpha_prime], allow_unused=True, retain_graph=True)
    assert grad_ap is None or grad_ap == 0
    # The penalty scales with alpha': doubling alpha' doubles (loss_qvalue - TD part).
    td_only = build_loss(lagrange=True, cql_weight=0.0).compute(batch, {k: noise[k] for k in ("actor", "next")})
    penalty = out["loss_qvalue"] - td_only["loss_qvalue"]
    with torch.no_grad():
        loss.log_alpha_prime.add_(math.log(2.0))
    doubled = loss.compute(batch, noise)["loss_qvalue"] - td_only["loss_qvalue"]
    torch.testing.assert_close(doubled, 2 * penalty, **TOL)


@pytest.mark.parametrize("update_count, uses_bc", [(4, True), (5, False)])
def test_bc_warm_start_ends_after_bc_steps_updates(update_count, uses_bc):
    loss = build_loss(bc_steps=5)
    loss.update_count.fill_(update_count)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    got = loss.compute(batch, noise)["loss_actor"]
    with torch.no_grad():
        torch.testing.assert_close(got, reference_losses(loss, batch, noise)["loss_actor"], **TOL)
        sac = build_loss()
        sac.update_count.fill_(update_count)
        differs_from_sac = abs((got - sac.compute(batch, noise)["loss_actor"]).item()) > 1e-3
    assert differs_from_sac == uses_bc


def test_linear_critics_match_reference_in_float32():
    loss32 = build_loss(dtype=torch.float32, critic_hidden=())
    loss64 = build_loss(dtype=torch.float64, critic_hidden=())
    noise = loss32.draw_noise(BATCH)
    got = loss32.compute(make_batch(dtype=torch.float32), noise)
    got["loss_qvalue"].backward()  # the float32 CPU backward of a critic without hidden layers
    with torch.no_grad():
        expected = reference_losses(loss64, make_batch(), {k: v.double() for k, v in noise.items()})
    torch.testing.assert_close(got["loss_qvalue"].detach().double(), expected["loss_qvalue"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("missing", [("next", "terminated"), "mc_return"])
def test_batch_without_an_input_key_is_a_clear_error(missing):
    loss = build_loss(calibrated=True)
    batch = make_batch().exclude(missing)
    with pytest.raises(KeyError, match="the batch lacks"):
        loss.compute(batch, loss.draw_noise(BATCH))


@pytest.mark.parametrize("options", [dict(), dict(cql_weight=0.0), dict(lagrange=True),
                                     dict(lagrange=True, cql_weight=0.0)])
def test_out_keys_are_what_compute_writes(options):
    loss = build_loss(**options)
    out = loss.compute(make_batch(), loss.draw_noise(BATCH))
    assert sorted(out.keys()) == sorted(loss.out_keys)
    tuned = options.get("lagrange", False) and options.get("cql_weight", 5.0) > 0  # Lagrange with a CQL term
    assert loss.tunes_alpha_prime == tuned and loss.log_alpha_prime.requires_grad == tuned


def test_alpha_prime_stops_at_its_bound_and_stops_learning_there():
    loss = build_loss(lagrange=True)
    with torch.no_grad():
        loss.log_alpha_prime.fill_(math.log(2e6))
    out = loss.compute(make_batch(), loss.draw_noise(BATCH))
    assert out["alpha_prime"].item() == 1e6
    (grad,) = torch.autograd.grad(out["loss_alpha_prime"], [loss.log_alpha_prime])
    assert grad.item() == 0.0


# ---- gradients ------------------------------------------------------------------------------
def own_parameters(loss) -> dict[str, list]:
    """Each loss's own parameters: the only ones it may move."""
    return {"loss_actor": list(loss.actor_network.parameters()), "loss_qvalue": list(loss.critic_network.parameters()),
            "loss_alpha": [loss.log_alpha], "loss_alpha_prime": [loss.log_alpha_prime]}


@pytest.mark.parametrize("options", [dict(), dict(lagrange=True, calibrated=True), dict(bc_steps=10),
                                     dict(max_q_backup=True, backup_entropy=False, cql_temperature=0.5),
                                     dict(cql_weight=0.0), *LAYER_NORM_AND_TARGET_ENTROPY], ids=str)
def test_each_loss_gradient_matches_the_reference(options):
    """The gradients on each loss's own parameters equal those of the plain reference (autograd through it)."""
    loss = build_loss(**options)
    batch = make_batch()
    noise = loss.draw_noise(BATCH)
    got = loss.compute(batch, noise)
    expected = reference_losses(loss, batch, noise)
    for key, params in own_parameters(loss).items():
        if key not in got.keys():
            continue
        for g, e in zip(torch.autograd.grad(got[key], params, retain_graph=True),
                        torch.autograd.grad(expected[key], params, retain_graph=True)):
            torch.testing.assert_close(g, e, **TOL, msg=f"gradient of {key} differs")


# ---- gradients reach only their own parameters ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the oneDNN backward
@pytest.mark.parametrize("options", [dict(), dict(lagrange=True, calibrated=True), dict(bc_steps=10)])
def test_each_loss_moves_only_its_own_parameters(options, dtype):
    loss = build_loss(dtype=dtype, **options)
    out = loss.compute(make_batch(dtype=dtype), loss.draw_noise(BATCH))
    groups = {
        "actor": list(loss.actor_network.parameters()),
        "critic": list(loss.critic_network.parameters()),
        "alpha": [loss.log_alpha],
        "alpha_prime": [loss.log_alpha_prime],
    }
    owners = {"loss_actor": "actor", "loss_qvalue": "critic", "loss_alpha": "alpha", "loss_alpha_prime": "alpha_prime"}
    everything = [p for params in groups.values() for p in params if p.requires_grad]
    for key, owner in owners.items():
        if key not in out.keys():
            continue
        grads = torch.autograd.grad(out[key], everything, allow_unused=True, retain_graph=True)
        by_param = dict(zip(map(id, everything), grads))
        for name, params in groups.items():
            moved = any(by_param.get(id(p)) is not None and torch.count_nonzero(by_param[id(p)]) > 0 for p in params)
            assert moved == (name == owner), f"{key} {'moves' if moved else 'does not move'} {name}"
    assert all(not p.requires_grad for p in loss.target_critic.parameters())


def test_ensemble_members_are_initialised_independently():
    loss = build_loss()
    for w in loss.critic.weights:
        assert not torch.equal(w[0], w[1])

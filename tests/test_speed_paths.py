"""The fast paths of the update compute what the plain ones do (no timing here: see benchmarks/)."""

import copy
import platform

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.data import Bounded, Categorical, Unbounded

from cqlsac.components.allocator import ENV_SWITCH, keep_freed_memory
from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.networks import EnsembleMLP, make_actor, make_critics
from cqlsac.components.onednn_ensemble import available_for
from cqlsac.components.update import cuda_graph_update, make_optimizer, update_step

OBS_DIM, ACT_DIM, BATCH, NUM_ACTIONS = 5, 2, 4, 3


def plain_q(ensemble: EnsembleMLP, obs, actions, activation, layer_norm=False):
    """Q[b, k, e] member by member, state by state, action by action, one vector-matrix product per layer.

    With `layer_norm`, each hidden pre-activation is standardised (biased variance, eps 1e-5).
    """
    layers = list(zip(ensemble.weights, ensemble.biases))
    out = torch.empty(obs.shape[0], actions.shape[1], ensemble.num_members, dtype=obs.dtype)
    for e in range(ensemble.num_members):
        for b in range(obs.shape[0]):
            for k in range(actions.shape[1]):
                x = torch.cat([obs[b], actions[b, k]])
                for depth, (w, bias) in enumerate(layers):
                    x = x @ w[e] + bias[e, 0]
                    if depth < len(layers) - 1:
                        if layer_norm:
                            x = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-5)
                        x = activation(x)
                out[b, k, e] = x[0]
    return out


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_ensemble_values_and_gradients_match_a_plain_loop(activation, layer_norm):
    torch.manual_seed(0)
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, (7, 6), num_members=2, activation=activation,
                           layer_norm=layer_norm).double()
    reference = copy.deepcopy(ensemble)
    obs = torch.randn(BATCH, OBS_DIM, dtype=torch.float64)
    actions = torch.randn(BATCH, NUM_ACTIONS, ACT_DIM, dtype=torch.float64, requires_grad=True)
    actions_ref = actions.detach().clone().requires_grad_()
    weight = torch.randn(BATCH, NUM_ACTIONS, 2, dtype=torch.float64)  # a generic downstream gradient

    got = ensemble.evaluate(obs, actions)
    expected = plain_q(reference, obs, actions_ref, activation(), layer_norm)
    torch.testing.assert_close(got, expected)
    (got * weight).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(actions.grad, actions_ref.grad)
    for p, p_ref in zip(ensemble.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("hidden", [(16, 16), (9, 7, 5)])
@pytest.mark.parametrize("detached_weights", [False, True])
def test_onednn_float32_path_matches_a_float64_plain_loop(hidden, detached_weights, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(EnsembleMLP, "onednn_min_rows", 0)  # these few rows would take the batched path
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, hidden, num_members=2)
    reference = copy.deepcopy(ensemble).double()
    obs = torch.randn(BATCH, OBS_DIM)
    actions = torch.randn(BATCH, NUM_ACTIONS, ACT_DIM, requires_grad=True)
    actions_ref = actions.detach().double().requires_grad_()
    weight = torch.randn(BATCH, NUM_ACTIONS, 2)
    assert available_for(obs, list(ensemble.weights), ensemble.activation)
    if detached_weights:  # as in the actor loss: gradient to the actions only
        got = ensemble.evaluate(obs, actions, [w.detach() for w in ensemble.weights],
                                [b.detach() for b in ensemble.biases])
    else:
        got = ensemble.evaluate(obs, actions)
    expected = plain_q(reference, obs.double(), actions_ref, nn.ReLU())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    (got * weight).sum().backward()
    (expected * weight.double()).sum().backward()
    torch.testing.assert_close(actions.grad.double(), actions_ref.grad, rtol=1e-5, atol=1e-5)
    for p, p_ref in zip(ensemble.parameters(), reference.parameters()):
        if detached_weights:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-5, atol=1e-5)


def test_layer_norm_critics_leave_the_onednn_path_for_the_normalised_one():
    """float32 + ReLU would take oneDNN, which has no normalisation: the values must still be normalised."""
    torch.manual_seed(0)
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, (16, 16), num_members=2, layer_norm=True)
    obs, actions = torch.randn(BATCH, OBS_DIM), torch.randn(BATCH, NUM_ACTIONS, ACT_DIM)
    expected = plain_q(copy.deepcopy(ensemble).double(), obs.double(), actions.double(), nn.ReLU(), layer_norm=True)
    torch.testing.assert_close(ensemble.evaluate(obs, actions).double(), expected, rtol=1e-5, atol=1e-5)
    spec = NetworkConfig(critic_hidden=(16, 16), critic_layer_norm=True)
    critic = make_critics(Unbounded(shape=(OBS_DIM,)), Bounded(-1.0, 1.0, shape=(ACT_DIM,)), spec)
    assert critic.module.layer_norm


def test_onednn_path_only_where_it_applies():
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, (8,), num_members=2)
    rows = torch.randn(3, OBS_DIM + ACT_DIM)
    assert not available_for(rows.double(), [w.double() for w in ensemble.weights], ensemble.activation)
    assert not available_for(rows, list(ensemble.weights), nn.Tanh())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_takes_the_calls_with_many_rows_and_the_batched_path_the_others(monkeypatch):
    import cqlsac.components.onednn_ensemble as onednn_ensemble

    calls = []
    original = onednn_ensemble.ensemble_q
    monkeypatch.setattr(onednn_ensemble, "ensemble_q", lambda rows, *a: calls.append(rows.shape[0]) or original(rows, *a))
    torch.manual_seed(0)
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, (16, 16), num_members=2)
    reference = copy.deepcopy(ensemble).double()
    few, many = EnsembleMLP.onednn_min_rows - 1, EnsembleMLP.onednn_min_rows
    for states in (few, many):
        obs, actions = torch.randn(states, OBS_DIM), torch.randn(states, 1, ACT_DIM)
        q = ensemble.evaluate(obs, actions)
        expected = plain_q(reference, obs[:3].double(), actions[:3].double(), nn.ReLU())
        torch.testing.assert_close(q[:3].double(), expected, rtol=1e-5, atol=1e-5)
    assert calls == [many]


def test_compiled_ensemble_computes_what_the_plain_loop_does():
    """The batched-matmul path that `compile=True` runs (the oneDNN kernel is outside any compiled graph)."""
    torch.manual_seed(0)
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, (16, 16), num_members=2)
    ensemble.use_onednn = False
    reference = copy.deepcopy(ensemble).double()
    obs, actions = torch.randn(BATCH, OBS_DIM), torch.randn(BATCH, NUM_ACTIONS, ACT_DIM)
    weight = torch.randn(BATCH, NUM_ACTIONS, 2)  # a generic downstream gradient
    compiled = torch.compile(ensemble.evaluate)(obs, actions)
    (compiled * weight).sum().backward()
    expected = plain_q(reference, obs.double(), actions.double(), nn.ReLU())
    (expected * weight.double()).sum().backward()
    torch.testing.assert_close(compiled.double(), expected, rtol=1e-5, atol=1e-5)
    for p, q in zip(ensemble.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-5, atol=1e-5)


def test_ensemble_forward_is_q_at_one_action_for_any_batch_shape():
    torch.manual_seed(0)
    ensemble = EnsembleMLP(OBS_DIM, ACT_DIM, (8, 8), num_members=3).double()
    obs, action = torch.randn(2, BATCH, OBS_DIM, dtype=torch.float64), torch.randn(2, BATCH, ACT_DIM, dtype=torch.float64)
    expected = plain_q(ensemble, obs.reshape(-1, OBS_DIM), action.reshape(-1, 1, ACT_DIM), nn.ReLU())
    with torch.no_grad():
        torch.testing.assert_close(ensemble(obs, action), expected[:, 0].reshape(2, BATCH, 3))


def small_loss(device="cpu", discrete=False, **options) -> CQLSACLoss:
    obs_spec = Unbounded(shape=(OBS_DIM,))
    act_spec = Categorical(3) if discrete else Bounded(low=-1.0, high=1.0, shape=(ACT_DIM,))
    net = NetworkConfig(actor_hidden=(8,), critic_hidden=(8, 8))
    return CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net),
                      LossConfig(num_actions=NUM_ACTIONS, **options)).to(device)


def random_batch(device="cpu") -> TensorDict:
    zeros = torch.zeros(BATCH, 1, dtype=torch.bool)
    return TensorDict({"observation": torch.randn(BATCH, OBS_DIM), "action": torch.rand(BATCH, ACT_DIM) * 2 - 1,
                       "next": {"observation": torch.randn(BATCH, OBS_DIM), "reward": torch.randn(BATCH, 1),
                                "done": zeros, "terminated": zeros.clone()}}, [BATCH]).to(device)


def test_fused_adam_steps_like_the_plain_adam():
    torch.manual_seed(0)
    loss = small_loss()
    twin = copy.deepcopy(loss)
    cfg = OptimConfig()
    fused = make_optimizer(loss, cfg)
    plain = torch.optim.Adam([{"params": group["params"], "lr": group["lr"]} for group in make_optimizer(twin, cfg).param_groups],
                             foreach=False)
    params, twin_params = list(loss.parameters()), list(twin.parameters())
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twin_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cuda_graph_update_refuses_a_cpu_loss():
    loss = small_loss()
    with pytest.raises(ValueError, match="needs the loss module on a CUDA device"):
        cuda_graph_update(loss, make_optimizer(loss, OptimConfig()), tau=0.005)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_update_steps_as_update_step_does():
    """Every call, warm-up, recording and replays, against eager updates of a twin on the same batches.
    Discrete actions draw no noise (without `target_subset`), so how a graph replays the random
    stream does not enter: what is compared is the recorded computation on fresh batches."""
    torch.manual_seed(0)
    loss = small_loss("cuda", discrete=True, bc_steps=2)  # BC on the two eager warm-ups, off in the graph
    twin = copy.deepcopy(loss)
    with pytest.raises(ValueError, match="capturable=True"):
        cuda_graph_update(loss, make_optimizer(loss, OptimConfig()), tau=0.005)
    graphed = cuda_graph_update(loss, make_optimizer(loss, OptimConfig(), capturable=True), tau=0.005, warmup=2)
    twin_optimizer = make_optimizer(twin, OptimConfig(), capturable=True)
    for k in range(6):  # warm-up calls (eager), the recording, then replays
        batch = random_batch("cuda")
        batch["action"] = torch.randint(3, (BATCH,), device="cuda")
        got = graphed(batch.clone())
        expected = update_step(twin, twin_optimizer, batch.clone(), tau=0.005)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"update {k}")
    assert int(loss.update_count) == 6
    for (name, p), q in zip(loss.named_parameters(), twin.parameters()):  # targets and log alphas included
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_malloc_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert keep_freed_memory() is False


def test_malloc_tuning_reports_whether_it_applied(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    applied = keep_freed_memory()
    assert isinstance(applied, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    # Allocation still works after the change.
    assert torch.ones(8 << 20).sum().item() == 8 << 20


@pytest.mark.parametrize("discrete", [False, True])
def test_the_compiled_loss_computes_what_the_eager_one_does(monkeypatch, discrete):
    """`compile=True` traces the whole loss (here with the aot_eager backend: the same graph capture and
    autograd, without inductor's code generation, which costs a minute per graph on 2 cores)."""
    from functools import partial

    from torchrl.data import Categorical

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    obs_spec = Unbounded(shape=(OBS_DIM,))
    act_spec = Categorical(3) if discrete else Bounded(low=-1.0, high=1.0, shape=(ACT_DIM,))
    net = NetworkConfig(actor_hidden=(8,), critic_hidden=(8, 8), critic_layer_norm=True, num_critics=3)
    losses = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        losses.append(CQLSACLoss(make_actor(obs_spec, act_spec, net), make_critics(obs_spec, act_spec, net),
                                 LossConfig(num_actions=3, target_subset=2, lagrange=True), compile=compile_))
    batch = TensorDict({"observation": torch.randn(BATCH, OBS_DIM),
                        "action": torch.randint(3, (BATCH,)) if discrete else torch.rand(BATCH, ACT_DIM) * 2 - 1,
                        "next": {"observation": torch.randn(BATCH, OBS_DIM), "reward": torch.randn(BATCH, 1),
                                 "done": torch.zeros(BATCH, 1, dtype=torch.bool),
                                 "terminated": torch.zeros(BATCH, 1, dtype=torch.bool)}}, [BATCH])
    torch.manual_seed(1)
    eager = losses[0](batch)
    torch.manual_seed(1)
    compiled = losses[1](batch)
    for key in eager.keys():
        torch.testing.assert_close(compiled[key], eager[key])
    for out in (eager, compiled):
        sum(value for key, value in out.items() if key.startswith("loss_")).backward()
    for p, q in zip(losses[0].parameters(), losses[1].parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad)


@pytest.mark.parametrize("discrete", [False, True])
def test_actor_writes_what_a_plain_tensordict_module_writes(discrete, monkeypatch):
    """The actor's parameter module skips `TensorDict.from_any`; samples and parameters are unchanged."""
    from tensordict.nn import TensorDictModule
    from torchrl.data import Categorical

    from cqlsac.components import networks

    obs_spec = Unbounded(shape=(3,))
    act_spec = Categorical(4) if discrete else Bounded(low=-2 * torch.ones(1), high=2 * torch.ones(1), shape=(1,))
    fast = make_actor(obs_spec, act_spec, NetworkConfig(actor_hidden=(8, 8)))
    with monkeypatch.context() as patch:
        patch.setattr(networks, "TensorOutputModule", TensorDictModule)
        plain = make_actor(obs_spec, act_spec, NetworkConfig(actor_hidden=(8, 8)))
    plain.load_state_dict(fast.state_dict())
    from_any_calls = []
    from_any = TensorDict.from_any.__func__

    def counted(cls, obj, **kwargs):
        from_any_calls.append(type(obj))
        return from_any(cls, obj, **kwargs)

    monkeypatch.setattr(TensorDict, "from_any", classmethod(counted))
    obs = TensorDict({"observation": torch.randn(5, 3)}, [5])
    torch.manual_seed(3)
    out_plain = plain(obs.clone())
    assert from_any_calls, "the plain module no longer converts its outputs: the fast path is moot"
    from_any_calls.clear()
    torch.manual_seed(3)
    out_fast = fast(obs.clone())
    assert not from_any_calls
    assert set(out_fast.keys()) == set(out_plain.keys())
    for key in out_plain.keys():
        assert torch.equal(out_fast[key], out_plain[key]), key


@pytest.mark.parametrize("low, high", [(-2.0, 2.0), (-1.0, 1.0), (0.0, 3.0)])
@pytest.mark.parametrize("batch", [(), (5,), (4, 3)])
@pytest.mark.parametrize("mode", ["random", "deterministic"])
def test_squashed_gaussian_actor_acts_as_its_distribution_would(low, high, batch, mode, monkeypatch):
    """The fast action path gives the TanhNormal's action bit for bit, with the same random draws,
    also where tanh saturates; and it builds no distribution."""
    from tensordict.nn import ProbabilisticTensorDictSequential
    from torchrl.envs.utils import ExplorationType, set_exploration_type
    from torchrl.modules import TanhNormal

    from cqlsac.components.networks import SquashedGaussianActor

    torch.manual_seed(0)
    act_spec = Bounded(low=torch.tensor([low, low]), high=torch.tensor([high, high]), shape=(2,))
    actor = make_actor(Unbounded(shape=(3,)), act_spec, NetworkConfig(actor_hidden=(8, 8)))
    assert isinstance(actor, SquashedGaussianActor)
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(6.0)  # large locs: some actions saturate at the clamp
    obs = TensorDict({"observation": 3 * torch.randn(*batch, 3)}, batch)
    exploration = ExplorationType.RANDOM if mode == "random" else ExplorationType.DETERMINISTIC
    with torch.no_grad(), set_exploration_type(exploration):
        torch.manual_seed(11)
        reference = ProbabilisticTensorDictSequential.forward(actor, obs.clone())
        rng_after_reference = torch.get_rng_state()
        torch.manual_seed(11)
        with monkeypatch.context() as patch:
            patch.setattr(TanhNormal, "__init__", lambda *a, **k: pytest.fail("built a distribution"))
            fast = actor(obs.clone())
        assert torch.equal(torch.get_rng_state(), rng_after_reference)
    assert set(fast.keys()) == set(reference.keys()) == {"observation", "loc", "scale", "action"}
    for key in reference.keys():
        assert torch.equal(fast[key], reference[key]), key
    assert (fast["action"].abs() > 0.999 * max(abs(low), abs(high))).any() or low == 0.0


def test_squashed_gaussian_actor_keeps_the_distribution_where_it_is_asked_for():
    """With gradients, or under another interaction type, the call goes through the TanhNormal."""
    from tensordict.nn import ProbabilisticTensorDictSequential
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    act_spec = Bounded(low=-torch.ones(1), high=torch.ones(1), shape=(1,))
    actor = make_actor(Unbounded(shape=(3,)), act_spec, NetworkConfig(actor_hidden=(8, 8)))
    obs = TensorDict({"observation": torch.randn(4, 3)}, [4])
    assert actor(obs.clone())["action"].requires_grad  # the parent path, with gradients
    with torch.no_grad(), set_exploration_type(ExplorationType.MEAN):
        mean = actor(obs.clone())["action"]  # TanhNormal has no analytic mean: an empirical one
    assert mean.shape == (4, 1) and (mean.abs() < 1).all()
    bad = TensorDict({"observation": torch.full((4, 3), float("nan"))}, [4])
    with torch.no_grad():
        assert actor(bad.clone())["action"].isnan().all()  # as the TanhNormal gives it: no check hides a diverged actor
        assert ProbabilisticTensorDictSequential.forward(actor, bad.clone())["action"].isnan().all()

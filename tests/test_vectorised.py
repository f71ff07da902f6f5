"""K agents in one vectorised update compute what K separate `update_step`s compute."""

import copy

import pytest
import torch
from tensordict import TensorDict

from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.envs import make_env
from cqlsac.components.update import make_agent
from cqlsac.components.vectorised import VectorisedAgents


def batch(generator, n=16, discrete=False):
    """Pendulum-v1 transitions, or CartPole-v1's (4 observations, 2 discrete actions)."""
    obs_dim = 4 if discrete else 3
    action = (torch.randint(2, (n,), generator=generator) if discrete
              else torch.rand(n, 1, generator=generator) * 4 - 2)
    return TensorDict({"observation": torch.randn(n, obs_dim, generator=generator),
                       "action": action,
                       "mc_return": torch.randn(n, 1, generator=generator) * 3,
                       "next": {"observation": torch.randn(n, obs_dim, generator=generator),
                                "reward": torch.randn(n, 1, generator=generator),
                                "done": torch.zeros(n, 1, dtype=torch.bool),
                                "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, [n])


@pytest.mark.parametrize("options, num_critics", [
    ({}, 2), ({"lagrange": True, "calibrated": False, "num_actions": 3}, 2), ({"calibrated": True, "num_actions": 3}, 2),
    ({"target_subset": 2, "actor_q": "mean", "num_actions": 3}, 5), ({"bc_steps": 2, "num_actions": 3}, 2),
    ({"discrete": True, "lagrange": True, "calibrated": True}, 2), ({"discrete": True, "bc_steps": 2}, 2),
], ids=str)
def test_vectorised_agents_follow_their_separate_runs(options, num_critics):
    options = dict(options)
    discrete = options.pop("discrete", False)
    env = make_env("CartPole-v1" if discrete else "Pendulum-v1")
    network = NetworkConfig(actor_hidden=(8,), critic_hidden=(8, 8), critic_layer_norm=True, num_critics=num_critics)
    agents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        agents.append(make_agent(env, network, LossConfig(**options), OptimConfig(actor_lr=1e-3, critic_lr=3e-3)))
    separate = copy.deepcopy(agents)
    together = VectorisedAgents(agents, compile=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        batches = [batch(generator, discrete=discrete) for _ in agents]
        noises = [agent.loss.draw_noise(16) for agent in separate]
        out = together.update(torch.stack(batches), {k: torch.stack([n[k] for n in noises]) for k in noises[0]})
        for agent, one, noise, k in zip(separate, batches, noises, range(2)):
            losses = agent.loss.compute(one, noise)
            torch.testing.assert_close(out["loss_qvalue"][k], losses["loss_qvalue"], rtol=1e-5, atol=1e-5)
            agent.optimizer.zero_grad(set_to_none=True)
            sum(v for key, v in losses.items() if key.startswith("loss_")).backward()
            agent.optimizer.step()
            torch._foreach_lerp_(list(agent.loss.target_critic.parameters()), list(agent.loss.critic.parameters()),
                                 agent.tau)
            agent.loss.update_count += 1
    together.write_back()
    for vectorised, alone in zip(agents, separate):
        for (name, p), q in zip(vectorised.loss.state_dict().items(), alone.loss.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        # The optimisers carry on alike: one more ordinary update of each gives the same weights.
        more = batch(generator, discrete=discrete)
        torch.manual_seed(5)
        vectorised.update(more)
        torch.manual_seed(5)
        alone.update(more)
        for p, q in zip(vectorised.loss.parameters(), alone.loss.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_offline_stages_computed_together_are_the_runs_own(tmp_path, dataset_store):
    """Two seeds' offline stages computed together, then each run reuses its own, with the numbers a run
    computing it alone gets (up to float rounding)."""
    from cqlsac.datasets import create_dataset
    from cqlsac.pipeline import Pipeline, PipelineConfig
    from cqlsac.pipeline.pipeline import compute_offline_together

    create_dataset("test/together-v0", ["random"], 300, env_id="Pendulum-v1")
    base = ["dataset.name=test/together-v0", "network.actor_hidden=[8]", "network.critic_hidden=[8,8]",
            "offline.updates=30", "offline.batch_size=16", "offline.log_every=10", "offline.loss.num_actions=3",
            "evaluate.episodes=1", "stages=[offline]"]

    def pipe(seed, cache):
        return Pipeline(PipelineConfig.from_yaml(None, [*base, f"seed={seed}", f"cache_dir={tmp_path / cache}",
                                                        f"output_dir={tmp_path / 'runs'}"]))

    together = [pipe(seed, "together") for seed in (0, 1)]
    assert compute_offline_together(together, compile=False) == 2  # compiled, the same graph in a minute
    for seed, vectorised in zip((0, 1), together):
        alone = pipe(seed, "alone")
        alone.run()
        got, expected = (torch.load(p.finished_outputs("offline")["agent"], weights_only=True)["loss"]
                         for p in (vectorised, alone))
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
        assert [p for p, _, _ in vectorised.finished_outputs("offline")["curve"]] == [10, 20, 30]
        vectorised.run()  # the run reuses the stage computed together
    assert compute_offline_together(together, compile=False) == 0  # nothing left to compute

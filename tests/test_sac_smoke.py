"""SAC mode (CQL weight 0) learns Pendulum-v1 within a small online budget."""

import torch
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs.utils import ExplorationType, set_exploration_type

from cqlsac.components.config import LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.cql_loss import CQLSACLoss
from cqlsac.components.envs import make_env
from cqlsac.components.networks import make_actor, make_critics
from cqlsac.components.update import make_optimizer, update_step

FRAMES, RANDOM_FRAMES, FRAMES_PER_BATCH = 4000, 500, 100


def mean_return(policy, seeds=range(100, 105)) -> float:
    returns = []
    for seed in seeds:
        env = make_env("Pendulum-v1", seed=seed)
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            returns.append(env.rollout(200, policy)["next", "reward"].sum().item())
    return sum(returns) / len(returns)


def test_sac_mode_beats_random_policy_on_pendulum():
    torch.manual_seed(0)
    env = make_env("Pendulum-v1", seed=0)
    net = NetworkConfig(actor_hidden=(64, 64), critic_hidden=(64, 64))
    actor = make_actor(env.observation_spec["observation"], env.action_spec, net)
    critic = make_critics(env.observation_spec["observation"], env.action_spec, net)
    loss = CQLSACLoss(actor, critic, LossConfig(cql_weight=0.0))
    optimizer = make_optimizer(loss, OptimConfig(actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3))
    collector = Collector(lambda: make_env("Pendulum-v1", seed=0), actor, frames_per_batch=FRAMES_PER_BATCH,
                          total_frames=FRAMES, init_random_frames=RANDOM_FRAMES,
                          auto_register_policy_transforms=False)
    replay = ReplayBuffer(storage=LazyTensorStorage(FRAMES), batch_size=128)
    for data in collector:
        replay.extend(data.reshape(-1))
        if len(replay) >= RANDOM_FRAMES:
            for _ in range(FRAMES_PER_BATCH):
                update_step(loss, optimizer, replay.sample(), tau=0.005)
    collector.shutdown()

    random_return, trained_return = mean_return(None), mean_return(actor)
    # Random play scores about -1300 here; a policy that learned to swing up scores above -700.
    assert random_return < -1000
    assert trained_return > random_return + 500, (trained_return, random_return)

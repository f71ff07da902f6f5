"""The example configs load, validate and name envs that gymnasium knows; the default is written out."""

from pathlib import Path

import gymnasium as gym
import pytest

from cqlsac.pipeline.config import PipelineConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_is_valid(path):
    cfg = PipelineConfig.from_yaml(path)
    assert cfg.env.id in gym.registry
    gym.make(cfg.env.id, **cfg.env.kwargs).close()  # the env and its extras (box2d, mujoco) are installed


def test_pendulum_yaml_is_the_default_pipeline():
    assert PipelineConfig.from_yaml(Path(__file__).parent.parent / "configs" / "pendulum.yaml") == PipelineConfig()

"""Policy checkpoints: the actor's weights plus what is needed to rebuild it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torchrl.modules import ProbabilisticActor

from cqlsac.components.envs import make_env
from cqlsac.components.networks import NetworkConfig, make_actor


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or does not fit the requested setup."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temp file in the same folder, then rename: a kill mid-write keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_policy(path: str | os.PathLike, actor: ProbabilisticActor, env_id: str, network: NetworkConfig,
                env_kwargs: dict | None = None, **info: Any) -> None:
    """Write a policy checkpoint; `info` holds free metadata (e.g. the mean return it reached)."""
    atomic_torch_save({"kind": "cqlsac-policy", "env_id": env_id, "env_kwargs": env_kwargs or {},
                       "network": asdict(network), "actor": actor.state_dict(), "info": info}, path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_policy(path: str | os.PathLike) -> tuple[ProbabilisticActor, dict]:
    """Rebuild the actor of a policy checkpoint; returns it with the checkpoint's metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint {path} is corrupted or not a torch file ({type(exc).__name__}); "
                              "re-create it or point to another one") from None
    if not isinstance(state, dict) or state.get("kind") != "cqlsac-policy":
        raise CheckpointError(f"{path} is not a cqlsac policy checkpoint")
    env = make_env(state["env_id"], env_kwargs=state["env_kwargs"])
    actor = make_actor(env.observation_spec["observation"], env.action_spec, NetworkConfig(**state["network"]))
    env.close()
    try:
        actor.load_state_dict(state["actor"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match its own network config: {exc}") from None
    meta = {k: v for k, v in state.items() if k != "actor"}
    meta["sha256"] = file_sha256(path)
    return actor, meta

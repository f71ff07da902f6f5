"""Checkpoints: policies (the actor's weights plus what is needed to rebuild it) and training states.

A training state is what an interrupted stage needs to carry on exactly where it stopped: the loss
module (networks, target critics, temperatures, update count), the optimizer, torch's RNG and the
stage's own progress (counters, replay contents). Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torchrl.modules import ProbabilisticActor

from cqlsac.components.config import NetworkConfig
from cqlsac.components.envs import make_env
from cqlsac.components.errors import UserError
from cqlsac.components.networks import make_actor

POLICY = "cqlsac-policy"
TRAINING_STATE = "cqlsac-training-state"
AGENT = "cqlsac-agent"


class CheckpointError(UserError):
    """A checkpoint is missing, corrupted or does not fit the requested setup."""


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (mkstemp's own is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file through a temp file in the same folder, fsync and rename: a kill mid-write keeps
    the old file (or none), never half of one. The file gets the mode of a plain `open()`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # a cache shared between users stays readable to them
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_write`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def atomic_json(path: str | os.PathLike, data: Any) -> None:
    """JSON through `atomic_write`."""
    atomic_write(path, json.dumps(data, indent=2, default=str))


def read_checkpoint(path: str | os.PathLike, kind: str, fix: str) -> dict:
    """The dict saved at `path` as checkpoint `kind`; a missing, damaged or foreign file is a `CheckpointError`.

    `fix` completes the error message: what the user should do instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint {path} is corrupted or not a torch file ({type(exc).__name__}); "
                              f"{fix}") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint; {fix}")
    return state


def save_policy(path: str | os.PathLike, actor: ProbabilisticActor, env_id: str, network: NetworkConfig,
                env_kwargs: dict | None = None, **info: Any) -> None:
    """Write a policy checkpoint; `info` holds free metadata (e.g. the mean return it reached)."""
    atomic_torch_save({"kind": POLICY, "env_id": env_id, "env_kwargs": env_kwargs or {},
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
    fix = "pass a policy.pt that `cqlsac run` wrote (its run directory holds one)"
    state = read_checkpoint(path, POLICY, fix)
    env = make_env(state["env_id"], env_kwargs=state["env_kwargs"])
    actor = make_actor(env.observation_spec["observation"], env.action_spec, NetworkConfig(**state["network"]))
    env.close()
    load_module_state(path, state["actor"], actor, fix)
    meta = {k: v for k, v in state.items() if k != "actor"}
    meta["sha256"] = file_sha256(path)
    return actor, meta


def save_training_state(path: str | os.PathLike, config_key: str, loss: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Write everything a stage needs to carry on; `config_key` ties the file to the config that made it."""
    atomic_torch_save({"kind": TRAINING_STATE, "config_key": config_key, "loss": loss.state_dict(),
                       "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                       "progress": progress}, path)


def load_training_state(path: str | os.PathLike, config_key: str, loss: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Restore loss, optimizer and torch's RNG from a training state; returns the stage's progress."""
    restart = f"delete {path} to restart this stage from scratch"
    state = read_checkpoint(path, TRAINING_STATE, restart)
    if state.get("config_key") != config_key:
        raise CheckpointError(f"checkpoint {path} was written by another config; resume with the run's own "
                              f"config.yaml, or {restart}")
    load_module_state(path, state["loss"], loss, restart)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this config's optimizer ({exc}); {restart}") from None
    torch.set_rng_state(state["torch_rng"])
    return state["progress"]


def load_module_state(path: str | os.PathLike, state: dict, module: torch.nn.Module, fix: str) -> None:
    """`module.load_state_dict(state)`, with networks of another shape as a one-line `CheckpointError`."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this config's networks ({reason}); {fix}") from None


def save_agent(path: str | os.PathLike, loss: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The whole trained agent (the loss module's state and its optimiser's), for the stage that continues from it."""
    atomic_torch_save({"kind": AGENT, "loss": loss.state_dict(), "optimizer": optimizer.state_dict()}, path)


def load_agent(path: str | os.PathLike, loss: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load an agent saved by `save_agent` into `loss`; with `optimizer`, its moments and step counts too
    (the optimiser's learning rates stay its own)."""
    fix = "delete the stage folder that holds it to train that stage again"
    state = read_checkpoint(path, AGENT, fix)
    load_module_state(path, state["loss"], loss, fix)
    if optimizer is not None:
        rates = [group["lr"] for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"the optimiser state in {path} does not fit this agent's ({exc}); train without "
                                  "keeping it (finetune.keep_optimizer=false) or make both losses alike") from None
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate

"""The pipeline as data: typed dataclasses, loaded from YAML, with `key=value` overrides.

Validation is strict because a mistyped key in a long experiment otherwise costs hours: an unknown
key or a value of the wrong type raises `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cqlsac.components.cql_loss import LossConfig
from cqlsac.components.networks import NetworkConfig
from cqlsac.components.update import OptimConfig
from cqlsac.pipeline.dataset_creation import PRESETS

STAGES = ("pretrain", "dataset", "offline", "finetune", "evaluate")
MIXING_MODES = ("fixed", "annealed", "merged")


class ConfigError(ValueError):
    """A config file or override is invalid."""


@dataclass
class EnvConfig:
    id: str = "Pendulum-v1"
    kwargs: dict = field(default_factory=dict)


@dataclass
class PretrainConfig:
    """Online SAC from scratch; the loss runs with CQL weight 0."""

    frames: int = 8000
    init_random_frames: int = 1000
    frames_per_batch: int = 200
    utd_ratio: float = 1.0
    batch_size: int = 256
    # Every evaluation saves a checkpoint; Pendulum jumps from random to expert within ~1000
    # frames, so a medium policy (see `pick_medium`) needs checkpoints this close together.
    eval_every: int = 200
    eval_episodes: int = 3
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3))

    def __post_init__(self):
        check_numbers(self, "pretrain", positive=("utd_ratio", "batch_size", "eval_episodes"),
                      non_negative=("init_random_frames",))
        check_batch_grid("pretrain", self.frames, self.eval_every, self.frames_per_batch)


def check_numbers(config, section: str, positive=(), non_negative=()) -> None:
    """Counts and sizes in range: a zero or negative one otherwise fails deep inside torch, or not at all."""
    for names, low, what in ((positive, 0, "positive"), (non_negative, -1, "zero or more")):
        for name in names:
            value = getattr(config, name)
            if not value > low:
                raise ConfigError(f"{section}.{name} must be {what}, got {value}")


def check_batch_grid(section: str, frames: int, eval_every: int, frames_per_batch: int) -> None:
    """The collector delivers whole batches and evaluations happen between them, so `frames` and
    `eval_every` must be multiples of `frames_per_batch`: otherwise the collector overfills a buffer
    sized for `frames` and evaluations silently move."""
    for name, value in (("frames_per_batch", frames_per_batch), ("eval_every", eval_every), ("frames", frames)):
        if value < 1:
            raise ConfigError(f"{section}.{name} must be a positive number of frames, got {value}")
    for name, value, why in (("eval_every", eval_every, "evaluations happen between collector batches"),
                             ("frames", frames, "the collector delivers whole batches")):
        if value % frames_per_batch:
            raise ConfigError(f"{section}.{name} ({value}) must be a multiple of {section}.frames_per_batch "
                              f"({frames_per_batch}): {why}")


@dataclass
class DatasetConfig:
    """D^beta: either an existing Minari dataset (`name`) or one generated from the pretrain stage."""

    name: str | None = None
    preset: str = "medium"
    steps: int = 10000
    # Return level of the `medium` policy: this fraction of the way from random to the best return.
    medium_level: float = 1 / 3
    # Score the dataset against the best pretrain policy (D4RL normalisation). False, for smoke runs
    # whose pretraining is too short to beat random play: the dataset's own behaviour policy is the
    # 100 mark where it beats random (as `cqlsac datasets create` without --expert), else no scores;
    # such normalised scores do not compare across runs.
    reference_scores: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"dataset.preset must be one of {PRESETS}, got {self.preset!r}")
        check_numbers(self, "dataset", positive=("steps",))
        if not 0.0 <= self.medium_level <= 1.0:
            raise ConfigError(f"dataset.medium_level must be in [0, 1], got {self.medium_level}")


def cql_optim() -> OptimConfig:
    """Learning rates of the CQL agent, offline and after the switch to online data."""
    return OptimConfig(actor_lr=3e-4, critic_lr=1e-3, alpha_lr=1e-3)


@dataclass
class OfflineConfig:
    updates: int = 6000
    batch_size: int = 256
    log_every: int = 100
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=cql_optim)

    def __post_init__(self):
        check_numbers(self, "offline", positive=("batch_size", "log_every"), non_negative=("updates",))


@dataclass
class FinetuneConfig:
    """Offline-online combined training (spec section 5)."""

    frames: int = 5000
    # A divisor of `eval_every`, so that the half-budget point (2500 of 5000 frames) is evaluated.
    frames_per_batch: int = 100
    utd_ratio: float = 1.0
    batch_size: int = 256
    mixing: str = "fixed"
    offline_fraction: float = 0.5
    # With `annealed`, the offline fraction goes linearly from `offline_fraction` to this value.
    offline_fraction_end: float = 0.0
    # CQL weight after the switch to online data; None keeps the offline weight. 0 (SAC on the
    # mixed data from the CQL agent) by default: on Pendulum, keeping w = 5 stalled fine-tuning
    # (final -261 / -398 on seeds 1 / 2, against -142 / -147 with 0; README, "Results").
    cql_weight: float | None = 0.0
    calibrated: bool = False
    eval_every: int = 500
    # The fine-tuned agent against SAC from scratch: Pendulum's first 3 seeded starts are easy ones
    # (a policy that fails on most starts scores the optimum on them), so 10, as the final evaluation.
    eval_episodes: int = 10
    # Optimiser of the fine-tuning phase: a fresh Adam (the offline one's moments are not carried over).
    optim: OptimConfig = field(default_factory=cql_optim)
    # Also train SAC from scratch for the same number of frames, for the learning-curve comparison.
    sac_baseline: bool = True
    # Its critics, whatever `network.critic_layer_norm` gives the agent: plain by default, because
    # on Pendulum plain critics learn from scratch much faster (final -122 against -190 to -450 with
    # layer normalisation; README, "Results"), so the claim is tested against the stronger baseline.
    sac_baseline_critic_layer_norm: bool = False

    def __post_init__(self):
        if self.mixing not in MIXING_MODES:
            raise ConfigError(f"finetune.mixing must be one of {MIXING_MODES}, got {self.mixing!r}")
        for name in ("offline_fraction", "offline_fraction_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"finetune.{name} must be in [0, 1], got {getattr(self, name)}")
        check_numbers(self, "finetune", positive=("utd_ratio", "batch_size", "eval_episodes"))
        check_batch_grid("finetune", self.frames, self.eval_every, self.frames_per_batch)


@dataclass
class EvaluateConfig:
    episodes: int = 10
    seed: int = 10_000

    def __post_init__(self):
        check_numbers(self, "evaluate", positive=("episodes",))


@dataclass
class CheckpointConfig:
    """In-stage checkpoints, which `cqlsac run --resume RUN_DIR` continues from.

    No stage hash covers this section: how often a stage saves does not change what it computes.
    """

    offline_every: int = 500  # offline updates between checkpoints
    online_every: int = 1000  # collected frames between checkpoints (pretrain, finetune, SAC baseline)

    def __post_init__(self):
        for name in ("offline_every", "online_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"checkpoints.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class PipelineConfig:
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    output_dir: str = "runs"
    # Finished stage outputs, shared by runs: a stage with the same inputs is not run again.
    cache_dir: str = "runs/cache"
    logger: str = "csv"
    env: EnvConfig = field(default_factory=EnvConfig)
    # Layer-normalised critics: on Pendulum fine-tuning then recovers from the drop after the switch
    # within ~1500 online frames instead of ~3000 (README, "Results").
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(
        actor_hidden=(64, 64), critic_hidden=(64, 64), critic_layer_norm=True))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A mean Q-value beyond +-this bound is reported once as a warning (Q-values exploding); it does
    # not stop training. Far above the |Q| of the usual Gym rewards (|r| < 20, gamma 0.99).
    q_value_bound: float = 1e4

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; the stages are {list(STAGES)}")
        if not self.stages:
            raise ConfigError(f"stages: the list is empty; name one or more of {list(STAGES)}")
        if not self.q_value_bound > 0:
            raise ConfigError(f"q_value_bound must be positive, got {self.q_value_bound}")
        if self.logger not in ("csv", "tensorboard"):
            raise ConfigError(f"logger must be 'csv' or 'tensorboard', got {self.logger!r}")
        if self.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("logger: tensorboard is not installed; `pip install tensorboard` or use logger=csv")
        finetune_weight = self.offline.loss.cql_weight if self.finetune.cql_weight is None else self.finetune.cql_weight
        if self.finetune.calibrated and finetune_weight == 0:
            raise ConfigError("finetune.calibrated: Cal-QL changes the CQL penalty, which finetune.cql_weight = 0 "
                              "turns off; set finetune.cql_weight > 0 (or null to keep the offline weight)")

    # --- loading and saving -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "PipelineConfig":
        data = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
        for override in overrides:
            apply_override(data, override)
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def to_plain(obj: Any) -> Any:
    """Dataclasses and tuples to dicts and lists, for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def config_hash(*parts: Any) -> str:
    """A short stable hash of config parts (dataclasses, dicts, scalars)."""
    text = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def apply_override(data: dict, override: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. finetune.frames=2000")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)} "
                          f"(valid keys at {where}: {', '.join(sorted(names))})")
    # Start from the defaults, so that a partial section keeps its parent's defaults for the rest.
    merged = merge(to_plain(cls()), data)
    kwargs = {name: convert(hints[name], value, prefix + name) for name, value in merged.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`, recursively for mappings."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
    return out


def convert(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `hint`; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [convert(args[0], v, f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value

"""The pipeline as data: typed dataclasses with a docstring per field, loaded from YAML with `key=value` overrides.

Validation is strict because a mistyped key in a long experiment otherwise costs hours: pydantic
checks every key and type against the dataclasses, and any mistake is one `ConfigError` line that
names the dotted key. Numbers parse as YAML 1.2 does (`3e-4` and `1e3` are numbers), and a key
given twice is an error rather than a silent last-one-wins. Nothing here imports torch.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import inspect
import json
import re
import textwrap
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from cqlsac.components.config import STRICT, LossConfig, NetworkConfig, OptimConfig
from cqlsac.components.errors import UserError
from cqlsac.datasets.presets import PRESETS


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key and what it takes."""


SEED_LIMIT = 2**31  # a seed below it fits every RNG a stage seeds (torch's, numpy's, gymnasium's), offsets added


def seed_out_of_range(value: int) -> str | None:
    """What is wrong with `value` as a seed, or None: one rule for config keys and command-line options."""
    return None if 0 <= value < SEED_LIMIT else f"must be in [0, 2**31), got {value}"


def check_seed(value: int, key: str) -> None:
    if problem := seed_out_of_range(value):
        raise ConfigError(f"{key} {problem}")


def check_numbers(config, section: str, positive=(), non_negative=()) -> None:
    """Counts and sizes in range: a zero or negative one otherwise fails deep inside torch, or not at all."""
    for names, low, what in ((positive, 0, "positive"), (non_negative, -1, "zero or more")):
        for name in names:
            value = getattr(config, name)
            if not value > low:
                raise ConfigError(f"{section}.{name} must be {what}, got {value}")


@dataclass
class EnvConfig:
    """The gymnasium environment every stage runs."""

    __pydantic_config__ = STRICT

    id: str = "Pendulum-v1"
    """A gymnasium id with Box observations and Box (continuous) or Discrete actions."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of gymnasium.make, e.g. {continuous: true} for LunarLander-v3."""


@dataclass
class OnlineConfig:
    """An online training loop: collection, updates and evaluations."""

    __pydantic_config__ = STRICT

    section: ClassVar[str] = "online"

    frames: int = 5000
    """Environment steps to collect."""
    init_random_frames: int = 0
    """Frames of uniform random actions at the start. Pretraining and SAC from scratch make no update
    before they are in; fine-tuning updates from its first batch unless `finetune.warmup_frames` holds
    it back."""
    frames_per_batch: int = 100
    """Frames per collector batch; updates and evaluations happen between batches."""
    num_envs: int = 1
    """Environments the collector steps together, one policy call for all (frames_per_batch must be a
    multiple); the updates per collected frame stay `utd_ratio` whatever their number."""
    utd_ratio: float = 1.0
    """Updates per collected frame."""
    batch_size: int = 256
    """Transitions per update."""
    eval_every: int = 500
    """Frames between evaluations (a multiple of frames_per_batch)."""
    eval_episodes: int = 10
    """Episodes of the deterministic policy per evaluation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser of this loop (a fresh Adam)."""

    def __post_init__(self):
        section = self.section
        check_numbers(self, section, positive=("utd_ratio", "batch_size", "eval_episodes", "num_envs"),
                      non_negative=("init_random_frames",))
        for name in ("frames_per_batch", "eval_every", "frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{section}.{name} must be a positive number of frames, got {getattr(self, name)}")
        # The collector delivers whole batches and evaluations happen between them: otherwise the
        # collector overfills a buffer sized for `frames` and evaluations silently move.
        for name, why in (("eval_every", "evaluations happen between collector batches"),
                          ("frames", "the collector delivers whole batches"),
                          ("init_random_frames", "the collector acts at random for whole batches")):
            if getattr(self, name) % self.frames_per_batch:
                raise ConfigError(f"{section}.{name} ({getattr(self, name)}) must be a multiple of "
                                  f"{section}.frames_per_batch ({self.frames_per_batch}): {why}")
        if self.frames_per_batch % self.num_envs:
            raise ConfigError(f"{section}.frames_per_batch ({self.frames_per_batch}) must be a multiple of "
                              f"{section}.num_envs ({self.num_envs}): each batch holds the same steps of every env")


def sac_optim() -> OptimConfig:
    """Learning rates of SAC from scratch (pretraining and the baseline)."""
    return OptimConfig(actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3)


def cql_optim() -> OptimConfig:
    """Learning rates of the CQL agent, offline and after the switch to online data."""
    return OptimConfig(actor_lr=3e-4, critic_lr=1e-3, alpha_lr=1e-3)


@dataclass
class PretrainConfig(OnlineConfig):
    """Online SAC from scratch that trains the behaviour policies (the loss with CQL weight 0)."""

    section: ClassVar[str] = "pretrain"

    frames: int = 8000
    init_random_frames: int = 1000
    frames_per_batch: int = 200
    eval_every: int = 200
    """Frames between evaluations; each saves a checkpoint, and the medium policy is one of them,
    so they must be close together where the return rises fast (docs/pipeline.md)."""
    eval_episodes: int = 3
    optim: OptimConfig = field(default_factory=sac_optim)


@dataclass
class DatasetConfig:
    """D^beta: an existing Minari dataset (`name`) or one generated from the pretrain stage."""

    __pydantic_config__ = STRICT

    name: str | None = None
    """Id of a local Minari dataset to train on; it replaces the pretrain and dataset stages."""
    preset: str = "medium"
    """Preset of the generated dataset: D4RL's random, medium, expert, medium-replay or medium-expert, or
    final (the last pretraining checkpoint, as the seed recorded its data)."""
    steps: int = 10000
    """Environment steps in the generated dataset."""
    medium_level: float = 1 / 3
    """Return level of the medium policy: this fraction of the way from random to the best return."""
    reference_scores: bool = True
    """Score the dataset against the best pretrained policy (D4RL normalisation: 0 = random,
    100 = expert). When that policy does not beat random play, the dataset gets no scores and the
    run says so. False: the dataset's last behaviour policy (the expert of medium-expert) is the 100
    mark where it beats random, else no scores, and random and medium-replay datasets get none; such
    normalised scores do not compare across runs."""
    save_as: str | None = None
    """Id to store the generated dataset under (null: cqlsac/<env>/<preset>_<key>-v0). The run prints it;
    `dataset.name=ID` trains on it again."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"dataset.preset must be one of {PRESETS}, got {self.preset!r}")
        check_numbers(self, "dataset", positive=("steps",))
        if not 0.0 <= self.medium_level <= 1.0:
            raise ConfigError(f"dataset.medium_level must be in [0, 1], got {self.medium_level}")
        for key in ("name", "save_as"):
            if getattr(self, key) is not None:
                check_dataset_id(getattr(self, key), f"dataset.{key}")


def check_dataset_id(dataset_id: str, key: str) -> None:
    """An id Minari cannot store fails when the config is read, not when a stage reaches it."""
    from cqlsac.datasets.store import DatasetError, validate_dataset_id  # minari: only where an id is given

    try:
        validate_dataset_id(dataset_id)
    except DatasetError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@dataclass
class OfflineConfig:
    """CQL-SAC on the offline data alone."""

    __pydantic_config__ = STRICT

    updates: int = 6000
    """Gradient updates."""
    batch_size: int = 256
    """Transitions per update."""
    log_every: int = 100
    """Updates between logged (and reported) losses and Q-values."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The CQL-SAC loss (docs/loss.md)."""
    optim: OptimConfig = field(default_factory=cql_optim)
    """Optimiser of the offline updates."""

    def __post_init__(self):
        check_numbers(self, "offline", positive=("batch_size", "log_every"), non_negative=("updates",))


@dataclass
class FinetuneConfig(OnlineConfig):
    """Offline-online combined training from the offline agent (docs/pipeline.md)."""

    section: ClassVar[str] = "finetune"

    optim: OptimConfig = field(default_factory=cql_optim)
    start: Literal["offline", "scratch"] = "offline"
    """Where fine-tuning starts: the offline agent, or a fresh agent trained from the first step on
    the offline data and its own, with no offline-only phase (the seed's recipe, with mixing=merged,
    cql_weight=null, init_random_frames=1000 and warmup_frames=1000)."""
    mixing: Literal["fixed", "annealed", "merged"] = "fixed"
    """How batches mix offline and online rows: a fixed share, a share annealed linearly, or one
    uniform draw from the union of both."""
    offline_fraction: float = 0.5
    """Share of offline rows per batch (fixed; the start of the annealed ramp)."""
    offline_fraction_end: float = 0.0
    """Share of offline rows at the end of the annealed ramp."""
    cql_weight: float | None = 0.0
    """CQL weight after the switch to online data; null keeps the offline weight (docs/results.md)."""
    calibrated: bool = False
    """Cal-QL after the switch; refused with a fine-tuning CQL weight of 0, which turns the penalty off."""
    warmup_frames: int = 0
    """Frames the starting policy collects before any update (WSRL's warm-up; a multiple of frames_per_batch)."""
    keep_optimizer: bool = False
    """Carry the offline optimiser's moments and step counts over the switch (WSRL restores them); false
    starts a fresh Adam."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("offline_fraction", "offline_fraction_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"finetune.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_frames < 0 or self.warmup_frames % self.frames_per_batch:
            raise ConfigError(f"finetune.warmup_frames ({self.warmup_frames}) must be a multiple of "
                              f"finetune.frames_per_batch ({self.frames_per_batch}), zero or more")
        if self.keep_optimizer and self.start == "scratch":
            raise ConfigError("finetune.keep_optimizer carries the offline optimiser over; finetune.start=scratch "
                              "has none")


@dataclass
class BaselineConfig(OnlineConfig):
    """SAC from scratch on the fine-tuning budget: the curve fine-tuning is compared with."""

    section: ClassVar[str] = "baseline"

    init_random_frames: int = 1000
    optim: OptimConfig = field(default_factory=sac_optim)
    critic_layer_norm: bool = False
    """Layer-normalised critics for SAC from scratch, whatever `network.critic_layer_norm` gives the
    agent: plain ones learn faster from scratch here, so the comparison is with the stronger learner."""
    num_critics: int = 2
    """Critics of SAC from scratch (clipped double-Q), whatever ensemble a recipe gives the agent; the
    layer sizes are `network`'s."""
    seed_offset: int = 0
    """Added to `seed` for this stage, to run SAC from scratch on other seeds than the agent."""

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, "baseline", positive=("num_critics",))


@dataclass
class EvaluateConfig:
    """The final evaluation, and the seeds of every evaluation in the run."""

    __pydantic_config__ = STRICT

    episodes: int = 10
    """Episodes of the final policy (deterministic, or sampled with `sample_actions`)."""
    seed: int = 10_000
    """Env seed of the first evaluation episode (episode i uses seed + i), in every stage."""
    sample_actions: bool = False
    """Sample the final evaluation's actions from the policy instead of taking its deterministic action
    (the seed's protocol); with 100 episodes or more the report also gives the lowest mean of 100
    consecutive episodes."""

    def __post_init__(self):
        check_numbers(self, "evaluate", positive=("episodes",))
        check_seed(self.seed, "evaluate.seed")


@dataclass
class CheckpointConfig:
    """In-stage checkpoints, which `cqlsac run --resume RUN_DIR` continues from.

    No stage's cache key covers this section: how often a stage saves does not change what it computes.
    """

    __pydantic_config__ = STRICT

    offline_every: int = 500
    """Offline updates between checkpoints."""
    online_every: int = 1000
    """Collected frames between checkpoints (pretrain, finetune, baseline)."""

    def __post_init__(self):
        for name in ("offline_every", "online_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"checkpoints.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class ReportConfig:
    """What the report adds to the evaluation curves. No stage's cache key covers it."""

    __pydantic_config__ = STRICT

    episode_return_level: float | None = None
    """A training return level: the report counts the training episodes fine-tuning and SAC from scratch
    need until the mean return of their last `episode_window` episodes first reaches it (the seed's
    measure; null: not counted)."""
    episode_window: int = 20
    """Training episodes averaged for `episode_return_level`."""

    def __post_init__(self):
        check_numbers(self, "report", positive=("episode_window",))


StageName = Literal["pretrain", "dataset", "offline", "finetune", "evaluate", "baseline"]


def default_stages() -> list[str]:
    return ["finetune", "baseline", "evaluate"]


@dataclass
class PipelineConfig:
    """A whole pipeline run; `PipelineConfig()` is the default that `cqlsac run` runs."""

    __pydantic_config__ = STRICT

    seed: int = 0
    """Seed of every stage (each stage adds its own offset)."""
    recipe: str | None = None
    """A fine-tuning recipe bundled with cqlsac (cql, calql, seed, wsrl, rlpd). Named in a config file,
    its settings lie under that file's keys; named by an override (`recipe=NAME`), over the file and
    under the other overrides, and the file's own recipe is then not applied (docs/recipes.md)."""
    stages: list[StageName] = field(default_factory=default_stages)
    """Stages to run; the stages they read run first (or are reused): by default all that fine-tuning,
    SAC from scratch and the final evaluation need."""
    output_dir: str = "runs"
    """Where run directories are made."""
    cache_dir: str = "runs/cache"
    """Finished stage outputs, shared by runs: a stage whose inputs are the same is not run again."""
    logger: Literal["csv", "tensorboard"] = "csv"
    """Logger of the training curves in the run directory."""
    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(
        actor_hidden=(64, 64), critic_hidden=(64, 64), critic_layer_norm=True))
    """Networks of the pipeline's agent, in every stage."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    q_value_bound: float = 1e4
    """A mean Q-value beyond +-this is reported once as a warning (critics diverging); training goes on."""
    compile: bool = False
    """Run every loss through torch.compile: faster updates at small networks after a one-off compile
    (cached on disk), the same computation up to float rounding (docs/performance.md)."""

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: the list is empty; name one or more stages, e.g. [offline]")
        if self.dataset.name is not None and "pretrain" in self.stages:
            raise ConfigError(f"stages: pretrain trains the policies that record a dataset, and dataset.name="
                              f"{self.dataset.name} names the dataset to use instead; drop one of the two")
        check_seed(self.seed, "seed")
        check_seed(self.seed + self.baseline.seed_offset, "seed + baseline.seed_offset")
        if not self.q_value_bound > 0:
            raise ConfigError(f"q_value_bound must be positive, got {self.q_value_bound}")
        if self.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("logger: tensorboard is not installed; `pip install tensorboard` or use logger=csv")
        for key, loss in (("offline.loss", self.offline.loss), ("finetune", finetune_loss(self.offline.loss, self.finetune))):
            if loss.target_subset is not None and loss.target_subset > self.network.num_critics:
                raise ConfigError(f"{key}.target_subset ({loss.target_subset}) is more than network.num_critics "
                                  f"({self.network.num_critics})")
        if self.finetune.calibrated and finetune_loss(self.offline.loss, self.finetune).cql_weight == 0:
            raise ConfigError("finetune.calibrated: Cal-QL changes the CQL penalty, which finetune.cql_weight = 0 "
                              "turns off; set finetune.cql_weight > 0 (or null to keep the offline weight)")

    # --- loading and saving -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> PipelineConfig:
        """The config of plain data; the recipe it names lies under it."""
        if isinstance(data, dict) and data.get("recipe") is not None:
            data = merge_over(read_yaml(recipe_path(data["recipe"])), data)
        return validate(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
        """The config of a YAML file (a path, or the name of a bundled example such as `lunarlander`;
        None: the default) with `key=value` overrides laid over it. A recipe named in the file lies
        under the file's keys; one named by an override (`recipe=rlpd`) lies over the file and under
        the other overrides, so that a bundled config with a recipe runs that recipe on the config's
        task and budgets (e.g. RLPD's critic updates per frame, not the config's). Such an override
        replaces the file's recipe: one recipe applies, never two."""
        data = read_yaml(resolve_config_path(path)) if path is not None else {}
        given: dict = {}
        seen: dict[str, str] = {}
        for override in overrides:
            key = apply_override(given, override)
            if key in seen:
                raise ConfigError(f"{key} is given twice ({seen[key]!r} and {override!r}); give it once")
            seen[key] = override
        if given.get("recipe") is not None:
            data = merge_over(data, read_yaml(recipe_path(given["recipe"])))
        return cls.from_dict(merge_over(data, given))

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self, path: str | Path | None = None, comments: bool = False) -> str:
        """The config as YAML; with `comments`, each key preceded by its documentation."""
        text = documented_yaml(self) if comments else yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def finetune_loss(offline: LossConfig, finetune: FinetuneConfig) -> LossConfig:
    """The offline loss with fine-tuning's CQL weight and Cal-QL setting."""
    weight = offline.cql_weight if finetune.cql_weight is None else finetune.cql_weight
    return dataclasses.replace(offline, cql_weight=weight, calibrated=finetune.calibrated or offline.calibrated)


# --- YAML ---------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers (`3e-4`, `1e3` are floats, not strings) and no duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = []  # a list: YAML allows unhashable keys, which validation then refuses
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key} given twice (again on line {key_node.start_mark.line + 1})")
            seen.append(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    except ConfigError as exc:  # a key given twice
        raise ConfigError(f"{where}: {exc}") from None


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a config bundled with cqlsac (`pendulum`, `lunarlander`, ...)."""
    if not str(path).strip():  # Path("") is the current folder
        raise ConfigError(f"the config name is empty; name a YAML file or a bundled config "
                          f"({', '.join(sorted(bundled_configs()))})")
    path = Path(path)
    if path.is_file():
        return path
    bundled = bundled_configs()
    if path.suffix == "" and path.name in bundled:
        return bundled[path.name]
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; name a YAML file or a bundled config "
                          f"({', '.join(sorted(bundled))})")
    hint = "; an override looks like key=value" if "." in path.name and path.suffix not in (".yaml", ".yml") else ""
    raise ConfigError(f"config file {path} does not exist (bundled configs: {', '.join(sorted(bundled))}){hint}")


def bundled_configs(package: str = "cqlsac.configs") -> dict[str, Path]:
    """The example configs (or recipes) installed with cqlsac, by name."""
    folder = importlib.resources.files(package)
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def recipe_path(name: str) -> Path:
    recipes = bundled_configs("cqlsac.configs.recipes")
    if not isinstance(name, str) or name not in recipes:
        raise ConfigError(f"recipe must be one of {sorted(recipes)}, got {name!r}")
    return recipes[name]


def merge_over(base: dict, update: dict) -> dict:
    """`update` laid over `base`, section by section."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (merge_over(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict)
                       else value)
    return merged


def read_yaml(path: Path, what: str = "config file") -> dict:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text; it should be a YAML file") from None
    data = parse_yaml(text, f"{what} {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict, override: str) -> str:
    """Apply `a.b.c=value` to a nested dict (the value parsed as YAML); returns the dotted key."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. finetune.frames=2000")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        value = raw
    except ConfigError as exc:  # a key given twice
        raise ConfigError(f"override {override!r}: {exc}") from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


# --- validation -----------------------------------------------------------------------------
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "list": "a list", "tuple": "a list", "dict": "a mapping", "dataclass": "a mapping"}


@cache
def _adapter(cls: type):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def validate(cls: type, data: Any) -> Any:
    """Instantiate dataclass `cls` from plain data, checking every key and type; a mistake is a `ConfigError`."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    refuse_bools(cls, data)
    try:
        return _adapter(cls).validate_python(over_defaults(cls(), data))
    except ValidationError as exc:
        raise ConfigError(_describe(cls, exc.errors()[0])) from None


def refuse_bools(cls: type, data: dict, where: tuple[str, ...] = ()) -> None:
    """`true` or `false` where a number goes is a mistake, which pydantic would read as 1 or 0."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        kinds = typing.get_args(hints.get(key)) or (hints.get(key),)
        section = next((kind for kind in kinds if dataclasses.is_dataclass(kind)), None)
        if section is not None and isinstance(value, dict):
            refuse_bools(section, value, (*where, key))
        elif bool not in kinds and any(isinstance(v, bool) for v in (value if isinstance(value, list) else [value])):
            if any(kind in (int, float) or typing.get_origin(kind) in (list, tuple) for kind in kinds):
                what = "a list of numbers" if isinstance(value, list) else "a number"
                raise ConfigError(f"{'.'.join((*where, key))} must be {what}, got {json.dumps(value)}")


def over_defaults(default: Any, data: dict) -> dict:
    """`data` laid over the plain form of `default`, section by section, so that a partial section
    keeps its parent's defaults (e.g. the pipeline's 64x64 networks, not `NetworkConfig()`'s)."""
    merged = to_plain(default)
    for key, value in data.items():
        section = getattr(default, key, None) if isinstance(key, str) else None
        merged[key] = (over_defaults(section, value) if dataclasses.is_dataclass(section) and isinstance(value, dict)
                       else value)
    return merged


def _describe(cls: type, error: dict) -> str:
    """One line for a pydantic error: the dotted key, what it takes and what it got."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(part if not part.isdigit() else f"[{part}]" for part in loc).replace(".[", "[")
    kind, value = error["type"], error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        section = _section_class(cls, loc[:-1])
        names = ", ".join(f.name for f in dataclasses.fields(section)) if section else ""
        where = ".".join(loc[:-1]) or "the top level"
        return f"unknown config key(s) {key} (valid keys at {where}: {names})"
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        return message if not loc or message.startswith(loc[0]) else f"{key}: {message}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {value!r}"
    if kind == "literal_error":
        return f"{key} must be one of {error['ctx']['expected']}, got {value!r}"
    for word, what in _TYPE_WORDS.items():
        if kind.startswith(word):
            return f"{key} must be {what}, got {value!r}"
    return f"{key}: {error['msg']} (got {value!r})"


def _section_class(cls: type, loc: list[str]) -> type | None:
    """The dataclass of the section at `loc` under `cls` (None past a non-dataclass)."""
    for part in loc:
        hint = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        candidates = [c for c in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(c)]
        if not candidates:
            return None
        cls = candidates[0]
    return cls


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


# --- documentation ----------------------------------------------------------------------------
@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (base classes' too), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def documented_yaml(config: Any, indent: int = 0) -> str:
    """YAML of a config dataclass with each key's documentation as a comment above it."""
    lines = []
    pad = " " * indent
    docs = field_docs(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        doc = docs.get(f.name, "")
        if not doc and dataclasses.is_dataclass(value):
            doc = (inspect.getdoc(type(value)) or "").split("\n")[0]
        for line in textwrap.wrap(doc, 96 - indent):
            lines.append(f"{pad}# {line}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(documented_yaml(value, indent + 2))
        else:
            dumped = yaml.safe_dump(to_plain(value), default_flow_style=True, width=1000)
            lines.append(f"{pad}{f.name}: {dumped.removesuffix(chr(10)).removesuffix(chr(10) + '...')}")
    return "\n".join(lines) + ("\n" if indent == 0 else "")

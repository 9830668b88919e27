"""Typed experiment configs: YAML files of nested sections, overridden by `key=value` arguments.

    cfg = load_config("configs/quickstart.yaml", ["optim.learning_rate=1e-3", "run.steps=200"])

Every key must name a field (unknown keys are errors that list the known ones); values are
checked against the field's type and range (numbers finite; counts, sizes and steps positive;
names among the known ones), including the ModelConfig fields in `model.overrides`, so a bad
value is one `ConfigKeyError` naming the key before anything is built or loaded. YAML syntax
errors name the file (or override) and the line. Sections: model, data, optim, lora, rl, run,
eval, mesh (and the top-level key `algorithm`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from gptoss_jax import config as model_config_lib
from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax.expert_parallel import DISPATCH
from gptoss_jax.lora import TARGETS as LORA_TARGETS
from gptoss_jax.model import EXPERT_FORMATS, REMAT_POLICIES
from gptoss_jax.sharding import MESH_AXES
from gptoss_jax.train import rewards as rewards_lib
from gptoss_jax.train.step import OptimConfig


class ConfigKeyError(ValueError):
    pass


# Float dtypes a model can be built or loaded in (what `model.dtype` and the CLI's --dtype take).
DTYPES = ("bfloat16", "float16", "float32")
PRESETS = {
    "tiny": model_config_lib.tiny,
    "gpt_oss_20b": model_config_lib.gpt_oss_20b,
    "gpt_oss_120b": model_config_lib.gpt_oss_120b,
}
REASONING_EFFORTS = ("low", "medium", "high")
RL_AGGREGATES = ("token", "sequence")


def check_dtype(value, where: str = "dtype") -> str:
    """`value` if it names one of `DTYPES`, else a ConfigKeyError that lists them."""
    if not isinstance(value, str) or value not in DTYPES:
        raise ConfigKeyError(f"{where} must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _need_int(value, where: str, low: int, what: str | None = None) -> None:
    if not _is_int(value) or value < low:
        raise ConfigKeyError(f"{where} must be {what or f'an integer >= {low}'}, got {value!r}")


def _need_number(value, where: str, ok, what: str) -> None:
    if not _is_number(value) or not ok(value):
        raise ConfigKeyError(f"{where} must be {what}, got {value!r}")


def _need_choice(value, where: str, choices) -> None:
    if value not in choices:
        raise ConfigKeyError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _model_overrides(preset: str, overrides) -> dict:
    """`overrides` checked against ModelConfig's fields and types (a YAML string such as 1e6 read
    as a number); the preset with them applied must be a valid ModelConfig."""
    if not isinstance(overrides, Mapping):
        raise ConfigKeyError(f"model.overrides must be a mapping of ModelConfig fields, got {overrides!r}")
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(map(str, set(overrides) - set(fields)))
    if unknown:
        raise ConfigKeyError(
            f"unknown key(s) {', '.join('model.overrides.' + k for k in unknown)}; "
            f"known ModelConfig fields: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(ModelConfig)
    out = {k: _coerce(v, hints[k], f"model.overrides.{k}") for k, v in overrides.items()}
    try:
        PRESETS[preset]().replace(**out)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigKeyError(f"model.overrides on preset {preset}: {e}") from None
    return out


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint: str | None = None  # a checkpoint folder; None = random init from `preset`
    preset: str = "tiny"  # tiny | gpt_oss_20b | gpt_oss_120b (with `overrides` for tiny shapes)
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields
    dtype: str = "bfloat16"
    experts: str = "mxfp4"
    tokenizer: str = "o200k_harmony"  # "o200k_harmony", a tokenizer.json, or a checkpoint folder
    remat: str = "none"  # none | dots | full: what the backward pass recomputes (KernelOptions.remat)
    loss_chunk: int = 0  # > 0: the SFT loss makes the logits this many positions at a time (0 = all at once)
    # expert parallelism (mesh expert > 1): null = dropless; else buffers sized by this factor of the
    # mean load, overflow dropped and counted (KernelOptions.capacity_factor)
    capacity_factor: float | None = None
    # expert parallelism: how rows move between devices (KernelOptions.expert_dispatch):
    # null = by platform; "all_to_all" (fixed-capacity buffers) | "ragged_all_to_all"
    expert_dispatch: str | None = None

    def __post_init__(self):
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint):
            raise ConfigKeyError(f"model.checkpoint must be a checkpoint folder (or null), got {self.checkpoint!r}")
        _need_choice(self.preset, "model.preset", tuple(PRESETS))
        object.__setattr__(self, "overrides", _model_overrides(self.preset, self.overrides))
        check_dtype(self.dtype, "model.dtype")
        _need_choice(self.experts, "model.experts", EXPERT_FORMATS)
        _need_choice(self.remat, "model.remat", tuple(REMAT_POLICIES))
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigKeyError(
                f"model.tokenizer must be 'o200k_harmony', a tokenizer.json or a checkpoint "
                f"folder, got {self.tokenizer!r}"
            )
        _need_int(self.loss_chunk, "model.loss_chunk", 0, "an integer >= 0 (0 = the whole sequence at once)")
        if self.capacity_factor is not None:
            _need_number(
                self.capacity_factor, "model.capacity_factor", lambda v: v > 0, "a number > 0 (or null: dropless)"
            )
        if self.expert_dispatch is not None:
            _need_choice(self.expert_dispatch, "model.expert_dispatch", DISPATCH)


@dataclasses.dataclass(frozen=True)
class LoRASection:
    enabled: bool = False  # train adapters over the frozen base instead of the base's Params
    rank: int = 8
    alpha: float = 16.0
    targets: list = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o", "w1", "w2"])
    train_norms_and_sinks: bool = False  # also train the RMSNorm gains and attention sinks

    def __post_init__(self):
        _need_int(self.rank, "lora.rank", 1)
        _need_number(self.alpha, "lora.alpha", lambda v: v > 0, "a finite number > 0")
        targets = self.targets if isinstance(self.targets, (list, tuple)) else None
        if not targets or not all(isinstance(t, str) and t in LORA_TARGETS for t in targets):
            raise ConfigKeyError(
                f"lora.targets must be a non-empty list of {', '.join(LORA_TARGETS)}, got {self.targets!r}"
            )


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = ""
    eval: str | None = None
    seq_len: int = 512
    batch_size: int = 8  # rows per optimizer step (all hosts), split into accum_steps micro-batches
    accum_steps: int = 1
    strict: bool = False  # malformed lines / over-long examples are fatal instead of counted
    reasoning_effort: str = "low"
    keep_analysis: bool = True  # train on the analysis (chain of thought) before a final answer

    def __post_init__(self):
        _need_int(self.seq_len, "data.seq_len", 2)
        _need_int(self.batch_size, "data.batch_size", 1)
        _need_int(self.accum_steps, "data.accum_steps", 1)
        _need_choice(self.reasoning_effort, "data.reasoning_effort", REASONING_EFFORTS)


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/train"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True
    tensorboard: bool = True  # also write TensorBoard events (when tensorboardX is installed)
    plots: bool = True  # plot the curves to run.out_dir/curves.png at the end

    def __post_init__(self):
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigKeyError(f"run.out_dir must be a folder, got {self.out_dir!r}")
        _need_int(self.steps, "run.steps", 0)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigKeyError(f"run.seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("log_every", "save_every", "keep_checkpoints", "max_bad_steps"):
            _need_int(getattr(self, name), f"run.{name}", 1)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    accuracy: bool = True  # also generate answers to data.eval and score their final messages
    max_new_tokens: int = 64
    batch_size: int = 16
    limit: int = 0  # score at most this many conversations (0 = all)

    def __post_init__(self):
        _need_int(self.max_new_tokens, "eval.max_new_tokens", 1)
        _need_int(self.batch_size, "eval.batch_size", 1)
        _need_int(self.limit, "eval.limit", 0, "an integer >= 0 (0 = all)")


@dataclasses.dataclass(frozen=True)
class RLSection:
    """GRPO / GSPO (`algorithm: grpo | gspo`); prompts and reference answers come from data.train."""

    group_size: int = 8  # samples per prompt (G)
    prompts_per_step: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (> 1: the ratio moves off 1)
    clip_eps: float | None = None  # None: 0.2 for GRPO, 3e-4 for GSPO (the papers' values)
    kl_coef: float = 0.0  # k3 KL to the reference (the start; with LoRA, the base without adapters)
    normalize_std: bool = True  # divide advantages by the group's reward std
    aggregate: str = "token"  # GRPO: "token" (every response token weighs the same) | "sequence"
    rewards: dict = dataclasses.field(default_factory=lambda: {"exact_match": 1.0, "format": 0.1})
    eval_every: int = 0  # held-out task accuracy every N steps (0: at the start and the end only)
    shuffle_rewards: bool = False  # a control: each step's rewards permuted across its samples

    def __post_init__(self):
        _need_int(self.group_size, "rl.group_size", 2, "an integer >= 2 (advantages are relative to the group)")
        _need_int(self.prompts_per_step, "rl.prompts_per_step", 1)
        _need_number(self.temperature, "rl.temperature", lambda v: v >= 0, "a finite number >= 0")
        _need_number(self.top_p, "rl.top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        _need_int(self.max_new_tokens, "rl.max_new_tokens", 1)
        _need_int(self.updates_per_rollout, "rl.updates_per_rollout", 1)
        if self.clip_eps is not None:
            _need_number(self.clip_eps, "rl.clip_eps", lambda v: v > 0, "a finite number > 0 (or null: the default)")
        _need_number(self.kl_coef, "rl.kl_coef", lambda v: v >= 0, "a finite number >= 0")
        _need_choice(self.aggregate, "rl.aggregate", RL_AGGREGATES)
        if not isinstance(self.rewards, Mapping) or not all(_is_number(v) for v in self.rewards.values()):
            raise ConfigKeyError(f"rl.rewards must map reward names to finite weights, got {self.rewards!r}")
        try:
            rewards_lib.from_config(self.rewards)
        except ValueError as e:
            raise ConfigKeyError(f"rl.rewards: {e}") from None
        _need_int(self.eval_every, "rl.eval_every", 0, "an integer >= 0 (0 = at the start and the end only)")
        if not isinstance(self.shuffle_rewards, bool):
            raise ConfigKeyError(f"rl.shuffle_rewards must be true or false, got {self.shuffle_rewards!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    algorithm: str = "sft"  # sft | grpo | gspo
    optim: OptimConfig = OptimConfig()
    lora: LoRASection = LoRASection()
    rl: RLSection = RLSection()
    run: RunSection = RunSection()
    eval: EvalSection = EvalSection()
    mesh: dict = dataclasses.field(default_factory=dict)  # {"data": .., "fsdp": .., ...}; {} = one device

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ConfigKeyError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        _check_optim(self.optim)
        _check_mesh(self.mesh)


ALGORITHMS = ("sft", "grpo", "gspo")


def _check_optim(o: OptimConfig) -> None:
    _need_number(o.learning_rate, "optim.learning_rate", lambda v: v >= 0, "a finite number >= 0")
    _need_int(o.warmup_steps, "optim.warmup_steps", 0)
    _need_int(o.total_steps, "optim.total_steps", 1)
    if o.total_steps <= o.warmup_steps:
        raise ConfigKeyError(f"optim.total_steps ({o.total_steps}) must exceed optim.warmup_steps ({o.warmup_steps})")
    for name in ("end_learning_rate_fraction", "weight_decay", "router_aux_loss"):
        _need_number(getattr(o, name), f"optim.{name}", lambda v: v >= 0, "a finite number >= 0")
    for name in ("b1", "b2"):
        _need_number(getattr(o, name), f"optim.{name}", lambda v: 0 <= v < 1, "in [0, 1)")
    _need_number(o.eps, "optim.eps", lambda v: v > 0, "a finite number > 0")
    if o.clip_norm is not None:
        _need_number(o.clip_norm, "optim.clip_norm", lambda v: v > 0, "a finite number > 0 (or null: no clipping)")


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mapping):
        raise ConfigKeyError(f"mesh must map axes ({', '.join(MESH_AXES)}) to sizes, got {mesh!r}")
    unknown = sorted(map(str, set(mesh) - set(MESH_AXES)))
    if unknown:
        raise ConfigKeyError(
            f"unknown mesh axes {', '.join('mesh.' + k for k in unknown)}; known: {', '.join(MESH_AXES)}"
        )
    for axis, size in mesh.items():
        if not _is_int(size) or not (size >= 1 or size == -1):
            raise ConfigKeyError(f"mesh.{axis} must be a positive integer or -1 (the remaining devices), got {size!r}")


_SCALARS = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def _coerce(value, tp, where: str):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is tuple or typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigKeyError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if tp is list or typing.get_origin(tp) is list:
        if isinstance(value, str):  # key=a,b,c on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigKeyError(f"{where} must be a list, got {value!r}")
        return list(value)
    if tp not in _SCALARS:
        return value
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    accepted, what = _SCALARS[tp]
    if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
        raise ConfigKeyError(f"{where} must be {what}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigKeyError(f"{where} must be a finite number, got {value!r}")
    return float(value) if tp is float else value


def _build(cls, values: Mapping, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigKeyError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigKeyError(f"{where}{name} must be a section (a mapping)")
            kwargs[name] = _build(tp, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, where + name)
    return cls(**kwargs)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where (1-based line and column) and what."""

    def at(mark):
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    text = " ".join(str(getattr(e, "problem", None) or e).split())
    if mark is not None:
        text = f"{at(mark)}: {text}"
    if context:
        cmark = getattr(e, "context_mark", None)
        text += f" ({' '.join(context.split())}{' started at ' + at(cmark) if cmark is not None else ''})"
    return text


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise ConfigKeyError(f"override key {dotted!r} has an empty part; write section.key=value, e.g. run.steps=100")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigKeyError(f"{dotted}: {k} is not a section")
    tree[keys[-1]] = value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigKeyError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigKeyError(f"{path} must hold a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigKeyError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigKeyError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                "quote a plain string, e.g. key='a: b'"
            ) from None
        _set(raw, key.strip(), value)
    return _build(ExperimentConfig, raw, "")


def from_dict(raw: Mapping) -> ExperimentConfig:
    """The inverse of `to_dict` (e.g. a run's saved config.json), with the same checks."""
    return _build(ExperimentConfig, raw, "")


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)

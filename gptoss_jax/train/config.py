"""Typed experiment configs: YAML files of nested sections, overridden by `key=value` arguments.

    cfg = load_config("configs/quickstart.yaml", ["optim.learning_rate=1e-3", "run.steps=200"])

Every key must name a field (unknown keys are errors that list the known ones); values are
checked against the field's type. Sections: model, data, optim, lora, rl, run, eval, mesh
(and the top-level key `algorithm`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from gptoss_jax.train.step import OptimConfig


class ConfigKeyError(ValueError):
    pass


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


@dataclasses.dataclass(frozen=True)
class LoRASection:
    enabled: bool = False  # train adapters over the frozen base instead of the base's Params
    rank: int = 8
    alpha: float = 16.0
    targets: list = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o", "w1", "w2"])
    train_norms_and_sinks: bool = False  # also train the RMSNorm gains and attention sinks


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


@dataclasses.dataclass(frozen=True)
class EvalSection:
    accuracy: bool = True  # also generate answers to data.eval and score their final messages
    max_new_tokens: int = 64
    batch_size: int = 16
    limit: int = 0  # score at most this many conversations (0 = all)


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


ALGORITHMS = ("sft", "grpo", "gspo")


_SCALARS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"),
            float: ((int, float), "a number"), str: ((str,), "a string")}


def _coerce(value, tp, where: str):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
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
    return float(value) if tp is float else value


def _build(cls, values: Mapping, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigKeyError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                             f"known: {', '.join(sorted(fields))}")
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


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigKeyError(f"{dotted}: {k} is not a section")
    tree[keys[-1]] = value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigKeyError(f"{path} must hold a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigKeyError(f"override {item!r} is not key=value")
        _set(raw, key.strip(), yaml.safe_load(text))
    return _build(ExperimentConfig, raw, "")


def from_dict(raw: Mapping) -> ExperimentConfig:
    """The inverse of `to_dict` (e.g. a run's saved config.json), with the same checks."""
    return _build(ExperimentConfig, raw, "")


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)

"""Architecture configuration for gpt-oss.

`ModelConfig` describes the network only: mesh, kernel choice, dtypes and sampling are runtime
arguments elsewhere. Presets reproduce the released models exactly (`gpt_oss_20b`, `gpt_oss_120b`);
`tiny` builds small models with the same structure for tests. `from_pretrained` reads either the
HF hub `config.json` (both the `rope_scaling` and the transformers-v5 `rope_parameters` spellings)
or the reference `original/config.json`, whose keys differ and which leaves eps, alpha and the
layer pattern implicit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A configuration or config file that cannot describe a gpt-oss model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 201088
    d_model: int = 2880
    num_layers: int = 24
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    expert_dim: int = 2880  # F: width of one expert; the fused gate/up projection is 2F wide
    sliding_window: int = 128  # keys a sliding layer sees, the current token included
    # None means the released pattern: even layers sliding, odd layers full.
    layer_types: tuple[str, ...] | None = None
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_original_context: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    max_position: int = 131072
    rms_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self):
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_type(self, layer: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[layer]
        return SLIDING if layer % 2 == 0 else FULL

    def is_sliding(self, layer: int) -> bool:
        return self.layer_type(layer) == SLIDING

    @property
    def rope_concentration(self) -> float:
        """YaRN attention factor, folded into both cos and sin (so scores carry its square)."""
        return 0.1 * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1.0 else 1.0

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid ModelConfig: {msg}")

        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "experts_per_token",
            "expert_dim",
            "sliding_window",
            "rope_original_context",
            "max_position",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        for name in (
            "rope_theta",
            "rope_factor",
            "rope_beta_fast",
            "rope_beta_slow",
            "rms_eps",
            "swiglu_limit",
            "swiglu_alpha",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
                f"{name} must be a finite number, got {value!r}",
            )
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(isinstance(self.rope_truncate, bool), f"rope_truncate must be true or false, got {self.rope_truncate!r}")
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})",
        )
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for the half-split RoPE")
        need(
            self.experts_per_token <= self.num_experts,
            f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})",
        )
        need(self.rms_eps > 0, f"rms_eps must be positive, got {self.rms_eps}")
        need(self.swiglu_limit > 0, f"swiglu_limit must be positive, got {self.swiglu_limit}")
        need(self.rope_factor >= 1.0, f"rope_factor must be >= 1, got {self.rope_factor}")
        need(
            self.rope_beta_fast > self.rope_beta_slow > 0,
            f"need rope_beta_fast > rope_beta_slow > 0, got {self.rope_beta_fast}, {self.rope_beta_slow}",
        )
        if self.layer_types is not None:
            need(
                len(self.layer_types) == self.num_layers,
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers",
            )
            bad = sorted(set(self.layer_types) - {SLIDING, FULL})
            need(not bad, f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")

    def validate_mxfp4(self) -> None:
        """MXFP4 blocks are 32 values along each expert matmul's input axis."""
        for name in ("d_model", "expert_dim"):
            value = getattr(self, name)
            if value % 32:
                raise ConfigError(
                    f"invalid ModelConfig for MXFP4 experts: {name} ({value}) must be a multiple of 32 "
                    "(one MXFP4 block is 32 values along the contraction axis)"
                )

    def replace(self, **changes: Any) -> ModelConfig:
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}")
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- file I/O
    def to_hf_dict(self) -> dict[str, Any]:
        """The HF hub `config.json` for this architecture (transformers' GptOssConfig keys)."""
        # Special ids only make sense when the vocabulary holds them (tiny test models do not).
        has_specials = self.vocab_size > 200002
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002 if has_specials else None,
            "pad_token_id": 199999 if has_specials else None,
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.d_model,
            "initial_context_length": self.rope_original_context,
            "initializer_range": 0.02,
            "intermediate_size": self.expert_dim,
            "layer_types": [self.layer_type(i) for i in range(self.num_layers)],
            "max_position_embeddings": self.max_position,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_eps,
            "rope_scaling": {
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.rope_original_context,
                "rope_type": "yarn",
                "truncate": self.rope_truncate,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original_dict(self) -> dict[str, Any]:
        """The reference `original/config.json` (keys of gpt_oss.torch.model.ModelConfig)."""
        if self.layer_types is not None and any(
            self.layer_types[i] != (SLIDING if i % 2 == 0 else FULL) for i in range(self.num_layers)
        ):
            raise ConfigError("the original/ config format cannot express a custom layer_types pattern")
        return {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.expert_dim,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_context,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if d.get("model_type") not in (None, "gpt_oss"):
            raise ConfigError(f"config.json has model_type {d.get('model_type')!r}, expected 'gpt_oss'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 150000.0))
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ConfigError(f"unsupported rope_type {rope.get('rope_type')!r}; gpt-oss uses 'yarn'")
        try:
            layers = int(d["num_hidden_layers"])
            kw = dict(
                vocab_size=int(d["vocab_size"]),
                d_model=int(d["hidden_size"]),
                num_layers=layers,
                num_heads=int(d["num_attention_heads"]),
                num_kv_heads=int(d["num_key_value_heads"]),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
                num_experts=int(d.get("num_local_experts", d.get("num_experts"))),
                experts_per_token=int(d.get("num_experts_per_tok", d.get("experts_per_token"))),
                expert_dim=int(d["intermediate_size"]),
                sliding_window=int(d["sliding_window"]),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config.json lacks or mistypes a required key: {e}") from None
        layer_types = d.get("layer_types")
        if layer_types is not None:
            layer_types = tuple(layer_types)
            if all(t == (SLIDING if i % 2 == 0 else FULL) for i, t in enumerate(layer_types)):
                layer_types = None  # the default pattern; keep configs comparable with presets
        return cls(
            **kw,
            layer_types=layer_types,
            rope_theta=float(theta),
            rope_factor=float(rope.get("factor", 1.0)),
            rope_original_context=int(
                rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096))
            ),
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            # transformers treats a missing `truncate` as True; gpt-oss always sets false.
            rope_truncate=bool(rope.get("truncate", True)),
            max_position=int(d.get("max_position_embeddings", 131072)),
            rms_eps=float(d.get("rms_norm_eps", 1e-5)),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
        )

    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            ctx = int(d.get("initial_context_length", 4096))
            factor = float(d.get("rope_scaling_factor", 1.0))
            return cls(
                vocab_size=int(d["vocab_size"]),
                d_model=int(d["hidden_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                num_kv_heads=int(d["num_key_value_heads"]),
                head_dim=int(d["head_dim"]),
                num_experts=int(d["num_experts"]),
                experts_per_token=int(d["experts_per_token"]),
                expert_dim=int(d["intermediate_size"]),
                sliding_window=int(d["sliding_window"]),
                rope_theta=float(d.get("rope_theta", 150000.0)),
                rope_factor=factor,
                rope_original_context=ctx,
                rope_beta_fast=float(d.get("rope_ntk_beta", 32.0)),
                rope_beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
                rope_truncate=False,  # the reference never rounds the YaRN correction range
                max_position=int(ctx * factor),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"original/config.json lacks or mistypes a required key: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a checkpoint directory: HF hub layout, its `original/` folder, or a config file."""
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls._from_file(path)
        if not os.path.isdir(path):
            raise ConfigError(f"no such checkpoint directory or config file: {path}")
        for candidate in (os.path.join(path, "config.json"), os.path.join(path, "original", "config.json")):
            if os.path.isfile(candidate):
                return cls._from_file(candidate)
        raise ConfigError(f"{path} holds neither config.json nor original/config.json")

    @classmethod
    def _from_file(cls, file: str) -> ModelConfig:
        try:
            with open(file) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{file} must hold a JSON object")
        # The two formats are told apart by their keys: HF writes model_type/num_local_experts,
        # the reference writes num_experts/rope_scaling_factor.
        if "model_type" in d or "num_local_experts" in d:
            return cls.from_hf_dict(d)
        if "num_experts" in d:
            return cls.from_original_dict(d)
        raise ConfigError(f"{file} is neither an HF gpt_oss config nor an original/ gpt-oss config")


def gpt_oss_20b() -> ModelConfig:
    return ModelConfig()


def gpt_oss_120b() -> ModelConfig:
    return ModelConfig(num_layers=36, num_experts=128)


def tiny(**overrides: Any) -> ModelConfig:
    """A small model with every structural feature of the real one (GQA, E > k, both layer kinds,
    YaRN with the real constants, a window shorter than test sequences, MXFP4-compatible widths)."""
    base = dict(
        vocab_size=512,
        d_model=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=8,
        experts_per_token=2,
        expert_dim=64,
        sliding_window=8,
    )
    base.update(overrides)
    return ModelConfig(**base)

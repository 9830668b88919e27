"""gpt-oss (20b / 120b) in JAX/Flax NNX.

import gptoss_jax as gj
model = gj.load("path/to/gpt-oss-20b")          # HF hub layout or original/, MXFP4 kept packed
model = gj.load("openai/gpt-oss-20b")           # a hub id: the HF cache, downloaded if missing
out = model(tokens)                              # ModelOutput(logits, cache, intermediates)
model = gj.init(gj.tiny(), seed=0)               # random weights, any config
"""

from gptoss_jax import hub, kernels, sharding
from gptoss_jax.checkpoint import CheckpointError, load, save_hf, save_native
from gptoss_jax.config import ConfigError, ModelConfig, gpt_oss_20b, gpt_oss_120b, tiny
from gptoss_jax.model import GptOss, KernelOptions, ModelOutput, abstract, init, parameter_bytes, parameter_count
from gptoss_jax.mxfp4 import MXFP4
from gptoss_jax.sampling import Generation, generate
from gptoss_jax.sharding import make_mesh
from gptoss_jax.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GptOss",
    "MXFP4",
    "ModelConfig",
    "ModelOutput",
    "abstract",
    "gpt_oss_20b",
    "gpt_oss_120b",
    "init",
    "load",
    "parameter_bytes",
    "parameter_count",
    "save_hf",
    "tiny",
    "KernelOptions",
    "kernels",
    "make_mesh",
    "sharding",
    "hub",
    "save_native",
    "generate",
    "Generation",
    "load_tokenizer",
]

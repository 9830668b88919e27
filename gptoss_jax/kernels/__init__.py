"""Kernels, each beside its pure-jnp reference: `attention` and `mxfp4_grouped_matmul` dispatch
between XLA and Pallas (GPU / TPU)."""

from gptoss_jax.kernels.attention import BlockMap, BlockSizes, attention, attention_block_map, attention_reference
from gptoss_jax.kernels.mxfp4_matmul import MatmulBlockSizes, mxfp4_grouped_matmul, mxfp4_grouped_matmul_reference

__all__ = [
    "BlockMap",
    "BlockSizes",
    "MatmulBlockSizes",
    "attention",
    "attention_block_map",
    "attention_reference",
    "mxfp4_grouped_matmul",
    "mxfp4_grouped_matmul_reference",
]

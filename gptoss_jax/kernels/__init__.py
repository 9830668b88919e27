"""Kernels, each beside its pure-jnp reference; `attention` dispatches between XLA and Pallas."""

from gptoss_jax.kernels.attention import (BlockMap, BlockSizes, attention, attention_block_map,
                                         attention_reference)

__all__ = ["BlockMap", "BlockSizes", "attention", "attention_block_map", "attention_reference"]

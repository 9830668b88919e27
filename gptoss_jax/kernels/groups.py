"""What the grouped-matmul kernels share: their tile sizes and the expert of each sorted row."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
    block_m: int = 128  # rows per tile (within one group)
    block_n: int = 128  # output channels per tile
    block_k: int = 256  # input channels per tile (a multiple of 32: whole MXFP4 blocks)


def row_experts(group_sizes, M: int):
    """Expert of each row [M] (rows past the last group get E, i.e. 'none')."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(M), side="right").astype(jnp.int32)

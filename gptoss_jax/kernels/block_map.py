"""Which KV blocks each query block visits: the block-sparsity map shared by the attention kernels.

Block sparsity is data computed at trace time from positions alone: for each query block, the KV
blocks it must visit, each marked FULL (every pair visible by position: no mask needed) or PARTIAL
(needs the mask); SKIP pads the rows to one width. A sliding layer with block_q == block_k visits
at most ceil((W-1)/block_k) + 1 KV blocks per query block instead of all of them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 128  # query tokens per tile
    block_k: int = 128  # key tokens per tile

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """kv_index[i, n] is the n-th KV block query block i visits (n < num_visits[i]; padding
    entries repeat the last visited block so that pipelined loads stay in bounds), kind[i, n] is
    FULL, PARTIAL or SKIP (padding)."""

    kv_index: np.ndarray  # [num_q_blocks, max_visits] int32
    kind: np.ndarray  # [num_q_blocks, max_visits] int32
    num_visits: np.ndarray  # [num_q_blocks] int32
    block_q: int
    block_k: int

    @property
    def total_visits(self) -> int:
        return int(self.num_visits.sum())


def attention_block_map(
    T: int, *, block_q: int, block_k: int, sliding_window: int | None = None, S: int | None = None
) -> BlockMap:
    """Which KV blocks each query block visits under the causal (+ window) mask, from positions
    alone; segment masks are data and are applied inside PARTIAL and FULL tiles alike."""
    S = T if S is None else S
    nq, nk = math.ceil(T / block_q), math.ceil(S / block_k)
    rows = []
    for i in range(nq):
        q0, q1 = i * block_q, min((i + 1) * block_q, T) - 1  # first/last query in the block
        visits = []
        for j in range(nk):
            k0, k1 = j * block_k, min((j + 1) * block_k, S) - 1
            if k0 > q1:  # entirely in the future of every query
                continue
            if sliding_window is not None and k1 <= q0 - sliding_window:  # entirely out of every window
                continue
            full = k1 <= q0 and (sliding_window is None or q1 - k0 < sliding_window)
            full = full and (j + 1) * block_k <= S  # keys past the end need the mask (padded queries are discarded)
            visits.append((j, FULL if full else PARTIAL))
        rows.append(visits)
    return _pack(rows, block_q, block_k)


def _pack(rows: list[list[tuple[int, int]]], block_q: int, block_k: int) -> BlockMap:
    """Visit lists -> padded arrays (padding repeats the last index with kind SKIP)."""
    width = max(1, max(len(r) for r in rows))
    index = np.zeros((len(rows), width), np.int32)
    kind = np.full((len(rows), width), SKIP, np.int32)
    for i, visits in enumerate(rows):
        for n, (j, kd) in enumerate(visits):
            index[i, n], kind[i, n] = j, kd
        if visits:
            index[i, len(visits) :] = visits[-1][0]
    return BlockMap(index, kind, np.array([len(r) for r in rows], np.int32), block_q, block_k)


def transpose_block_map(bm: BlockMap, num_kv_blocks: int | None = None) -> BlockMap:
    """For each KV block, the query blocks that visit it (ascending) with the tile kind, in the
    same padded form (`kv_index` then holds query-block indices): the dk/dv kernels' loop."""
    nk = num_kv_blocks if num_kv_blocks is not None else (int(bm.kv_index.max()) + 1 if bm.total_visits else 1)
    cols: list[list[tuple[int, int]]] = [[] for _ in range(nk)]
    for i in range(bm.kv_index.shape[0]):
        for n in range(int(bm.num_visits[i])):
            cols[int(bm.kv_index[i, n])].append((i, int(bm.kind[i, n])))
    return _pack(cols, bm.block_q, bm.block_k)

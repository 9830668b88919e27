"""Training checkpoints through orbax: async, keep-last-N, params + optimizer state + counters,
and the data position (the step; batches are a pure function of (seed, step)) and RNG key.

A checkpoint directory appears under its step number only once it is complete (orbax writes to a
temporary name and renames), so a run killed at any moment resumes from the last whole one."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like):
        """`like`: a state of the same structure (its arrays give shapes, dtypes and shardings)."""
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

"""Training checkpoints through orbax: async, keep-last-N, params + optimizer state + counters,
and the data position (the step; batches are a pure function of (seed, step)) and RNG key.

A checkpoint directory appears under its step number only once it is complete (orbax writes to a
temporary name and renames), so a run killed at any moment resumes from the last whole one.
Temporary folders a killed run leaves are removed when the next run opens the directory. A save
that fails (a full disk, a quota, a lost mount) raises CheckpointSaveError, one line naming the
step, the reason and the last complete checkpoint, after removing the partial folder; older
checkpoints are untouched (orbax deletes old steps only after a save completes). A save is not
started when the free space is less than the last checkpoint took.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import time
import warnings

import jax
import orbax.checkpoint as ocp

TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointSaveError(OSError):
    """A training checkpoint could not be written (a user-facing, one-line error)."""


class _OrbaxNoise(logging.Filter):
    """What a failed save prints besides its error, kept off the console while installed: when
    a write fails, orbax logs tracebacks (absl) from its threads, the writes it still had in
    flight fail one by one (asyncio: "Task exception was never retrieved"), and tensorstore's
    callbacks raise "Event loop is closed" into the event loop orbax already closed. The failure
    itself is raised as one CheckpointSaveError; the messages dropped are kept in `messages`."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []
        self._previous_hook = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            drop = "orbax" in record.getMessage()
        else:
            drop = bool(record.exc_info) and "orbax" in (record.pathname or "")
        if drop:
            self.messages.append(record.getMessage().splitlines()[0][:300])
        return not drop

    def _unraisable(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        self._previous_hook(unraisable)

    def install(self) -> None:
        logging.getLogger("absl").addFilter(self)
        logging.getLogger("asyncio").addFilter(self)
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def uninstall(self) -> None:
        logging.getLogger("absl").removeFilter(self)
        logging.getLogger("asyncio").removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook


def _io_reason(exc: BaseException) -> str | None:
    """The OS-level reason of a failed write somewhere in `exc`'s chain (None if it is not one)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.strerror or os.strerror(exc.errno)
        code = re.search(r"os_error_code='?(\d+)", str(exc))  # tensorstore's write errors
        if code:
            return os.strerror(int(code.group(1)))
        if re.search(r"Error writing|Failed writing|No space left|Disk quota", str(exc)):
            return str(exc).splitlines()[0][:300]
        exc = exc.__cause__ or exc.__context__
    return None


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Checkpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self._filter = _OrbaxNoise()
        self._filter.install()
        self._failures = 0
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step whose save may still be in flight
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.wait()  # orbax would wait for the save in flight anyway; its size is known after
        self._check_space(step)
        try:
            self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
            )
        except Exception as e:
            self._failed((self._pending, step), e)
        self._pending = step

    def restore(self, step: int, like):
        """`like`: a state of the same structure (its arrays give shapes, dtypes and shardings)."""
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._failed((self._pending,), e)
        step, self._pending = self._pending, None
        if (
            step is not None
            and self._filter.messages
            and jax.process_count() == 1
            and not os.path.isdir(os.path.join(self.directory, str(step)))
        ):
            # orbax logged a failure without raising it and the step never appeared
            self._failed((step,), RuntimeError(self._filter.messages[-1]), always=True)

    def close(self, *, quiet: bool = False) -> None:
        """Finish the save in flight and close; `quiet`: on the way out of another error, a
        failure here only cleans up (it does not hide the first error)."""
        if self._closed:
            return
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
        finally:
            self._closed = True
            try:
                self.manager.close()
            except Exception:
                pass
            if not self._failures:  # after a failure, writes in flight may still fail until the process ends
                self._filter.uninstall()
                for message in self._filter.messages:
                    logging.getLogger(__name__).warning("orbax: %s", message)

    def _complete(self) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        except OSError:
            return []

    def _check_space(self, step: int) -> None:
        """Refuse to start a save that cannot fit: the free space must hold another checkpoint as
        large as the last one (old ones are deleted only after a save completes)."""
        complete = self._complete()
        if not complete or jax.process_count() > 1:
            return
        need = _folder_bytes(os.path.join(self.directory, str(complete[-1])))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointSaveError(
                f"not enough free space for the checkpoint of step {step} in {self.directory}: {_fmt(free)} free, "
                f"a checkpoint takes {_fmt(need)}; nothing was written; the last complete checkpoint is step "
                f"{complete[-1]} (a resumed run starts from it)"
            )

    def _remove_partial(self, *, settle: float = 0.0, timeout: float = 30.0) -> None:
        """Remove temporary (partial) checkpoint folders; with `settle`, again until none has
        reappeared for that many seconds: after a failed save, writes orbax had in flight still
        finish (or fail) in the background and may create files in them."""
        deadline, calm_since = time.monotonic() + timeout, time.monotonic()
        while True:
            try:
                names = [n for n in os.listdir(self.directory) if TMP_MARK in n]
            except OSError:
                return
            for name in names:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            now = time.monotonic()
            if names:
                calm_since = now
            if now - calm_since >= settle or now > deadline:
                return
            time.sleep(0.05)

    def _failed(self, steps: tuple, exc: Exception, *, always: bool = False):
        """Raise a save failure as one line, after removing the partial checkpoint folder (an
        error that is not a failed write is re-raised as it is, unless `always`). `steps`: the
        saves that may have failed, oldest first (the first that is not complete did)."""
        reason = _io_reason(exc)
        if reason is None and always:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        self._failures += 1
        # orbax's write coroutines abandoned by the failure are reported when the process ends
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
        try:
            self.manager.wait_until_finished()  # nothing may still be writing into what is removed
        except Exception:
            pass
        self._remove_partial(settle=1.0 if reason is not None else 0.0)
        if reason is not None:
            atexit.register(self._remove_partial)  # and once more on the way out
        self._pending = None
        if reason is None:
            raise exc
        complete = self._complete()
        failed = [t for t in steps if t is not None and t not in complete]
        where = f"step {failed[0]}" if failed else "a step"
        kept = (
            f"the last complete checkpoint is step {complete[-1]} (a resumed run starts from it)"
            if complete
            else "there is no complete checkpoint yet"
        )
        raise CheckpointSaveError(
            f"could not write the checkpoint of {where} in {self.directory}: {reason}; "
            f"removed the partial checkpoint; {kept}"
        ) from None

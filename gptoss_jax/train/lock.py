"""One training run per run folder: an exclusive lock on `run.out_dir/run.lock`.

    with RunLock(out_dir, log=print):
        ...  # the run writes config.json, checkpoints/, metrics.jsonl, model/ ...

The lock is `flock` on the file (the kernel drops it when its process dies, however it dies);
the file also holds the holder's pid, host and start time, for the message that refuses a second
run. A lock file whose holder is gone (a run killed with SIGKILL leaves it behind) is taken over
with a note. On a filesystem without `flock` the file itself is the lock (created with O_EXCL);
a leftover of a dead pid on this host is taken over, one from another host must be deleted by
hand (the message says which file).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

LOCK_FILE = "run.lock"

try:
    import fcntl
except ImportError:  # not POSIX: the O_EXCL file alone
    fcntl = None


class RunLocked(OSError):
    """The run folder is in use by another run (a user error: one line on the command line)."""


def _holder_text(info: dict | None) -> str:
    if not info:
        return "pid unknown"
    when = info.get("started")
    since = ""
    if isinstance(when, (int, float)):
        since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{since}"


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _parse(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class RunLock:
    """Hold `folder`'s lock from `acquire()` (or `with`) to `release()`; `enabled=False` does
    nothing (e.g. every process of a multi-process run but the first)."""

    def __init__(self, folder: str, *, log=print, enabled: bool = True):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.log = log
        self.enabled = enabled
        self._fd: int | None = None
        self._owned_file = False

    def _info(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n"

    def _refuse(self, info: dict | None, extra: str = ""):
        raise RunLocked(
            f"{self.folder} is in use by another training run ({_holder_text(info)}){extra}: "
            "wait for it to finish or choose another run.out_dir"
        )

    def _stale_note(self, info: dict | None) -> None:
        if info:
            self.log(
                f"note: {self.path} was left by a run that is no longer running ({_holder_text(info)}); taking it over"
            )

    def acquire(self) -> RunLock:
        if not self.enabled or self._fd is not None or self._owned_file:
            return self
        os.makedirs(self.folder, exist_ok=True)
        if fcntl is not None:
            for _ in range(20):  # the file may be replaced between open and lock by a releasing holder
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    info = self._read_holder(fd)
                    os.close(fd)
                    self._refuse(info)
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        return self._acquire_exclusive_file()
                    raise
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self._stale_note(_parse(os.pread(fd, 4096, 0).decode("utf-8", "replace")))
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._info().encode(), 0)
                self._fd = fd
                return self
            raise RunLocked(f"could not lock {self.path}: it keeps being replaced")
        return self._acquire_exclusive_file()

    def _read_holder(self, fd: int) -> dict | None:
        for _ in range(20):  # the holder writes its pid right after taking the lock
            info = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            if info:
                return info
            time.sleep(0.01)
        return None

    def _acquire_exclusive_file(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    with open(self.path, encoding="utf-8", errors="replace") as f:
                        info = _parse(f.read())
                except FileNotFoundError:
                    continue
                if info and info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
                    self._stale_note(info)
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                self._refuse(info, f"; if no run is using it, delete {self.path}")
            with os.fdopen(fd, "w") as f:
                f.write(self._info())
            self._owned_file = True
            return self
        raise RunLocked(f"could not create {self.path}")

    def release(self) -> None:
        if self._fd is not None:
            try:
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)  # drops the flock
            self._fd = None
        elif self._owned_file:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self._owned_file = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

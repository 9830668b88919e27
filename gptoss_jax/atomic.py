"""Writes that either complete or leave their destination as it was.

    with atomic.folder("out/model", overwrite=False) as tmp:
        ...write every file into tmp...
    # out/model now holds exactly those files; on an exception it is untouched

`folder` hands out an empty temporary folder beside the destination (same filesystem, so the
final rename is atomic). On a normal exit every file in it is fsynced, the folder is renamed to
the destination and the parent folder is fsynced. On an exception (disk full, Ctrl-C, a bug) the
temporary is removed and the destination is left as it was. A destination that exists and is
not empty is refused (`FileExistsError`) unless `overwrite=True`; the old contents are then
replaced only once the new ones are complete: the old folder is renamed aside, the new one
renamed in, and the old one removed.

`file` is the same for one file (write-then-rename; an existing file is replaced).

Temporaries are hidden siblings named `.<name>.gptoss-<kind>-<host>-<pid>-<random>`: `tmp` for
a folder or file being written, `old` for a folder being replaced. A writer killed outright
(SIGKILL, power cut) cannot remove its own; `remove_stale` removes those of writers on this host
that are no longer running, and puts an `old` folder back where its replacement never arrived
(a writer killed between the two renames), so the destination is the old complete folder again.
`folder` and `file` call it on the destination's parent before writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator

_PATTERN = re.compile(r"^\.(?P<name>.+)\.gptoss-(?P<kind>tmp|old)-(?P<host>\w*)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII)


def _sibling(path: str, kind: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.gptoss-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # never guess on Windows: os.kill there terminates
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user, or cannot tell
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(os.path.join(dirpath, name))
        _fsync_dir(dirpath)


def remove_stale(parent: str | os.PathLike) -> list[str]:
    """Clean up after writers into `parent` that died: remove their temporaries (only those made
    on this host by a process that is no longer running), and rename an old folder back to its
    name where the new one never replaced it. Returns the paths removed or restored."""
    parent = os.fspath(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    host, done = _host(), []
    for name in sorted(names):
        m = _PATTERN.match(name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = os.path.join(parent, name)
        if m["kind"] == "old":
            original = os.path.join(parent, m["name"])
            if not os.path.lexists(original):
                try:
                    os.rename(path, original)
                except OSError:
                    pass
                else:
                    done.append(path)
                    continue
        _remove(path)
        done.append(path)
    if done:
        _fsync_dir(parent)
    return done


def check_separate(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse to write `dst` from `src` when they are the same folder or one is inside the other
    (compared as resolved real paths): writing would destroy what is being read."""
    a, b = os.path.realpath(src), os.path.realpath(dst)
    same = a == b
    if not same and os.path.exists(a) and os.path.exists(b):
        with contextlib.suppress(OSError):
            same = os.path.samefile(a, b)
    if same:
        raise ValueError(f"the destination {os.fspath(dst)} is the source itself; write to another folder")
    if os.path.commonpath([a, b]) == a:
        raise ValueError(
            f"the destination {os.fspath(dst)} is inside the source {os.fspath(src)}; write to a folder outside it"
        )
    if os.path.commonpath([a, b]) == b:
        raise ValueError(
            f"the source {os.fspath(src)} is inside the destination {os.fspath(dst)}; write to a folder outside it"
        )


def _not_empty(path: str) -> bool:
    with os.scandir(path) as it:
        return any(True for _ in it)


@contextlib.contextmanager
def folder(
    dst: str | os.PathLike, *, overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()
) -> Iterator[str]:
    """Yield an empty temporary folder beside `dst`; on a normal exit it becomes `dst`, on an
    exception it is removed and `dst` is untouched.

    overwrite: replace a `dst` that is not empty (the old contents go only once the new ones are
        complete); without it such a `dst` is a `FileExistsError`, raised before anything is
        written. An empty or missing `dst` is always fine.
    sources: folders the writer reads from; `dst` must be none of them, nor inside one, nor hold
        one (`ValueError`)."""
    shown = os.fspath(dst)
    for src in sources:
        check_separate(src, shown)
    target = os.path.realpath(shown)  # a symlink to a folder: the folder it names is written
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent)
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise FileExistsError(f"{shown} exists and is not a folder")
        if not overwrite and _not_empty(target):
            raise FileExistsError(
                f"{shown} is not empty; refusing to write over it "
                "(overwrite=True / --overwrite replaces it once the new one is complete)"
            )
    tmp = _sibling(target, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        _commit(tmp, target, shown, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _commit(tmp: str, target: str, shown: str, overwrite: bool) -> None:
    _fsync_tree(tmp)
    aside = None
    if os.path.lexists(target) and _not_empty(target):
        if not overwrite:  # filled while we were writing
            raise FileExistsError(f"{shown} is not empty; refusing to write over it")
        aside = _sibling(target, "old")
        os.rename(target, aside)
    try:
        os.rename(tmp, target)  # replaces an empty folder
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    _fsync_dir(os.path.dirname(target))
    if aside is not None:
        _remove(aside)


@contextlib.contextmanager
def file(dst: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside the file `dst`; on a normal exit it is fsynced and renamed
    to `dst` (replacing it), on an exception it is removed and `dst` is untouched."""
    target = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        _remove(tmp)
        raise


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the contents of `src` to `dst` through `file`: `dst` is the old file or the new one."""
    with file(dst) as tmp:
        shutil.copyfile(src, tmp)

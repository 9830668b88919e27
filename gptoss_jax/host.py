"""Host memory on Linux: let glibc's malloc back large buffers with transparent huge pages.

XLA:CPU (and torch) allocate every result and every temporary region of a computation with
malloc. Buffers above glibc's mmap threshold come from fresh anonymous mappings and are unmapped
again when freed, so each call of a jitted function touches its whole working set for the first
time, one 4 KiB page fault per page: a 1 x 8192 prefill of the benchmark config faulted 1.14
million pages per call (4.3 GiB) and ran 1.21x slower than with huge pages (14 thousand faults
per call). See experiments/2026-12-02-host-memory/.

glibc (2.35 and later) madvises its mapped chunks for huge pages when the tunable
`glibc.malloc.hugetlb=1` is in `GLIBC_TUNABLES`, which it reads only when a process starts. So the
`gptoss` command and the benchmark scripts restart themselves once with it set
(`reexec_with_huge_pages`); `make run` and `make test` set it for everything they start. Library
users who want it set the variable before starting Python:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

It needs the kernel's transparent huge pages in `madvise` or `always` mode
(/sys/kernel/mm/transparent_hugepage/enabled) and does nothing elsewhere (other C libraries, other
systems, THP off). `GPTOSS_HUGE_PAGES=0` turns the restart off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GPTOSS_HUGE_PAGES"


def huge_pages_requested(env=None) -> bool:
    """Whether `env` (default: this process's environment) asks glibc's malloc for huge pages."""
    env = os.environ if env is None else env
    return "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", "")


def with_huge_pages(env=None) -> dict:
    """A copy of `env` with the huge-page tunable added to `GLIBC_TUNABLES` (other tunables kept,
    an existing hugetlb setting left as it is)."""
    env = dict(os.environ if env is None else env)
    if not huge_pages_requested(env):
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def reexec_with_huge_pages() -> None:
    """Restart this process (same interpreter, options and arguments) with the tunable set, unless
    it is set already, the C library is not glibc, or `GPTOSS_HUGE_PAGES=0`. Call it first thing in
    a program's entry point, before any work: nothing of the current process survives."""
    if (
        sys.platform != "linux"
        or os.environ.get(OPT_OUT) == "0"
        or huge_pages_requested()
        or platform.libc_ver()[0] != "glibc"
    ):
        return
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if not argv or (len(argv) == 1 and sys.argv[0] == ""):  # an interactive interpreter: leave it
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], with_huge_pages())

"""Huge pages for host buffers (gptoss_jax/host.py): the environment it builds, the restart of a
program with it, and that glibc then really backs XLA's buffers with huge pages (fewer faults)."""

import os
import platform
import subprocess
import sys

import pytest

from gptoss_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_with_huge_pages_adds_the_tunable_and_keeps_others():
    assert host.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = host.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    # an explicit choice (even "off") is left alone
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert host.with_huge_pages(off) == off
    assert not host.huge_pages_requested({}) and host.huge_pages_requested(host.with_huge_pages({}))


def _run(code, *args, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    env.update(env_changes)
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout


RESTART = """
import os, sys
print("started", flush=True)
from gptoss_jax import host
host.reexec_with_huge_pages()
print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc on Linux only")
def test_restart_sets_the_tunable_once_and_keeps_the_arguments():
    out = _run(RESTART, "x", "--y=1")
    # the program ran twice from the top (once before the restart), then went on with the tunable
    assert out.splitlines() == ["started", "started", "glibc.malloc.hugetlb=1 ['x', '--y=1']"]
    out = _run(RESTART, "x", **{host.OPT_OUT: "0"})
    assert out.splitlines() == ["started", "None ['x']"]
    out = _run(RESTART, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")  # the user's own choice: no restart
    assert out.splitlines() == ["started", "glibc.malloc.hugetlb=0 []"]


FAULTS = """
import resource
import jax, jax.numpy as jnp
x = jnp.ones((32 * 1024 * 1024,), jnp.float32)  # 128 MiB results, far above malloc's mmap threshold
f = jax.jit(lambda x: x * 1.5 + 1)
jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    jax.block_until_ready(f(x))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(
    sys.platform != "linux"
    or platform.libc_ver()[0] != "glibc"
    or tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2]) < (2, 35)
    or _thp_mode() not in ("madvise", "always"),
    reason="needs glibc >= 2.35 and transparent huge pages in madvise/always mode",
)
def test_the_tunable_cuts_page_faults_of_xla_results():
    pages = 128 * 1024 * 1024 // 4096
    small = float(_run(FAULTS, GPTOSS_HUGE_PAGES="0", JAX_PLATFORMS="cpu"))
    huge = float(_run(FAULTS, GLIBC_TUNABLES=host.TUNABLE, JAX_PLATFORMS="cpu"))
    if _thp_mode() == "madvise":  # without the tunable, each result is faulted in 4 KiB at a time
        assert small > 0.9 * pages
    assert huge < pages / 20, (small, huge)

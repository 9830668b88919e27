"""JSON records of benchmark runs: what a record must carry to be trusted later (the command that
produced it, when in UTC, on which CPU: `provenance()`), and writing one whole or not at all.
scripts/figures.py renders figures only from records that carry a provenance.

    record["provenance"] = provenance()
    write(record, path)
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys

from gptoss_jax import atomic
from gptoss_jax.bench.peaks import cpu_info

ENV_KEYS = ("GLIBC_TUNABLES", "XLA_FLAGS", "GPTOSS_HUGE_PAGES")


def command_line() -> str:
    """The command as it would be typed in the repository root: `python SCRIPT ARGS`, the script's
    path relative to the working directory (or its own name when it lies outside it)."""
    script = sys.argv[0]
    rel = os.path.relpath(os.path.abspath(script))
    if rel.startswith(".."):
        rel = os.path.basename(script)
    return shlex.join(["python", rel] + sys.argv[1:])


def provenance() -> dict:
    """{"command", "date_utc", "cpu", "environment"} for a record written now."""
    return {
        "command": command_line(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_info(),
        "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


def write(record, path: str | os.PathLike, *, indent: int = 1, default=float) -> None:
    """Write `record` as JSON to `path` (its folder made if missing): a temporary file renamed
    over `path` once complete, so a reader never sees half a record."""
    with atomic.file(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=indent, default=default)

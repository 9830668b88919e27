"""What a JSON record must carry to be trusted later: the command that produced it, when (UTC),
and on which CPU. Used by the scripts that write records (`bench.py --json`,
`parity_report.py --json`); `scripts/figures.py` renders figures only from records that have it.

    from provenance import provenance
    record["provenance"] = provenance()
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys

# instruction-set flags that decide how fast XLA and torch run matmuls on a CPU
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def command_line() -> str:
    """The command as it would be typed in the repository root: `python SCRIPT ARGS`, the script's
    path relative to the working directory (or its own name when it lies outside it)."""
    script = sys.argv[0]
    rel = os.path.relpath(os.path.abspath(script))
    if rel.startswith(".."):
        rel = os.path.basename(script)
    return shlex.join(["python", rel] + sys.argv[1:])


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """Model name, the ISA flags above that the CPU has, and the cores this process may use."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": cores}


def provenance() -> dict:
    """{"command", "date_utc", "cpu", "environment"} for a record written now."""
    return {
        "command": command_line(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_info(),
        "environment": {k: os.environ[k] for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "GPTOSS_HUGE_PAGES")
                        if k in os.environ},
    }

"""This process's memory as Linux reports it (/proc), for benchmarks that must not take a shared
machine down: what is free (MemAvailable), what the process holds (VmRSS, its anonymous and
file-backed parts, the VmHWM peak), a sampler thread that keeps the peaks and stops the process
when a limit is crossed, and which model arrays alias memory-mapped checkpoint files.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import numpy as np
from flax import nnx

GiB = 2**30
STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def gib(n) -> str:
    return f"{n / GiB:.2f} GiB"


def mem_available(default: int = -1) -> int:
    """MemAvailable in bytes (`default` where /proc/meminfo does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class MemoryWatch:
    """Samples /proc every `interval` s, keeps the peaks, and on a breach (anonymous RSS above
    `max_anon` bytes, MemAvailable below `min_available`) records why in `report["aborted"]`,
    calls `save(report)` and exits the process with status 3."""

    def __init__(
        self, report: dict, max_anon: float, min_available: float, save: Callable[[dict], None], interval: float = 0.05
    ):
        self.report, self.max_anon, self.min_available, self.interval = report, max_anon, min_available, interval
        self.save = save
        self.peak_anon = self.peak_rss = self.peak_file = 0
        self.min_avail = mem_available()
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def breach(self, status: dict, avail: int) -> str | None:
        anon = status.get("RssAnon", 0) + status.get("RssShmem", 0)
        if anon > self.max_anon:
            return f"anonymous RSS {gib(anon)} exceeds --max-anon-gib {gib(self.max_anon)}"
        if 0 <= avail < self.min_available:
            return f"MemAvailable {gib(avail)} fell below --min-available-gib {gib(self.min_available)}"
        return None

    def _run(self):
        while not self._stop.wait(self.interval):
            s = proc_status()
            avail = mem_available()
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0) + s.get("RssShmem", 0))
            self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
            self.peak_file = max(self.peak_file, s.get("RssFile", 0))
            self.min_avail = min(self.min_avail, avail)
            why = self.breach(s, avail)
            if why:
                print(f"\n*** ABORTING during '{self.phase}': {why} (status {s}) ***", file=sys.stderr, flush=True)
                self.report["aborted"] = {"phase": self.phase, "reason": why, "status": s}
                try:
                    self.report["memory"]["watch"] = self.peaks()
                    self.save(self.report)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
                os._exit(3)

    def peaks(self) -> dict:
        return {
            "peak_rss_anon_bytes": self.peak_anon,
            "peak_vmrss_bytes": self.peak_rss,
            "peak_rss_file_bytes": self.peak_file,
            "min_mem_available_bytes": self.min_avail,
        }


def aliased_bytes(model, files) -> int:
    """Bytes of model arrays whose buffer lies inside a mapping of one of `files` (zero-copy
    views of the memory-mapped checkpoint)."""
    files = {os.path.realpath(f) for f in files}
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and os.path.realpath(parts[5].strip()) in files:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        try:
            p = v.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - sharded or deleted arrays: not aliased here
            continue
        if any(lo <= p < hi for lo, hi in ranges):
            total += int(np.prod(v.shape)) * v.dtype.itemsize
    return total

"""scripts/live_peak.py reads the compiler's live-byte peak and heap size from an XLA dump."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "live_peak", os.path.join(os.path.dirname(__file__), "..", "scripts", "live_peak.py")
)
live_peak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live_peak)

LIVE = """HloLiveRange (max 10):
  Live ranges at 7 (peak):
    x: 1 bytes
  Stack trace breakdown for peak usage: 10 755 006 072 bytes
    main (100.0%, total: 10 755 006 072 bytes, current: 0 bytes, remaining: 10 755 006 072 bytes)
"""
REPORT = "Memory Space: default (color=0)\nTotal bytes: 13531274752 (12.60GiB)\n"


def _dump(folder, module="module_0030.jit_step.cl_1", live=LIVE, report=REPORT):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{module}.after_optimizations-live-range.txt"), "w") as f:
        f.write(live)
    with open(os.path.join(folder, f"{module}.after_optimizations-memory-usage-report.txt"), "w") as f:
        f.write(report)


def test_reads_peak_and_heap(tmp_path):
    _dump(tmp_path)
    _dump(tmp_path, module="module_0001.jit_init.cl_1", live=LIVE.replace("10 755 006 072", "5"))
    assert live_peak.read(str(tmp_path)) == {"peak_live_bytes": 10_755_006_072, "heap_bytes": 13_531_274_752}
    assert live_peak.read(str(tmp_path), module="jit_init")["peak_live_bytes"] == 5  # control: another module


def test_missing_dump_or_peak_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no \\*jit_step\\*"):
        live_peak.read(str(tmp_path))
    _dump(tmp_path, live="HloLiveRange (max 10):\n")
    with pytest.raises(SystemExit, match="no peak breakdown"):
        live_peak.read(str(tmp_path))

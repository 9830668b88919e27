"""The compiler's own live-byte peak of a compiled program, from an XLA dump, beside its allocation.

`compiled.memory_analysis()` reports what XLA allocates: arguments plus the temporary heap as it was
laid out, gaps included. The estimate of `gptoss train --estimate-memory` counts bytes that are live
together. To compare like with like, dump the program while compiling it and read two figures XLA
writes beside it:

    XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*jit_step.*" \\
        python scripts/compile_targets.py --out /tmp/one --only 'sft_20b_tpu_v5e_8@'
    python scripts/live_peak.py DUMP --row 'sft_20b_tpu_v5e_8@tpu-v5e-8'

- peak live bytes: the live-range analysis' "Stack trace breakdown for peak usage" (every buffer
  live at the program point where the most bytes are live, arguments included);
- heap bytes: the memory-usage report's "Total bytes" of the default memory space (the layout of
  all buffers at their offsets: peak live bytes plus the gaps the layout left).

`--row` stores both in the row of the compile record (`--out`), with the command.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

PEAK = re.compile(r"Stack trace breakdown for peak usage: ([\d ]+) bytes")
HEAP = re.compile(r"^Total bytes: (\d+)", re.M)


def _newest(dump: str, suffix: str, module: str) -> str:
    found = sorted(glob.glob(os.path.join(dump, f"*{module}*{suffix}")), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no *{module}*{suffix} in {dump}: was the program compiled with --xla_dump_to={dump}?")
    return found[-1]


def read(dump: str, module: str = "jit_step") -> dict:
    """{peak_live_bytes, heap_bytes} of the newest dumped `module`."""
    text = open(_newest(dump, "after_optimizations-live-range.txt", module)).read()
    m = PEAK.search(text)
    if m is None:
        raise SystemExit("the live-range file has no peak breakdown")
    peak = int(m.group(1).replace(" ", ""))
    report = open(_newest(dump, "after_optimizations-memory-usage-report.txt", module)).read()
    h = HEAP.search(report)
    return {"peak_live_bytes": peak, "heap_bytes": int(h.group(1)) if h else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dump", help="the --xla_dump_to folder")
    p.add_argument("--module", default="jit_step", help="which dumped module (name substring)")
    p.add_argument("--row", help="store the figures in this row of the compile record")
    p.add_argument("--out", default="experiments/2026-12-05-compile")
    args = p.parse_args(argv)
    figures = read(args.dump, args.module)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    heap = gib(figures["heap_bytes"]) if figures["heap_bytes"] else "?"
    print(f"peak live {gib(figures['peak_live_bytes'])}; heap laid out {heap}")
    if args.row:
        path = os.path.join(args.out, "records.json")
        records = json.load(open(path))
        rows = [r for r in records if r["row"] == args.row]
        if not rows:
            raise SystemExit(f"no row {args.row!r} in {path}")
        rows[0].update(figures, live_peak_command=f"python scripts/live_peak.py DUMP --row {args.row!r}")
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

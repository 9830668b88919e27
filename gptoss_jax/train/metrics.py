"""Metrics of a run: one json line per logged step (always), TensorBoard scalars (when
`tensorboardX` is installed), and a plot of the curves at the end (matplotlib, headless).

    with MetricsLog(out_dir, tensorboard=True) as log:
        log.write({"step": 10, "loss": 2.3, ...})
    plot_curves(out_dir + "/metrics.jsonl", out_dir + "/curves.png")
"""

from __future__ import annotations

import json
import math
import os

from gptoss_jax import atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: str, *, tensorboard: bool = True, enabled: bool = True):
        """enabled=False (e.g. on every process but the first) writes nothing."""
        self.enabled = enabled
        self.file = open(os.path.join(out_dir, METRICS_FILE), "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MetricsError(ValueError):
    """A metrics.jsonl line that is not a record, naming the file and line."""


def _parse(path: str) -> tuple[list[tuple[dict, str]], int | None]:
    """The (record, line) pairs of a metrics.jsonl and the line number of a torn last line (None
    if whole). A bad line before the last is a MetricsError: only the last line can be cut short
    by a run that was killed while writing it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip("\0 \t\r\n")]
    records = []
    for i, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                return records, lineno
            raise MetricsError(f"{path}:{lineno}: not a metrics record ({e}); fix or delete that line") from None
        records.append((record, line.rstrip("\r\n") + "\n"))
    return records, None


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, of a run killed mid-write, left out)."""
    return [record for record, _ in _parse(path)[0]]


def truncate_metrics(path: str, step: int, *, log=print) -> None:
    """Keep the records up to `step` (a run resumed from the checkpoint of `step` logs the rest
    again; step 0: none). A torn last line is dropped with a warning; the file is rewritten whole
    (write + rename), so the resumed run appends after complete lines."""
    if not os.path.isfile(path):
        return
    records, torn = _parse(path) if step > 0 else ([], None)
    if torn is not None:
        log(f"warning: {path}:{torn}: dropped a torn last line (the run was stopped while writing it)")
    with atomic.file(path) as tmp, open(tmp, "w") as f:
        f.writelines(line for record, line in records if record["step"] <= step)


def plot_curves(
    path: str, out_png: str, *, keys=("loss", "grad_norm", "learning_rate", "router_loss"), title: str | None = None
) -> str | None:
    """One panel per metric present in `path` (a metrics.jsonl) against the step; returns the png
    path, or None when there is nothing to plot."""
    records = read_metrics(path)
    present = [k for k in keys if any(k in r for r in records)]
    if not records or not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        if key == "loss" and pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

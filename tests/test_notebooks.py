"""Every notebook runs top to bottom on its tiny default (each checks its own claims with asserts
as it goes) and saves its figure. Each runs in its own Python process, as a kernel would, on one
CPU device."""

import glob
import os
import subprocess
import sys

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "[0-9]*.py")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, offline_tiktoken):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "GPTOSS_CHECKPOINT", "GPTOSS_CORPUS", "GPTOSS_RUN")
    }
    env["GPTOSS_FIGURES"] = str(tmp_path / "figures")
    env["MPLBACKEND"] = "Agg"
    # cwd = tmp_path: nothing of a local `runs/` is picked up; outputs land there
    done = subprocess.run(
        [sys.executable, os.path.abspath(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{os.path.basename(path)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    prefix = os.path.basename(path)[:2]
    figures = glob.glob(str(tmp_path / "figures" / f"{prefix}_*.png"))
    assert figures and all(os.path.getsize(f) > 10_000 for f in figures)


def test_notebooks_found():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == [
        "01_model_tour.py",
        "02_expert_routing.py",
        "03_activations_and_sinks.py",
        "04_block_sparse_attention.py",
        "05_finetuning_effects.py",
    ]

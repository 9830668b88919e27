"""The SFT loop end to end: configs (typed, unknown keys are errors), and exact resume: a run
killed with SIGKILL mid-training and resumed ends with bitwise the same weights as a run that
was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gptoss_jax.train.config import ConfigKeyError, load_config

CONFIG = """
model:
  preset: tiny
  overrides: {{vocab_size: 201088}}
  dtype: float32
data:
  train: {data}
  seq_len: 96
  batch_size: 2
optim:
  learning_rate: 1e-3
  warmup_steps: 2
  total_steps: 8
run:
  out_dir: {out}
  steps: 8
  save_every: 2
  log_every: 1
  progress: false
"""


@pytest.fixture(scope="module")
def arithmetic_jsonl(tmp_path_factory):
    import random

    r = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            a, b = r.randint(0, 99), r.randint(0, 99)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{a}+{b}"},
                {"role": "assistant", "content": str(a + b), "thinking": f"add {a} and {b}"}]}) + "\n")
    return str(path)


def test_config_types_and_unknown_keys(tmp_path, arithmetic_jsonl):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(data=arithmetic_jsonl, out=tmp_path / "run"))
    cfg = load_config(str(path), ["optim.learning_rate=5e-4", "run.steps=3", "mesh={data: 2}"])
    assert cfg.optim.learning_rate == 5e-4 and cfg.run.steps == 3 and cfg.mesh == {"data": 2}
    assert cfg.model.overrides == {"vocab_size": 201088} and cfg.data.seq_len == 96
    with pytest.raises(ConfigKeyError, match=r"unknown key\(s\) optim.learning_rat;"):
        load_config(str(path), ["optim.learning_rat=1"])
    with pytest.raises(ConfigKeyError, match="run.steps must be an integer"):
        load_config(str(path), ["run.steps=many"])
    with pytest.raises(ConfigKeyError, match="is not key=value"):
        load_config(str(path), ["run.steps"])


def _launch(cfg_path):
    return subprocess.Popen([sys.executable, "-m", "gptoss_jax.cli", "train", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(out_dir):
    files = sorted(f for f in os.listdir(os.path.join(out_dir, "model")) if f.endswith(".safetensors"))
    return b"".join(open(os.path.join(out_dir, "model", f), "rb").read() for f in files)


def test_sigkill_and_resume_is_exact(tmp_path, arithmetic_jsonl):
    cfgs = {}
    for name in ("straight", "killed"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(CONFIG.format(data=arithmetic_jsonl, out=tmp_path / name))

    straight = _launch(cfgs["straight"])
    killed = _launch(cfgs["killed"])
    ckpt4 = tmp_path / "killed" / "checkpoints" / "4"
    deadline = time.time() + 300
    while not ckpt4.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ckpt4.is_dir(), killed.communicate()[0][-2000:]
    killed.send_signal(signal.SIGKILL)  # mid-training: steps 5..8 are still to come
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-2000:]

    resumed = _launch(cfgs["killed"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-2000:]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert 4 <= summary["resumed_from"] < 8
    assert _weights(tmp_path / "killed") == _weights(tmp_path / "straight")
    final = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert final[-1]["step"] == 8 and final[-1]["loss"] < final[0]["loss"]


def test_shipped_configs_load():
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for name in sorted(os.listdir(here)):
        if name.endswith(".yaml"):
            load_config(os.path.join(here, name))

"""The SFT loop end to end: configs (typed, unknown keys are errors), and exact resume: a run
killed with SIGKILL mid-training and resumed goes on from its newest checkpoint (not from step 0:
its own log says so and the killed process's metrics records are kept) and ends with bitwise the
same weights as a run that was never interrupted."""

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
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{a}+{b}"},
                            {"role": "assistant", "content": str(a + b), "thinking": f"add {a} and {b}"},
                        ]
                    }
                )
                + "\n"
            )
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
    return subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.cli", "train", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _weights(out_dir):
    files = sorted(f for f in os.listdir(os.path.join(out_dir, "model")) if f.endswith(".safetensors"))
    return b"".join(open(os.path.join(out_dir, "model", f), "rb").read() for f in files)


def _metric_lines(run_dir):
    """The whole records of a run's metrics.jsonl, as written (a torn last line left out)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    whole = []
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except ValueError:
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} is not a record: {line!r}"
            continue
        whole.append(line)
    return whole


def _newest_checkpoint(run_dir):
    return max(int(n) for n in os.listdir(run_dir / "checkpoints") if n.isdigit())


def kill_at_checkpoint(proc, run_dir, step, timeout=300):
    """SIGKILL `proc` once run_dir/checkpoints/`step` exists; (the newest complete checkpoint then
    on disk, the run's metrics lines as the killed process left them)."""
    ckpt = run_dir / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ckpt.is_dir(), proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "model").exists()  # killed before the end
    return _newest_checkpoint(run_dir), _metric_lines(run_dir)


def assert_resumed_at(at, stdout, killed_lines, final_lines, steps):
    """The second process of a run killed once resumed from checkpoint `at`, not from the start:
    it said so (its own stdout), the killed process's records of steps up to `at` are still in
    metrics.jsonl byte for byte (a restart would have rewritten them), the records after them are
    the steps after `at`, and every step in `steps` is logged exactly once, in order."""
    said = [line for line in stdout.splitlines() if line.startswith("resumed from step")]
    assert said == [f"resumed from step {at}"], stdout[-2000:]
    logged = [json.loads(line)["step"] for line in final_lines]
    assert logged == list(steps), logged
    kept = [line for line in killed_lines if json.loads(line)["step"] <= at]
    assert [json.loads(line)["step"] for line in kept] == [s for s in steps if s <= at]
    assert final_lines[: len(kept)] == kept, "the records before the checkpoint were written again"
    assert [json.loads(line)["step"] for line in final_lines[len(kept) :]] == [s for s in steps if s > at]


def test_sigkill_and_resume_is_exact(tmp_path, arithmetic_jsonl):
    cfgs = {}
    for name in ("straight", "killed"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(CONFIG.format(data=arithmetic_jsonl, out=tmp_path / name))

    straight = _launch(cfgs["straight"])
    killed = _launch(cfgs["killed"])
    # mid-training: steps 5..8 are still to come when checkpoint 4 appears
    at, killed_lines = kill_at_checkpoint(killed, tmp_path / "killed", 4)
    assert 4 <= at < 8
    straight_out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_out[-2000:]

    resumed = _launch(cfgs["killed"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-2000:]
    assert_resumed_at(at, out, killed_lines, _metric_lines(tmp_path / "killed"), range(1, 9))
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from"] == at
    assert _weights(tmp_path / "killed") == _weights(tmp_path / "straight")
    final = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert final[-1]["step"] == 8 and final[-1]["loss"] < final[0]["loss"]

    # control: the uninterrupted run is what a restart from step 0 of the killed run produces (same
    # config, same weights); the checks refuse it, by its stdout and by its metrics alone
    straight_lines = _metric_lines(tmp_path / "straight")
    with pytest.raises(AssertionError):
        assert_resumed_at(at, straight_out, killed_lines, straight_lines, range(1, 9))
    with pytest.raises(AssertionError, match="written again"):
        assert_resumed_at(at, f"resumed from step {at}\n", killed_lines, straight_lines, range(1, 9))


def test_shipped_configs_load():
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for name in sorted(os.listdir(here)):
        if name.endswith(".yaml"):
            load_config(os.path.join(here, name))


def test_lora_run_adapters_export_and_eval(tmp_path):
    """A LoRA run over a packed base checkpoint: only adapters are written, `gptoss eval` and
    `gptoss export` rebuild base + adapters, and the merged HF export computes the same logits."""
    import numpy as np

    import gptoss_jax as gj
    from gptoss_jax import cli, lora
    from gptoss_jax.tasks import arithmetic
    from gptoss_jax.tokenizer import train_bpe
    from gptoss_jax.train.sft import load_trained, run_config, train

    tok = train_bpe(list(arithmetic.corpus(300)) + ["system", "user", "assistant", "analysis", "final"], 300)
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    base = tmp_path / "base"
    gj.save_native(gj.init(gj.tiny(vocab_size=tok.vocab_size), seed=1, dtype="float32"), str(base))
    arithmetic.write_splits(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"), train_size=40, eval_size=4)
    cfg = load_config(
        None,
        [
            f"model.checkpoint={base}",
            "model.dtype=float32",
            f"model.tokenizer={tmp_path / 'tokenizer.json'}",
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "data.seq_len=256",
            "data.batch_size=4",
            "optim.warmup_steps=1",
            "optim.total_steps=4",
            "optim.learning_rate=1e-2",
            "lora.enabled=true",
            "lora.rank=4",
            "lora.targets=q,v,w1,w2",
            f"run.out_dir={tmp_path / 'run'}",
            "run.steps=4",
            "run.log_every=1",
            "run.progress=false",
            "eval.max_new_tokens=8",
        ],
    )
    summary = train(cfg, log=lambda s: None)
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "adapters")) == ["adapter_config.json", "adapters.safetensors"]
    assert not (run / "model").exists() and (run / "curves.png").is_file()
    events = os.listdir(run / "tensorboard")  # tensorboardX is a test dependency
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert summary["eval"]["task"]["total"] == 4
    trained = load_trained(run_config(str(run)))
    assert trained.lora_config.targets == ("q", "v", "w1", "w2") and trained.experts == "mxfp4"
    assert summary["trainable_parameters"] == sum(v.get_value().size for _, v in nnx_flat(trained, lora.LoRAParam))

    assert cli.main(["export", str(run), str(tmp_path / "hf"), "--experts", "dense", "--dtype", "float32"]) == 0
    exported = gj.load(str(tmp_path / "hf"), dtype="float32")
    tokens = np.arange(40)[None] % tok.vocab_size
    want = np.asarray(trained(tokens).logits)
    assert np.abs(np.asarray(exported(tokens).logits) - want).max() <= 1e-5 * np.abs(want).max()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def nnx_flat(model, kind):
    from flax import nnx

    return nnx.to_flat_state(nnx.state(model, kind))


def test_resuming_with_a_changed_config_is_refused(tmp_path, arithmetic_jsonl):
    from gptoss_jax.train.config import to_dict
    from gptoss_jax.train.sft import _check_resumable

    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(data=arithmetic_jsonl, out=tmp_path / "run"))
    cfg = load_config(str(path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(to_dict(cfg)))
    _check_resumable(str(tmp_path / "run"), load_config(str(path), ["run.steps=20", "eval.limit=3"]))  # allowed
    with pytest.raises(ValueError, match=r"different config \(optim.learning_rate, run.seed\)"):
        _check_resumable(str(tmp_path / "run"), load_config(str(path), ["optim.learning_rate=1e-4", "run.seed=3"]))

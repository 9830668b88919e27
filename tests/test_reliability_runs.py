"""Training runs under bad input and faults, through `gptoss train` / `gptoss export`: one run per
run folder (a lock, stale locks taken over), a torn metrics line on resume, a run folder named
relative or absolute, token ids outside the model's vocabulary, empty / malformed data and
unknown channels (each one error before a model is built), export pointed at a checkpoint, and a
disk that fills up during a checkpoint save."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from gptoss_jax import cli
from gptoss_jax.train import lock as lock_lib
from gptoss_jax.train import metrics as metrics_lib
from tests import factory

# a 2-layer gpt-oss small enough that a run compiles in seconds on a CPU
SMALL = (
    "{vocab_size: %d, num_layers: 2, d_model: 32, num_heads: 2, num_kv_heads: 1, head_dim: 16, num_experts: 4, "
    "experts_per_token: 2, expert_dim: 32}"
)
LOCK_PY = lock_lib.__file__


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    tok = factory.arithmetic_task(d, train_size=24, eval_size=4)
    return {"dir": d, "vocab": tok.vocab_size}


def _args(setup, out, *extra, vocab=None, data=None):
    d = setup["dir"]
    return [
        "train",
        "-",
        f"model.overrides={SMALL % (vocab or setup['vocab'])}",
        "model.dtype=float32",
        "model.experts=dense",
        f"model.tokenizer={d / 'tokenizer.json'}",
        f"data.train={data or d / 'train.jsonl'}",
        "data.seq_len=256",
        "data.batch_size=2",
        "optim.warmup_steps=1",
        "optim.total_steps=4",
        f"run.out_dir={out}",
        "run.steps=2",
        "run.save_every=1",
        "run.log_every=1",
        "run.progress=false",
        "run.tensorboard=false",
        "run.plots=false",
        *extra,
    ]


RL = ["algorithm=grpo", "rl.group_size=2", "rl.prompts_per_step=1", "rl.max_new_tokens=4", "eval.max_new_tokens=4"]


def _train(argv, capsys, *, empty_config=None):
    """cli.main(argv) with the config file "-" replaced by an empty YAML; (code, stdout, stderr)."""
    if empty_config is not None and argv[1] == "-":
        argv = [argv[0], str(empty_config), *argv[2:]]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def empty_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "empty.yaml"
    path.write_text("{}\n")
    return path


def _one_line_error(code, err, command="train"):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"gptoss {command}: error: "), err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is built (the errors under test come before that)."""
    from gptoss_jax.train import sft

    def refuse(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(sft, "build_model", refuse)


# ------------------------------------------------------------------------------------ the lock
def _hold_lock(folder):
    """A second process holding `folder`'s lock (the lock module alone, loaded from its file)."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("runlock", {LOCK_PY!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        with mod.RunLock({str(folder)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
def test_a_second_run_on_a_held_folder_is_refused(setup, tmp_path, capsys, empty_yaml, no_model, algorithm):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        extra = RL if algorithm == "grpo" else []
        code, _, err = _train(_args(setup, out, *extra), capsys, empty_config=empty_yaml)
        line = _one_line_error(code, err)
        assert str(out) in line and f"pid {holder.pid}" in line and "another training run" in line
        assert sorted(os.listdir(out)) == ["run.lock"]  # nothing of the refused run was written
    finally:
        holder.stdin.close()
        holder.wait()
    assert not (out / "run.lock").exists()  # released at exit


def test_a_lock_left_by_a_killed_run_is_taken_over(setup, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the file stays, the kernel drops the flock
    holder.wait()
    left = json.loads((out / "run.lock").read_text())
    assert left["pid"] == holder.pid
    with lock_lib.RunLock(str(out), log=print):
        note = capsys.readouterr().out
        assert "no longer running" in note and f"pid {holder.pid}" in note and "taking it over" in note
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(lock_lib.RunLocked, match=f"pid {os.getpid()}"):  # and it holds against others
            lock_lib.RunLock(str(out)).acquire()
    assert not (out / "run.lock").exists()


def test_without_flock_the_lock_file_itself_decides(tmp_path, monkeypatch, capsys):
    """Filesystems without flock: the O_EXCL file; a live pid refuses, a dead one on this host is
    taken over, one on another host must be deleted by hand (the message names the file)."""
    monkeypatch.setattr(lock_lib, "fcntl", None)
    path = tmp_path / "run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(lock_lib.RunLocked, match=f"in use by another training run \\(pid {sleeper.pid}"):
            lock_lib.RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.stdin.close()
        sleeper.wait()
    with lock_lib.RunLock(str(tmp_path), log=print):  # the same file, its pid now dead
        assert "taking it over" in capsys.readouterr().out
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(lock_lib.RunLocked, match=f"pid 1 on elsewhere.*delete {path}"):
        lock_lib.RunLock(str(tmp_path)).acquire()


# ---------------------------------------------------------------------- a run, resumed after faults
@pytest.fixture(scope="module")
def finished_run(setup, tmp_path_factory, empty_yaml):
    """A 2-step run (checkpoints 1 and 2) whose run.out_dir was given relative to the cwd, started
    over a lock file that a SIGKILLed run left behind."""
    base = tmp_path_factory.mktemp("finished")
    holder = _hold_lock(base / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    cwd = os.getcwd()
    os.chdir(base)
    try:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(["train", str(empty_yaml), *_args(setup, "run")[2:]])
    finally:
        os.chdir(cwd)
    assert code == 0, err.getvalue()[-3000:]
    return {"dir": base / "run", "stdout": out.getvalue(), "holder": holder.pid}


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_run_took_over_the_stale_lock_and_released_it(finished_run):
    run = finished_run["dir"]
    assert f"pid {finished_run['holder']}" in finished_run["stdout"] and "taking it over" in finished_run["stdout"]
    assert not (run / "run.lock").exists()
    assert _steps(run) == [1, 2] and json.loads((run / "config.json").read_text())["run"]["out_dir"] == "run"


def test_resume_after_a_torn_metrics_line_with_the_folder_given_absolute(setup, finished_run, capsys, empty_yaml):
    """The run is resumed with its folder spelled absolute (it was started relative) after a
    kill mid-write left half a metrics line: the line is dropped with a warning, each step is
    logged once."""
    run = finished_run["dir"]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')
    assert os.path.isabs(str(run))
    code, out, err = _train(_args(setup, run, "run.steps=3"), capsys, empty_config=empty_yaml)
    assert code == 0, err[-3000:]
    assert f"warning: {run / 'metrics.jsonl'}:3: dropped a torn last line" in out
    assert "resumed from step 2" in out
    assert _steps(run) == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 2


def test_a_malformed_metrics_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(metrics_lib.MetricsError, match=f"{path}:2: not a metrics record"):
        metrics_lib.truncate_metrics(str(path), 3)
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # control: torn last
    notes = []
    metrics_lib.truncate_metrics(str(path), 1, log=notes.append)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n' and len(notes) == 1 and ":3: dropped" in notes[0]


def test_resume_compares_paths_as_the_files_they_name(setup, tmp_path, monkeypatch):
    from gptoss_jax.train.config import load_config, to_dict
    from gptoss_jax.train.sft import _check_resumable

    d = setup["dir"]
    monkeypatch.chdir(d)
    argv = lambda out, train: _args(setup, out, data=train)[2:]
    (d / "r").mkdir(exist_ok=True)
    (d / "r" / "config.json").write_text(json.dumps(to_dict(load_config(None, argv("r", "train.jsonl")))))
    _check_resumable(str(d / "r"), load_config(None, argv(str(d / "r"), str(d / "train.jsonl"))))
    _check_resumable(str(d / "r"), load_config(None, argv("./r/", "./train.jsonl")))
    shutil.copy(d / "train.jsonl", tmp_path / "other.jsonl")  # control: another file is another run
    with pytest.raises(ValueError, match=r"different config \(data.train\)"):
        _check_resumable(str(d / "r"), load_config(None, argv("r", str(tmp_path / "other.jsonl"))))


# ------------------------------------------------------------------------- data and vocabulary
@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
def test_token_ids_outside_the_vocabulary_are_refused_before_training(
    setup, tmp_path, capsys, empty_yaml, no_model, algorithm
):
    """Before: every step NaN, blamed on the learning rate, or with few steps an untrained model
    saved and exit 0. `gptoss train` refuses the tokenizer; `train()` itself the data's ids."""
    from gptoss_jax.train import rl, sft
    from gptoss_jax.train.config import load_config

    out = tmp_path / "run"
    extra = RL if algorithm == "grpo" else []
    code, _, err = _train(_args(setup, out, *extra, vocab=64), capsys, empty_config=empty_yaml)
    line = _one_line_error(code, err)
    assert str(setup["dir"] / "tokenizer.json") in line and f"{setup['vocab']} ids" in line and "64" in line
    assert "model.overrides.vocab_size" in line
    assert not out.exists()  # nothing written, no model built, no "trained" model saved
    train = sft.train if algorithm == "sft" else rl.train
    with pytest.raises(ValueError) as e:
        train(load_config(None, _args(setup, out, *extra, vocab=64)[2:]), log=lambda s: None)
    msg = str(e.value)
    assert f"{setup['dir'] / 'train.jsonl'} tokenizes to id" in msg and "outside the model's vocabulary" in msg
    assert f"tokenizer {setup['dir'] / 'tokenizer.json'} has {setup['vocab']} ids" in msg
    assert "vocab_size is 64" in msg and f"model.overrides.vocab_size to at least {setup['vocab']}" in msg
    assert not out.exists()


def test_a_checkpoint_with_a_smaller_vocabulary_names_its_tokenizer(setup, tmp_path, no_model):
    import gptoss_jax as gj
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.sft import train

    (tmp_path / "m").mkdir()  # the check reads the checkpoint's config.json only (no weights are loaded)
    (tmp_path / "m" / "config.json").write_text(json.dumps(gj.tiny(vocab_size=64).to_hf_dict()))
    cfg = load_config(None, _args(setup, tmp_path / "run", f"model.checkpoint={tmp_path / 'm'}")[2:])
    with pytest.raises(ValueError, match=f"vocab_size is 64; use the tokenizer {tmp_path / 'm'} was trained with"):
        train(cfg, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
@pytest.mark.parametrize("case", ["empty", "bad_json", "unknown_channel", "all_filtered"])
def test_unusable_data_is_one_error_naming_the_file(setup, tmp_path, capsys, empty_yaml, no_model, case, algorithm):
    user = {"role": "user", "content": "What is 1 + 1?"}
    lines = {
        "empty": [],
        "bad_json": ['{"messages": [{"role": "user", "content": "What is 1 + 1?"}'],
        "unknown_channel": [
            json.dumps({"messages": [user, {"role": "assistant", "channel": "secret", "content": "2"}]})
        ],
        "all_filtered": [json.dumps({"messages": [{"role": "robot", "content": "x"}]}), ""],
    }[case]
    data = _write(tmp_path / "d.jsonl", lines)
    out = tmp_path / "run"
    extra = RL if algorithm == "grpo" else []
    code, _, err = _train(_args(setup, out, *extra, data=data), capsys, empty_config=empty_yaml)
    line = _one_line_error(code, err)
    assert str(data) in line
    want = {
        "empty": "holds no conversations (the file is empty)",
        "bad_json": f"{data}:1: not valid JSON",
        "unknown_channel": f"{data}:1: message 1: channel 'secret' is not one of analysis, commentary, final",
        "all_filtered": f"{data}:1: message 0: role 'robot' is not one of",
    }[case]
    assert want in line
    assert not out.exists()


def test_strict_data_names_the_bad_line_and_channels_follow_the_system_message(
    setup, tmp_path, capsys, empty_yaml, no_model
):
    from gptoss_jax import harmony
    from gptoss_jax.train import data as data_lib

    good = (setup["dir"] / "train.jsonl").read_text().splitlines()
    path = _write(tmp_path / "d.jsonl", good[:3] + ["{oops"] + good[3:6])
    code, _, err = _train(
        _args(setup, tmp_path / "run", "data.strict=true", data=path), capsys, empty_config=empty_yaml
    )
    assert f"{path}:4: not valid JSON" in _one_line_error(code, err)
    convs, report = data_lib.read_jsonl(str(path))  # not strict: reported and left out
    assert len(convs) == 6 and report.malformed[0].startswith(f"{path}:4: ") and report.line_numbers[3] == 5
    # a system message may declare its own channels; the default three otherwise
    custom = [harmony.system_message().copy(), harmony.assistant("x", channel="secret")]
    custom[0]["content"] = [
        dict(custom[0]["content"][0], channel_config={"valid_channels": ["secret"], "channel_required": True})
    ]
    assert data_lib.parse_conversation({"messages": custom})[1]["channel"] == "secret"
    for channel in ("analysis", "commentary", "final"):
        data_lib.parse_conversation([harmony.user("q"), harmony.assistant("a", channel=channel)])
    with pytest.raises(ValueError, match="channel 'finale' is not one of"):
        data_lib.parse_conversation([harmony.user("q"), harmony.assistant("a", channel="finale")])


# ---------------------------------------------------------------------------------- export
def test_export_of_a_checkpoint_folder_says_what_it_is(finished_run, tmp_path, capsys):
    from gptoss_jax.train.sft import run_config

    run = finished_run["dir"]
    line = _one_line_error(
        cli.main(["export", str(run / "model"), str(tmp_path / "hf")]), capsys.readouterr().err, "export"
    )
    assert f"{run / 'model'} is a model checkpoint, not a training run folder" in line and "gptoss convert" in line
    line = _one_line_error(
        cli.main(["export", str(run / "checkpoints" / "1"), str(tmp_path / "hf")]), capsys.readouterr().err, "export"
    )
    assert "is a training checkpoint inside the run folder" in line and f"give {run}" in line
    assert not (tmp_path / "hf").exists()
    assert run_config(str(run)).run.out_dir == str(run)  # control: the run folder itself


# ------------------------------------------------------------------------------ disk full
DISK_FULL = """
import resource, signal, sys
from gptoss_jax import cli
from gptoss_jax.train import checkpoints

save = checkpoints.Checkpoints.save

def save_with_a_full_disk(self, step, state, meta):
    if step == 2:  # from here on no file may grow past 4 KiB: the checkpoint's writes fail
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    save(self, step, state, meta)

checkpoints.Checkpoints.save = save_with_a_full_disk
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_checkpoint_save_that_runs_out_of_space(setup, tmp_path, capsys, empty_yaml):
    """The write of checkpoint 2 fails (RLIMIT_FSIZE: every write past 4 KiB fails, as on a full
    disk): one line, no partial checkpoint left, checkpoint 1 intact, and the resumed run
    continues from it."""
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    out = tmp_path / "run"
    argv = _args(setup, out)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package under test, in the child too
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(script), argv[0], str(empty_yaml), *argv[2:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("gptoss train: error: could not write the checkpoint of step 2 in "), lines[-1]
    assert "File too large" in lines[-1] and "the last complete checkpoint is step 1" in lines[-1]
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]  # no temporary folder left
    assert not (out / "run.lock").exists() and not (out / "model").exists()

    code, stdout, err = _train(argv, capsys, empty_config=empty_yaml)
    assert code == 0, err[-3000:]
    assert "resumed from step 1" in stdout and _steps(out) == [1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]


def test_a_save_that_cannot_fit_is_not_started(tmp_path, monkeypatch):
    """Less free space than the last checkpoint took: refused before anything is written."""
    import collections

    import jax.numpy as jnp

    from gptoss_jax.train import checkpoints

    ckpts = checkpoints.Checkpoints(str(tmp_path / "c"), keep=3)
    try:
        state = {"w": jnp.arange(4096, dtype=jnp.float32)}
        ckpts.save(1, state, {"step": 1})
        ckpts.wait()
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1024))
        with pytest.raises(
            checkpoints.CheckpointSaveError,
            match=r"not enough free space for the checkpoint of "
            r"step 2 .*1.0 KiB free.*last complete "
            r"checkpoint is step 1",
        ):
            ckpts.save(2, state, {"step": 2})
        assert sorted(os.listdir(tmp_path / "c")) == ["1"]
        monkeypatch.undo()  # control: with room, it saves
        ckpts.save(2, state, {"step": 2})
        ckpts.wait()
        assert sorted(os.listdir(tmp_path / "c")) == ["1", "2"]
    finally:
        ckpts.close()

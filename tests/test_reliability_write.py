"""Every checkpoint writer (`save_hf`, `save_native`, `gptoss convert`, `gptoss export`) is atomic:
a destination holds the old complete checkpoint or the new complete one, never a mix, whether the
writer is refused, fails (disk full), or is killed outright; a non-empty destination is replaced
only when asked; a source is never written over; the temporaries of a killed writer are cleaned
up by the next one."""

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import atomic, safetensors_io
from gptoss_jax.cli import main

SHARD = 100_000  # bytes: the tiny model is several shards (an index plus model-0000k-of-0000n files)


@pytest.fixture(scope="module")
def models():
    return {seed: gj.init(gj.tiny(), seed=seed, dtype="float32") for seed in (1, 2)}


def _flat(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def _assert_holds(path, model):
    """`path` loads, and to exactly `model`'s values."""
    got, want = _flat(gj.load(path, dtype="float32")), _flat(model)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def _files(path) -> dict:
    """Every file of a folder and its bytes: the state to compare before and after."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def _temporaries(parent) -> list:
    return sorted(n for n in os.listdir(parent) if ".gptoss-" in n or n.endswith(".tmp"))


def _hf(model, path, **kw):
    gj.save_hf(model, path, dtype="float32", max_shard_bytes=SHARD, **kw)
    return path


def _one_error_line(capsys, *match):
    err = [
        line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loading:")
    ]  # the progress bar of the load before the write
    assert len(err) == 1 and "Traceback" not in err[0], err
    for m in match:
        assert m in err[0], err
    return err[0]


# ------------------------------------------------------------------ refusing to write over things
def test_convert_refuses_a_non_empty_destination_and_overwrite_replaces_it(models, tmp_path, capsys):
    src, dst = _hf(models[1], tmp_path / "src"), _hf(models[2], tmp_path / "dst")
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    before = _files(dst)
    # to a single model.safetensors: written in place, dst's stale index used to win
    args = ["convert", str(src), str(dst), "--to", "hf", "--dtype", "float32"]
    assert main(args) == 2
    _one_error_line(capsys, "not empty", "--overwrite")
    assert _files(dst) == before
    _assert_holds(dst, models[2])

    assert main(args + ["--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]
    _assert_holds(dst, models[1])
    assert _temporaries(tmp_path) == []

    # the Python API refuses too; an empty or missing folder is fine
    with pytest.raises(FileExistsError, match="not empty"):
        gj.save_native(models[2], dst)
    _assert_holds(dst, models[1])
    (tmp_path / "empty").mkdir()
    gj.save_native(models[2], tmp_path / "empty")
    _assert_holds(tmp_path / "empty", models[2])
    with pytest.raises(FileExistsError, match="not a folder"):
        gj.save_hf(models[2], src / "tokenizer.json", overwrite=True)


def test_convert_onto_its_source_is_refused(models, tmp_path, capsys):
    src = _hf(models[1], tmp_path / "src")
    assert len([n for n in os.listdir(src) if n.endswith(".safetensors")]) > 1  # the hub's 20b is sharded too
    before = _files(src)
    os.symlink(src, tmp_path / "link")
    cases = [
        (str(src), "is the source itself"),
        (str(src) + "/.", "is the source itself"),
        (str(tmp_path / "link"), "is the source itself"),
        (str(src / "sub"), "inside the source"),
        (str(tmp_path), "inside the destination"),
    ]
    for dst, match in cases:
        for extra in ([], ["--overwrite"]):
            assert main(["convert", str(src), dst] + extra) == 2, (dst, extra)
            _one_error_line(capsys, match)
            assert _files(src) == before
    assert not (src / "sub").exists()
    _assert_holds(src, models[1])


# ------------------------------------------------------------- killed: old or new, never a mix
CHILD = r"""
import os, signal, sys, time
signal.alarm(120)  # never outlive a test that stopped waiting
import gptoss_jax as gj
from gptoss_jax import checkpoint
kind, src, dst = sys.argv[1:4]

def stop_here():
    print("READY", flush=True)  # the parent SIGKILLs this process now
    time.sleep(600)

if kind == "commit":  # between renaming the old folder aside and renaming the new one in
    rename = os.rename
    def os_rename(a, b):
        rename(a, b)
        if ".gptoss-old-" in os.path.basename(b):
            stop_here()
    os.rename = os_rename
else:  # once the first shard is complete
    save_file = checkpoint.save_file
    def first_shard_then_stop(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        stop_here()
    checkpoint.save_file = first_shard_then_stop

if kind in ("save_hf", "commit"):
    gj.save_hf(gj.load(src, dtype="float32"), dst, dtype="float32", max_shard_bytes=100_000, overwrite=True)
elif kind == "save_native":
    gj.save_native(gj.load(src, dtype="float32"), dst, max_shard_bytes=100_000, overwrite=True)
else:
    from gptoss_jax.cli import main
    extra = ["--to", "hf"] if kind == "convert" else []
    sys.exit(main([kind, src, dst, "--dtype", "float32", "--overwrite"] + extra))
"""


def _run_folder(tmp_path, model):
    """A finished (non-LoRA) training run, as `gptoss export` reads it: config.json and model/."""
    from gptoss_jax.train.config import load_config, to_dict

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, ["model.dtype=float32", f"run.out_dir={run}"])
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    gj.save_native(model, run / "model", max_shard_bytes=SHARD)
    return run


def test_a_killed_writer_leaves_the_old_checkpoint_and_the_next_run_cleans_up(models, tmp_path):
    from gptoss_jax.train.sft import export_hf, run_config

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    src = _hf(models[1], tmp_path / "src")
    run = _run_folder(tmp_path, models[1])
    kinds = {"convert": src, "save_hf": src, "save_native": src, "export": run, "commit": src}
    dsts, before, procs = {}, {}, {}
    for kind in kinds:  # each writer replaces a checkpoint of the other model, in its own folder
        dsts[kind] = _hf(models[2], tmp_path / kind / "dst")
        before[kind] = _files(dsts[kind])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for kind, source in kinds.items():
        procs[kind] = subprocess.Popen(
            [sys.executable, str(script), kind, str(source), str(dsts[kind])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    for kind, proc in procs.items():
        lines = []
        for line in proc.stdout:  # ends at READY, or when the writer exits without getting there
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", (kind, "".join(lines)[-3000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    for kind, dst in dsts.items():
        parent = dst.parent
        left = _temporaries(parent)
        assert any(".gptoss-tmp-" in n for n in left), (kind, left)  # it was killed mid-write
        if kind == "commit":  # the old folder is aside, the new one complete but not renamed in
            assert not dst.exists() and any(".gptoss-old-" in n for n in left), left
            atomic.remove_stale(parent)  # what any next writer does first: the old one goes back
            assert _temporaries(parent) == []
        assert _files(dst) == before[kind], kind  # the old checkpoint, untouched
        _assert_holds(dst, models[2])

    # the next run removes the dead writers' temporaries and writes the new checkpoint
    assert main(["convert", str(src), str(dsts["convert"]), "--to", "hf", "--dtype", "float32", "--overwrite"]) == 0
    _hf(models[1], dsts["save_hf"], overwrite=True)
    gj.save_native(models[1], dsts["save_native"], overwrite=True)
    export_hf(run_config(str(run)), str(dsts["export"]), dtype="float32", overwrite=True)
    _hf(models[1], dsts["commit"], overwrite=True)
    for kind, dst in dsts.items():
        assert _temporaries(dst.parent) == [], kind
        _assert_holds(dst, models[1])


def test_an_exception_mid_write_removes_the_temporary(models, tmp_path, monkeypatch):
    from gptoss_jax import checkpoint

    calls = []

    def second_shard_fails(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C mid-write
        safetensors_io.save_file(tensors, path, metadata=metadata)

    dst = _hf(models[2], tmp_path / "dst")
    before = _files(dst)
    monkeypatch.setattr(checkpoint, "save_file", second_shard_fails)
    for write in (
        lambda: _hf(models[1], dst, overwrite=True),
        lambda: gj.save_native(models[1], dst, max_shard_bytes=SHARD, overwrite=True),
        lambda: _hf(models[1], tmp_path / "new"),
    ):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            write()
        assert len(calls) == 2
        assert _files(dst) == before and _temporaries(tmp_path) == []
        assert not (tmp_path / "new").exists()
    _assert_holds(dst, models[2])


def test_stale_temporaries_only_of_dead_writers_on_this_host(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic._host()
    names = {
        "dead": f".ck.gptoss-tmp-{host}-{dead.pid}-0123abcd",
        "dead_file": f".tokenizer.json.gptoss-tmp-{host}-{dead.pid}-89abcdef",
        "alive": f".ck.gptoss-tmp-{host}-{os.getppid()}-0123abcd",
        "other_host": f".ck.gptoss-tmp-{host}x-{dead.pid}-0123abcd",
        "not_ours": ".ck.tmp-123",
    }
    for key, name in names.items():
        if key == "dead_file":
            (tmp_path / name).write_text("partial")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    removed = atomic.remove_stale(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted([names["dead"], names["dead_file"]])
    assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ("alive", "other_host", "not_ours"))


def test_single_file_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.file(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise RuntimeError("stopped")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["tokenizer.json"]
    (tmp_path / "new.json").write_text("new")
    atomic.copy_file(tmp_path / "new.json", path)
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["new.json", "tokenizer.json"]


# ------------------------------------------------------------------------------------ disk full
class _SmallDisk:
    """`open` for safetensors_io whose files fail with ENOSPC once `room` bytes were written."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        return _LimitedFile(f, self) if "w" in mode else f


class _LimitedFile:
    def __init__(self, f, disk: _SmallDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = len(data)
        if n > self._disk.room:
            self._f.write(bytes(data)[: self._disk.room])
            self._disk.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_is_one_line_and_leaves_nothing_behind(models, tmp_path, monkeypatch, capsys):
    src, dst = _hf(models[1], tmp_path / "src"), _hf(models[2], tmp_path / "dst")
    before = _files(dst)
    monkeypatch.setattr(safetensors_io, "open", _SmallDisk(int(1.5 * SHARD)), raising=False)
    assert main(["convert", str(src), str(dst), "--to", "hf", "--dtype", "float32", "--overwrite"]) == 2
    _one_error_line(capsys, "No space left on device")
    assert _files(dst) == before and _temporaries(tmp_path) == []

    monkeypatch.setattr(safetensors_io, "open", _SmallDisk(int(1.5 * SHARD)), raising=False)
    with pytest.raises(OSError) as e:
        gj.save_native(models[1], tmp_path / "new", max_shard_bytes=SHARD)
    assert e.value.errno == errno.ENOSPC
    assert not (tmp_path / "new").exists() and _temporaries(tmp_path) == []
    monkeypatch.undo()
    _assert_holds(dst, models[2])


# ---------------------------------------------------------------------------------------- export
def test_export_refuses_its_sources_and_non_empty_folders(models, tmp_path, capsys):
    run = _run_folder(tmp_path, models[1])
    dst = _hf(models[2], tmp_path / "dst")
    before, run_before = _files(dst), _files(run)
    assert main(["export", str(run), str(dst)]) == 2
    _one_error_line(capsys, "not empty")
    for bad, match in ((run / "model", "is the source itself"), (run, "inside the destination")):
        assert main(["export", str(run), str(bad), "--overwrite"]) == 2
        _one_error_line(capsys, match)
    assert _files(dst) == before and _files(run) == run_before
    assert main(["export", str(run), str(dst), "--dtype", "float32", "--overwrite"]) == 0
    _assert_holds(dst, models[1])
    assert _temporaries(tmp_path) == []

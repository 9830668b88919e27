"""Two real processes (4 fake CPU devices each, joined by jax.distributed over loopback with the
gloo collectives) run the model on one fsdp=2 x expert=4 mesh (fsdp across the processes): each
loads only its own slices of the checkpoint and its own rows of the batch; the gathered logits
equal one device's, and so does greedy generation."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import distributed

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_device(original_dir, tiny_cfg, tmp_path):
    tokens = np.random.RandomState(0).randint(0, tiny_cfg.vocab_size, (4, 20)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "multihost_worker.py"),
                    original_dir,
                    str(tmp_path / "tokens.npy"),
                    str(tmp_path),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    model = gj.load(original_dir, dtype="float32")
    graphdef, state = nnx.split(model)
    want = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))
    infos = [json.load(open(tmp_path / f"info{i}.json")) for i in range(2)]
    for i, info in enumerate(infos):
        assert info["process_count"] == 2 and info["device_count"] == 8 and info["local_devices"] == 4
        # fsdp spans the processes: each holds half of the packed experts, and of the model
        assert info["local_block_bytes"] * 2 == info["global_block_bytes"]
        assert info["local_model_bytes"] < 0.6 * info["global_model_bytes"]
        got = np.load(tmp_path / f"logits{i}.npy")
        err = float(np.abs(got - want).max() / np.abs(want).max())
        print(
            f"process {i}: rows {info['rows']}, max|diff|/max|logit| = {err:.2e}, holds "
            f"{info['local_model_bytes']:,} of {info['global_model_bytes']:,} model bytes"
        )
        assert err <= 1e-5
    prompts = [[int(t) for t in row[: 6 + 3 * i]] for i, row in enumerate(tokens)]
    want_gen = gj.generate(model, None, prompts, max_new_tokens=5, temperature=0, stop_tokens=())
    assert infos[0]["generated"] == infos[1]["generated"] == want_gen.tokens
    # each host loaded its own rows of the batch, together all of them once
    assert sorted(infos[0]["rows"] + infos[1]["rows"]) == list(range(tokens.shape[0]))
    assert not set(infos[0]["rows"]) & set(infos[1]["rows"])


def test_single_process_is_not_initialized(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched_on_several_processes()
    assert distributed.initialize() is False
    assert distributed.launched_on_several_processes({"SLURM_NTASKS": "4"})
    assert distributed.launched_on_several_processes({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not distributed.launched_on_several_processes({"SLURM_NTASKS": "1"})


def test_host_rows_on_one_process():
    mesh = gj.make_mesh(data=2, expert=4)
    np.testing.assert_array_equal(distributed.host_rows(mesh, 16), np.arange(16))
    batch = distributed.global_batch(np.arange(32).reshape(16, 2), mesh, 16)
    assert batch.shape == (16, 2) and len(batch.sharding.device_set) == 8

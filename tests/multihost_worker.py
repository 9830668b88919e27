"""One process of the two-process test in test_multihost.py (run as a script, not collected).

    python tests/multihost_worker.py CHECKPOINT TOKENS.npy OUT_DIR

The launcher sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and 4 fake CPU
devices per process; this joins the run, loads the checkpoint onto an fsdp=2 x expert=4 mesh over
all 8 devices, feeds its own rows of the batch, writes the gathered logits and greedy
generation from prompts of different lengths."""

import json
import os
import sys

import numpy as np

import gptoss_jax as gj
from gptoss_jax import distributed


def local_bytes(a) -> int:
    """Bytes of the distinct pieces of `a` this process holds (replicas on its devices once)."""
    pieces = {}
    for shard in a.addressable_shards:
        pieces[str(shard.index)] = shard.data.nbytes
    return sum(pieces.values())


def main(ckpt, tokens_path, out_dir):
    assert distributed.initialize(), "expected a multi-process launch"
    import jax
    from flax import nnx

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = gj.sharding.mesh_from_config({"fsdp": 2, "expert": 4})
    model = gj.load(ckpt, dtype="float32", mesh=mesh)
    tokens = np.load(tokens_path)
    rows = distributed.host_rows(mesh, tokens.shape[0])
    batch = distributed.global_batch(tokens[rows], mesh, tokens.shape[0])
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, batch)
    full = distributed.to_host(logits)
    prompts = [[int(t) for t in row[: 6 + 3 * i]] for i, row in enumerate(tokens)]
    gen = gj.generate(model, None, prompts, max_new_tokens=5, temperature=0, stop_tokens=())
    me = jax.process_index()
    blocks = model.layers[0].mlp.w1_blocks[...]
    arrays = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
    info = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "rows": rows.tolist(),
        "local_block_bytes": sum(s.data.nbytes for s in blocks.addressable_shards),
        "global_block_bytes": blocks.nbytes,
        "local_model_bytes": sum(local_bytes(a) for a in arrays),
        "global_model_bytes": sum(a.nbytes for a in arrays),
        "generated": gen.tokens,
    }
    with open(os.path.join(out_dir, f"info{me}.json"), "w") as f:
        json.dump(info, f)
    np.save(os.path.join(out_dir, f"logits{me}.npy"), full)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])

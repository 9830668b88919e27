"""Random weights at full size: a checkpoint in the HF hub MXFP4 layout written tensor by tensor
(RAM stays small), or a model filled in memory, both from one value recipe.

Names, shapes and dtypes come from the package's conversion table (`checkpoint.hf_rules`, the one
`save_hf` writes and `load` reads) applied to the abstract model: bf16 for everything but the
experts, uint8 MXFP4 `*_blocks` [E, out, in/32, 16] and `*_scales` [E, out, in/32]. Dtype names and
the header layout are those of `safetensors_io` (8-byte little-endian length, JSON header, data);
the header is padded with spaces so that the data section starts at a multiple of `align` bytes
(8: as the safetensors library writes; 64: every tensor 64-byte aligned, so `load` can alias the
memory map instead of copying).

Values (`recipe()`), drawn per tensor from the seed and the tensor's name: float matrices and
biases N(0, std); norm gains 1.0; sinks N(0, 1); MXFP4 blocks uniform bytes (two random E2M1 codes
each); scales uniform in [lo, hi] (E8M0 exponents; 118..122 = multipliers 2^-9..2^-5, small
enough that 24 layers keep activations and logits finite).
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import threading
import time
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gptoss_jax import model as model_lib
from gptoss_jax.checkpoint import MXFP4_MODULES_NOT_CONVERTED, hf_rules
from gptoss_jax.safetensors_io import DTYPES

CHUNK_BYTES = 64 * 2**20
BF16 = np.dtype(ml_dtypes.bfloat16)
INDEX = "model.safetensors.index.json"
SIDECAR = "random_weights.json"  # how the values were drawn (a changed recipe rewrites)
ST_NAMES = {v: k for k, v in DTYPES.items()}


def recipe(seed: int = 0, std: float = 0.02, scales=(118, 122), align: int = 64) -> dict:
    """The value recipe, as recorded beside a checkpoint (random_weights.json)."""
    return {
        "seed": seed,
        "std": std,
        "scales": list(scales),
        "norms": 1.0,
        "sinks_std": 1.0,
        "blocks": "uniform bytes",
        "align": align,
    }


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# --------------------------------------------------------------------------------- values
def kind(name: str, dtype) -> str:
    """What a tensor holds, from its name (HF key or model path) and dtype."""
    if np.dtype(dtype) == np.uint8:
        return "scales" if name.endswith("scales") else "blocks"
    if "norm" in name:
        return "ones"
    if "sinks" in name:
        return "sinks"
    return "normal"


def chunks(name: str, shape, dtype, rec: dict, chunk_bytes: int = CHUNK_BYTES):
    """The tensor's values as flat numpy chunks of about `chunk_bytes` (whole rows), in order."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng([rec["seed"], zlib.crc32(name.encode())])
    n = int(np.prod(shape, dtype=np.int64))
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, chunk_bytes // (row * dtype.itemsize)) * row
    what = kind(name, dtype)
    lo, hi = rec["scales"]
    for start in range(0, n, step):
        m = min(step, n - start)
        if what == "blocks":
            yield np.frombuffer(rng.bytes(m), np.uint8)
        elif what == "scales":
            yield rng.integers(lo, hi + 1, size=m, dtype=np.uint8)
        elif what == "ones":
            yield np.ones(m, dtype)
        elif what == "sinks":
            yield rng.standard_normal(m, dtype=np.float32).astype(dtype)
        else:
            yield (rng.standard_normal(m, dtype=np.float32) * np.float32(rec["std"])).astype(dtype)


def random_array(name: str, shape, dtype, rec: dict) -> np.ndarray:
    out = np.empty(int(np.prod(shape, dtype=np.int64)), np.dtype(dtype))
    start = 0
    for c in chunks(name, shape, dtype, rec):
        out[start : start + c.size] = c
        start += c.size
    return out.reshape(shape)


def random_model(cfg, *, dtype=jnp.bfloat16, experts: str = "mxfp4", rec: dict | None = None):
    """The abstract model with every leaf drawn by the recipe (no fp32 init and quantization,
    which needs tens of GB at full size); a leaf's name is its path joined with '/'."""
    rec = rec or recipe()
    model = model_lib.abstract(cfg, dtype=dtype, experts=experts)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        sd = var.get_value()
        value = random_array("/".join(map(str, path)), tuple(sd.shape), np.dtype(sd.dtype), rec)
        var.set_value(jnp.asarray(value))
    return model


# --------------------------------------------------------------------------------- layout
def plan_tensors(cfg) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every tensor of the HF MXFP4 checkpoint, sorted by name: the
    conversion rules' `save` side applied to the abstract model's variables (no memory)."""
    model = model_lib.abstract(cfg, dtype=jnp.bfloat16, experts="mxfp4")
    rules = {r.path: r for r in hf_rules(cfg, "mxfp4", packed_on_disk=True)}
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        rule = rules[path]
        dtype = np.dtype(np.uint8) if isinstance(var, model_lib.PackedWeight) else BF16
        disk = rule.save(np.broadcast_to(np.zeros((), dtype), tuple(var.get_value().shape)))
        out.append((rule.keys[0], tuple(int(d) for d in disk.shape), dtype))
    return sorted(out)


def split_shards(tensors, shard_bytes: float):
    """[(file name, tensors)]: contiguous runs of the sorted tensors of about total/n bytes each,
    n = ceil(total / shard_bytes); one file is model.safetensors, more model-0000i-of-0000n."""
    total = sum(nbytes(s, d) for _, s, d in tensors)
    n = max(1, math.ceil(total / shard_bytes))
    target = total / n
    shards, start = [[] for _ in range(n)], 0
    for t in tensors:
        shards[min(n - 1, int(start // target))].append(t)
        start += nbytes(t[1], t[2])
    shards = [s for s in shards if s]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    return list(zip(names, shards))


def shard_header(tensors, align: int) -> bytes:
    """The 8-byte length and the JSON header of a shard holding `tensors` in order, padded with
    spaces so that the data section starts at a multiple of `align` bytes."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % align)
    return struct.pack("<Q", len(blob)) + blob


def hf_config(cfg) -> dict:
    """config.json as `save_hf` writes it for MXFP4 experts in bf16."""
    d = cfg.to_hf_dict()
    d["torch_dtype"] = "bfloat16"
    d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(MXFP4_MODULES_NOT_CONVERTED)}
    return d


# ---------------------------------------------------------------------------------- writing
def existing_checkpoint_ok(out: str, shards, config: dict, rec: dict, align: int) -> tuple[bool, str]:
    """Whether `out` already holds exactly what `write_checkpoint` would write: index, config,
    recipe, and every shard's header and size. -> (ok, why not)."""
    index = os.path.join(out, INDEX)
    if not os.path.isfile(index):
        return False, f"no {INDEX}"
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        with open(os.path.join(out, "config.json")) as f:
            if json.load(f) != config:
                return False, "config.json differs"
        with open(os.path.join(out, SIDECAR)) as f:
            if json.load(f) != rec:
                return False, f"{SIDECAR} (seed / value recipe) differs"
    except (OSError, ValueError, KeyError) as e:
        return False, f"unreadable index/config/recipe ({e})"
    if weight_map != {t[0]: name for name, ts in shards for t in ts}:
        return False, "index weight_map differs"
    for name, ts in shards:
        path = os.path.join(out, name)
        head = shard_header(ts, align)
        if not os.path.isfile(path) or os.path.getsize(path) != len(head) + sum(nbytes(s, d) for _, s, d in ts):
            return False, f"{name} missing or of the wrong size"
        with open(path, "rb") as f:
            if f.read(len(head)) != head:
                return False, f"{name} header differs"
    return True, "complete"


def write_checkpoint(out: str, cfg, shards, rec: dict, align: int, progress: bool = True) -> float:
    """Write config.json, the shards (chunk by chunk; a writer thread overlaps the disk with the
    generator, <= 4 chunks in flight), the recipe and, last, the index that marks the folder
    complete. Checks the disk space first (SystemExit). -> seconds spent writing."""
    os.makedirs(out, exist_ok=True)
    total = sum(nbytes(s, d) for _, ts in shards for _, s, d in ts)
    # space: everything, minus files of the same names that the write replaces, plus headroom
    replaced = sum(os.path.getsize(os.path.join(out, n)) for n, _ in shards if os.path.isfile(os.path.join(out, n)))
    free = shutil.disk_usage(out).free
    need = total + 512 * 2**20 - replaced
    if free < need:
        raise SystemExit(
            f"error: not enough disk space in {out}: the checkpoint needs {total / 2**30:.2f} GiB "
            f"({need / 2**30:.2f} GiB more than the files it replaces, with 0.5 GiB headroom), "
            f"only {free / 2**30:.2f} GiB free. Free space or pass --out elsewhere."
        )
    for stale in (INDEX, SIDECAR):  # until the new index is written, the folder is not "complete"
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)

    q: queue.Queue = queue.Queue(maxsize=4)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", smoothing=0.05, disable=not progress
    )
    errors = []

    def writer():
        f = None
        try:
            while (item := q.get()) is not None:
                what, payload = item
                if what == "open":
                    f = open(payload, "wb")
                elif what == "data":
                    f.write(memoryview(payload.view(np.uint8)) if isinstance(payload, np.ndarray) else payload)
                    bar.update(payload.nbytes if isinstance(payload, np.ndarray) else 0)
                elif what == "close":
                    f.close()
                    os.replace(*payload)
                    f = None
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    t0 = time.perf_counter()
    for name, ts in shards:
        final = os.path.join(out, name)
        q.put(("open", final + ".tmp"))
        q.put(("data", shard_header(ts, align)))
        for key, shape, dtype in ts:
            written = 0
            for c in chunks(key, shape, dtype, rec):
                if errors:
                    break
                q.put(("data", c))
                written += c.nbytes
            assert errors or written == nbytes(shape, dtype), (key, written)
        q.put(("close", (final + ".tmp", final)))
    q.put(None)
    th.join()
    bar.close()
    if errors:
        raise SystemExit(f"error: writing the checkpoint failed: {errors[0]!r}")
    with open(os.path.join(out, SIDECAR), "w") as f:
        json.dump(rec, f, indent=2)
    with open(os.path.join(out, INDEX), "w") as f:  # last: marks the folder complete
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": {t[0]: name for name, ts in shards for t in ts}},
            f,
            indent=2,
        )
    return time.perf_counter() - t0

"""gpt-oss-20b at full size on this machine: random weights in the HF hub MXFP4 layout, written
to disk tensor by tensor, loaded with `gptoss_jax.load`, then a short greedy generation, with
memory, timing and a memory-bandwidth roofline for decoding.

    .venv/bin/python scripts/bench_20b.py                       # write (once), load, generate 16 tokens
    .venv/bin/python scripts/bench_20b.py --new-tokens 8        # fewer decode steps (quicker)
    .venv/bin/python scripts/bench_20b.py --out runs/g20b --json runs/g20b.json
    .venv/bin/python scripts/bench_20b.py --rewrite             # regenerate the weights
    .venv/bin/python scripts/bench_20b.py --write-only          # only write the checkpoint
    .venv/bin/python scripts/bench_20b.py --align 8 --out runs/gpt-oss-20b-random-a8   # copying load
    .venv/bin/python scripts/bench_20b.py --tiny --out runs/tiny-random   # smoke test, seconds
    XLA_FLAGS=--xla_disable_hlo_passes=while-loop-invariant-code-motion \
        .venv/bin/python scripts/bench_20b.py                   # decode without the hoisted f32 tables

1. Weights (`--out`, default runs/gpt-oss-20b-random). The tensor names, shapes and dtypes come
   from the package's own conversion table (`checkpoint.hf_rules`, the one `save_hf` writes and
   `load` reads) applied to the abstract 20b model: bf16 for everything but the experts, uint8
   MXFP4 `*_blocks` [E, out, in/32, 16] and `*_scales` [E, out, in/32]; config.json is
   `gpt_oss_20b().to_hf_dict()` plus the hub's quantization_config; shards of about
   `--shard-gb` GB with model.safetensors.index.json (13,761,264,768 B: the 13,761,550,080 B of
   `gj.parameter_bytes` minus the fp32->bf16 difference of the norms and sinks). Each tensor is
   generated and written in chunks of 64 MiB (a writer thread overlaps the disk with the
   generator), so RAM stays small. Values: bf16 matrices and biases N(0, 0.02), norm gains 1.0,
   sinks N(0, 1); MXFP4 blocks uniform bytes, scales uniform in [118, 122] (multipliers
   2^-9..2^-5), small enough that the 24 layers keep activations and logits finite. An existing
   folder is reused when its index, config, value recipe and every shard's header and size match
   what would be written (`--rewrite` forces). Disk space is checked before writing.
   Alignment (`--align`): the JSON header is padded with spaces (allowed by the format) so that
   the data section, hence every tensor (all sizes here are multiples of 64 B), starts 64-byte
   aligned. On CPU, jax.device_put of a read-only 64-byte-aligned numpy array aliases it instead
   of copying, so `load` then leaves every tensor it passes through untransposed (experts,
   embeddings, biases: 12.5 of the 12.8 GiB) as pages of the memory-mapped files: page cache,
   counted in RssFile, reclaimable, instead of anonymous memory. `--align 8` pads as the
   safetensors library does; whether a real shard is 64-byte aligned then depends on its header
   length (for this layout none of the 4 shards is), and load copies the whole model into
   anonymous memory. The script reports the bytes of the loaded model that alias the files.
2. Stream bandwidth of this machine: a timed copy of a 1 GiB numpy array, best of 5, with one
   thread and with one thread per core (copy bandwidth = bytes read + bytes written per second,
   the STREAM convention; the larger is used). Measured before loading so the arrays do not add
   to the model's peak.
3. `gj.load(out, progress=True)` (bf16, experts packed), timed until every array is ready.
4. `gj.generate(model, None, [prompt], max_new_tokens=N, temperature=0, stop_tokens=(),
   logprobs=True)` on a random prompt (`--prompt-len`, 16), twice with identical shapes: the
   first compiles prefill and decode, the second is timed (wall). Then generate's prefill alone
   (the same cached jitted `sampling._prefill_fn`, same shapes: no compilation), timed twice.
   prefill = the faster of those; decode time = timed generate wall - prefill (so it holds the N
   decode steps, sampling, and the per-call work of the decode function); decode tokens/s =
   N / decode time. Decoding runs as generate does by default: blocks of 16 steps in one jitted
   while-loop (`--block`). logprobs=True returns each chosen token's log-probability under the
   full softmax: finite logprobs mean finite logits.
5. Bytes touched per decoded token, from the loaded model's own arrays: one embedding row; per
   layer all attention weights (q/k/v/o and biases, sinks, norms), the router, and k/E of the
   expert tensors (the k=4 chosen experts' packed blocks+scales and their bias rows); the final
   norm; the whole unembedding; plus the KV cache as allocated for prompt+N tokens (a decode step
   attends over the whole buffer). Roofline tokens/s = bandwidth / bytes per token.
6. Memory: VmHWM / VmRSS / RssAnon / RssFile from /proc/self/status at each stage, and the peaks
   seen by a 50 ms sampler thread, which also aborts the run (exit 3, partial JSON written) if
   anonymous RSS exceeds --max-anon-gib or MemAvailable falls below --min-available-gib, so the
   benchmark cannot take a shared machine down. VmHWM counts mapped file pages too.

All figures go to `--json` (default OUT/bench_20b.json) and a summary is printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import queue
import shutil
import struct
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import gptoss_jax as gj  # noqa: E402
from gptoss_jax.cache import cache_bytes  # noqa: E402
from gptoss_jax import host  # noqa: E402
from gptoss_jax.checkpoint import hf_rules  # noqa: E402
from gptoss_jax.model import PackedWeight  # noqa: E402

GiB = 2**30
CHUNK_BYTES = 64 * 2**20
BF16 = np.dtype(ml_dtypes.bfloat16)
ST_NAMES = {np.dtype(np.uint8): "U8", BF16: "BF16"}
INDEX = "model.safetensors.index.json"
SIDECAR = "random_weights.json"  # how the values were drawn (a changed recipe rewrites)


# --------------------------------------------------------------------------------- memory
def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return -1


def gib(n) -> str:
    return f"{n / GiB:.2f} GiB"


class MemoryWatch:
    """Samples /proc every `interval` s: keeps peaks and aborts the process on a limit breach."""

    def __init__(self, report: dict, max_anon: float, min_available: float, interval=0.05):
        self.report, self.max_anon, self.min_available, self.interval = report, max_anon, min_available, interval
        self.peak_anon = self.peak_rss = self.peak_file = 0
        self.min_avail = mem_available()
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.interval):
            s = proc_status()
            anon = s.get("RssAnon", 0) + s.get("RssShmem", 0)
            avail = mem_available()
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
            self.peak_file = max(self.peak_file, s.get("RssFile", 0))
            self.min_avail = min(self.min_avail, avail)
            why = None
            if anon > self.max_anon:
                why = f"anonymous RSS {gib(anon)} exceeds --max-anon-gib {gib(self.max_anon)}"
            elif 0 <= avail < self.min_available:
                why = f"MemAvailable {gib(avail)} fell below --min-available-gib {gib(self.min_available)}"
            if why:
                msg = f"\n*** ABORTING during '{self.phase}': {why} (status {s}) ***"
                print(msg, file=sys.stderr, flush=True)
                self.report["aborted"] = {"phase": self.phase, "reason": why, "status": s}
                try:
                    self.report["memory"]["watch"] = self.peaks()
                    dump_json(self.report, self.report["json_path"])
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
                os._exit(3)

    def peaks(self) -> dict:
        return {"peak_rss_anon_bytes": self.peak_anon, "peak_vmrss_bytes": self.peak_rss,
                "peak_rss_file_bytes": self.peak_file, "min_mem_available_bytes": self.min_avail}


def dump_json(report: dict, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- checkpoint plan
def plan_tensors(cfg: gj.ModelConfig) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every tensor of the HF MXFP4 checkpoint, sorted by name: the
    package's conversion rules' `save` side applied to the abstract model's variables."""
    model = gj.abstract(cfg, dtype=jnp.bfloat16, experts="mxfp4")
    rules = {r.path: r for r in hf_rules(cfg, "mxfp4", packed_on_disk=True)}
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        rule = rules[path]
        dtype = np.dtype(np.uint8) if isinstance(var, PackedWeight) else BF16
        dummy = np.broadcast_to(np.zeros((), dtype), tuple(var.get_value().shape))  # no memory
        disk = rule.save(dummy)
        out.append((rule.keys[0], tuple(int(d) for d in disk.shape), dtype))
    return sorted(out)


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def split_shards(tensors, shard_bytes: float):
    """Contiguous runs of the sorted tensors of about total/n bytes each, n = ceil(total/shard_bytes)."""
    total = sum(nbytes(s, d) for _, s, d in tensors)
    n = max(1, math.ceil(total / shard_bytes))
    target = total / n
    shards, start = [[] for _ in range(n)], 0
    for t in tensors:
        i = min(n - 1, int(start // target))
        shards[i].append(t)
        start += nbytes(t[1], t[2])
    shards = [s for s in shards if s]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    return list(zip(names, shards))


def shard_header(tensors, align: int) -> bytes:
    """8-byte little-endian length + JSON header, padded with spaces so that the data section
    starts at a multiple of `align` bytes (8 = what the safetensors library writes)."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % align)
    return struct.pack("<Q", len(blob)) + blob


def hf_config(cfg: gj.ModelConfig) -> dict:
    d = cfg.to_hf_dict()
    d["torch_dtype"] = "bfloat16"
    d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return d


# ------------------------------------------------------------------------------ random values
def chunks(name: str, shape, dtype, recipe: dict):
    """The tensor's bytes as numpy chunks of about CHUNK_BYTES, drawn from a per-tensor seed."""
    rng = np.random.default_rng([recipe["seed"], zlib.crc32(name.encode())])
    n = int(np.prod(shape, dtype=np.int64))
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, CHUNK_BYTES // (row * dtype.itemsize)) * row
    lo, hi = recipe["scales"]
    for start in range(0, n, step):
        m = min(step, n - start)
        if name.endswith("_blocks"):  # two random E2M1 codes per byte
            yield np.frombuffer(rng.bytes(m), np.uint8)
        elif name.endswith("_scales"):  # E8M0 exponents near 2^-7
            yield rng.integers(lo, hi + 1, size=m, dtype=np.uint8)
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            yield np.ones(m, BF16)
        elif name.endswith("sinks"):
            yield rng.standard_normal(m, dtype=np.float32).astype(BF16)
        else:
            yield (rng.standard_normal(m, dtype=np.float32) * np.float32(recipe["std"])).astype(BF16)


def existing_checkpoint_ok(out: str, shards, config: dict, recipe: dict, align: int) -> tuple[bool, str]:
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
            if json.load(f) != recipe:
                return False, f"{SIDECAR} (seed / value recipe) differs"
    except (OSError, ValueError, KeyError) as e:
        return False, f"unreadable index/config/recipe ({e})"
    want_map = {t[0]: name for name, ts in shards for t in ts}
    if weight_map != want_map:
        return False, "index weight_map differs"
    for name, ts in shards:
        path = os.path.join(out, name)
        head = shard_header(ts, align)
        size = len(head) + sum(nbytes(s, d) for _, s, d in ts)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False, f"{name} missing or of the wrong size"
        with open(path, "rb") as f:
            if f.read(len(head)) != head:
                return False, f"{name} header differs"
    return True, "complete"


def write_checkpoint(out: str, cfg: gj.ModelConfig, shards, recipe: dict, align: int):
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    total = sum(nbytes(s, d) for _, ts in shards for _, s, d in ts)
    # Space: everything, minus files of the same names that the write replaces, plus headroom.
    replaced = sum(os.path.getsize(os.path.join(out, n)) for n, _ in shards if os.path.isfile(os.path.join(out, n)))
    free = shutil.disk_usage(out).free
    need = total + 512 * 2**20 - replaced
    if free < need:
        raise SystemExit(f"error: not enough disk space in {out}: the checkpoint needs {gib(total)} "
                         f"({gib(need)} more than the files it replaces, with 0.5 GiB headroom), "
                         f"only {gib(free)} free. Free space or pass --out elsewhere.")
    # Remove a stale index first: until the new one is written, the folder is not "complete".
    for stale in (INDEX, SIDECAR):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)

    q: queue.Queue = queue.Queue(maxsize=4)  # <= 4 chunks in flight: ~256 MiB
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", smoothing=0.05)
    errors = []

    def writer():
        f = None
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                kind, payload = item
                if kind == "open":
                    f = open(payload, "wb")
                elif kind == "head":
                    f.write(payload)
                elif kind == "data":
                    f.write(memoryview(payload.view(np.uint8)))
                    bar.update(payload.nbytes)
                elif kind == "close":
                    tmp, final = payload
                    f.close()
                    os.replace(tmp, final)
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
        q.put(("head", shard_header(ts, align)))
        for key, shape, dtype in ts:
            written = 0
            for c in chunks(key, shape, dtype, recipe):
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
    weight_map = {t[0]: name for name, ts in shards for t in ts}
    with open(os.path.join(out, SIDECAR), "w") as f:
        json.dump(recipe, f, indent=2)
    with open(os.path.join(out, INDEX), "w") as f:  # last: marks the folder complete
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------- bandwidth
def stream_bandwidth(nbytes_: int, repeats: int, threads: int) -> dict:
    src = np.full(nbytes_, 1, np.uint8)
    dst = np.zeros(nbytes_, np.uint8)  # both touched: no page faults inside the timing
    parts = np.array_split(np.arange(nbytes_ // 4096 + 1) * 4096, threads)
    bounds = [(int(p[0]), min(nbytes_, int(p[-1]) + 4096)) for p in parts if len(p)]

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t1 = best(lambda: np.copyto(dst, src))
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        def par():
            list(ex.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
        tn = best(par)
    ok = bool(dst[::4096].all())
    del src, dst
    bw1, bwn = 2 * nbytes_ / t1, 2 * nbytes_ / tn
    return {"array_bytes": nbytes_, "repeats": repeats, "threads": threads,
            "copy_1thread_bytes_per_s": bw1, f"copy_{threads}threads_bytes_per_s": bwn,
            "bandwidth_bytes_per_s": max(bw1, bwn), "check": ok,
            "convention": "copy: (bytes read + bytes written) / best time"}


# ---------------------------------------------------------------------------- model figures
def decode_bytes_per_token(model, total_len: int) -> dict:
    """Bytes of weights (and KV cache) one decode step reads: the whole model except all but
    one embedding row and all but k of the E experts' tensors per layer."""
    cfg = model.cfg
    k, E = cfg.experts_per_token, cfg.num_experts
    per = {"embed_row": 0, "attention": 0, "router": 0, "experts_k": 0, "norms": 0, "unembed": 0}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        b = int(np.prod(v.shape)) * v.dtype.itemsize
        name = str(path[-1])
        if path == ("embed",):
            per["embed_row"] += b // v.shape[0]
        elif path == ("unembed",):
            per["unembed"] += b
        elif name in ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales", "b1", "b2", "w1", "w2"):
            per["experts_k"] += b * k // E
        elif name in ("router", "router_bias"):
            per["router"] += b
        elif name == "norm":
            per["norms"] += b
        else:  # q, k, v, o (+ biases), sinks
            per["attention"] += b
    kv = cache_bytes(cfg, 1, total_len, model.dtype)
    weights = sum(per.values())
    return {"parts": per, "weights": weights, "kv_cache": kv, "total": weights + kv,
            "expert_bytes_per_layer_k_experts": per["experts_k"] // cfg.num_layers}


def aliased_bytes(model, files) -> int:
    """Bytes of model arrays whose buffer lies inside a mapping of one of the checkpoint files
    (zero-copy from the memory map)."""
    files = {os.path.realpath(f) for f in files}
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and os.path.realpath(parts[5].strip()) in files:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        try:
            p = v.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - sharded or deleted arrays: not aliased here
            continue
        if any(lo <= p < hi for lo, hi in ranges):
            total += int(np.prod(v.shape)) * v.dtype.itemsize
    return total


def run_generate(model, prompt, n_new: int, block: int | None) -> dict:
    """One `gj.generate` call as the package runs it by default (decode in blocks of `block`
    steps inside one jitted while-loop; None = generate's default, 16)."""
    t0 = time.perf_counter()
    gen = gj.generate(model, None, [prompt], max_new_tokens=n_new, temperature=0, stop_tokens=(),
                      block=block, logprobs=True)
    wall = time.perf_counter() - t0
    lp = np.asarray(gen.logprobs[0], np.float64)
    return {"wall_s": wall, "tokens": gen.tokens[0], "stop_reason": gen.stop_reason[0],
            "logprobs_finite": bool(np.all(np.isfinite(lp))),
            "logprob_min": float(lp.min()), "logprob_max": float(lp.max())}


def time_prefill(model, prompt, n_new: int, repeats: int = 2, prefill_chunk: int = 256) -> list[float]:
    """`generate`'s prefill alone: the same jitted function (`sampling._prefill_fn`, cached per
    model structure, so generate has already compiled it) on the same shapes and chunking, timed
    from a fresh cache to logits on the host side."""
    from gptoss_jax import sampling
    from gptoss_jax.cache import init_cache

    cfg = model.cfg
    L = len(prompt)
    C = min(prefill_chunk, L)
    n_chunks = -(-L // C)
    padded = np.zeros((1, n_chunks * C), np.int32)
    padded[0, :L] = prompt
    graphdef, state = nnx.split(model)
    prefill = sampling._prefill_fn(graphdef)
    times = []
    for _ in range(repeats):
        cache = init_cache(cfg, 1, L + n_new, model.dtype)
        logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)
        jax.block_until_ready((cache, logits))
        t = time.perf_counter()
        for c in range(n_chunks):
            n_valid = np.clip(np.array([L]) - c * C, 0, C).astype(np.int32)
            cache, logits = prefill(state, cache, jnp.asarray(padded[:, c * C:(c + 1) * C]),
                                    jnp.asarray(n_valid), logits)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
        del cache, logits
    return times


def snapshot(report, label):
    s = proc_status()
    s["MemAvailable"] = mem_available()
    report["memory"][label] = s
    print(f"[mem] {label:>22s}: VmRSS {gib(s['VmRSS'])}  RssAnon {gib(s['RssAnon'])}  "
          f"RssFile {gib(s['RssFile'])}  VmHWM {gib(s['VmHWM'])}  MemAvailable {gib(s['MemAvailable'])}",
          flush=True)


# ------------------------------------------------------------------------------------- main
def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpt-oss-20b-random", help="checkpoint folder")
    ap.add_argument("--rewrite", action="store_true", help="write the weights even if a complete set exists")
    ap.add_argument("--write-only", action="store_true", help="stop after writing the checkpoint")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to decode")
    ap.add_argument("--block", type=int, default=None,
                    help="decode steps per jitted call (generate's `block`; default: generate's own, 16)")
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt length")
    ap.add_argument("--prefill-repeats", type=int, default=2, help="timings of the prefill alone (best taken)")
    ap.add_argument("--json", default=None, help="result file (default OUT/bench_20b.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of bf16 matrices and biases")
    ap.add_argument("--scales", type=int, nargs=2, default=(118, 122), metavar=("LO", "HI"),
                    help="MXFP4 E8M0 scale bytes drawn uniformly in [LO, HI]")
    ap.add_argument("--shard-gb", type=float, default=4.0, help="largest shard size, 1e9 bytes")
    ap.add_argument("--align", type=int, default=64, choices=(8, 64),
                    help="data section alignment: 64 (default) makes every tensor 64-byte aligned, so the "
                         "loader's memory maps are zero-copy; 8 pads as the safetensors library does")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="array size of the copy benchmark")
    ap.add_argument("--max-anon-gib", type=float, default=19.0, help="abort above this anonymous RSS")
    ap.add_argument("--min-available-gib", type=float, default=1.0, help="abort below this MemAvailable")
    ap.add_argument("--tiny", action="store_true", help="gj.tiny() instead of 20b (smoke test)")
    args = ap.parse_args()
    if args.new_tokens < 1:
        ap.error("--new-tokens must be >= 1")
    if not 0 <= args.scales[0] <= args.scales[1] <= 254:
        ap.error("--scales needs 0 <= LO <= HI <= 254")

    out = os.path.abspath(args.out)
    json_path = os.path.abspath(args.json or os.path.join(out, "bench_20b.json"))
    cfg = gj.tiny() if args.tiny else gj.gpt_oss_20b()
    recipe = {"seed": args.seed, "std": args.std, "scales": list(args.scales), "norms": 1.0,
              "sinks_std": 1.0, "blocks": "uniform bytes", "align": args.align}
    report: dict = {"json_path": json_path, "config": "tiny" if args.tiny else "gpt-oss-20b",
                    "checkpoint": out, "recipe": recipe, "memory": {},
                    "machine": {"cpus": os.cpu_count(), "jax": jax.__version__,
                                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                                "huge_pages": host.huge_pages_requested(),
                                "backend": jax.default_backend(),
                                "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}}
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    watch = MemoryWatch(report, args.max_anon_gib * GiB, args.min_available_gib * GiB).start()
    snapshot(report, "start")
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")

    # 1. checkpoint -----------------------------------------------------------------------
    tensors = plan_tensors(cfg)
    shards = split_shards(tensors, args.shard_gb * 1e9)
    total = sum(nbytes(s, d) for _, s, d in tensors)
    heads = {n: len(shard_header(ts, args.align)) for n, ts in shards}
    report["checkpoint_bytes"] = total
    report["shards"] = [{"file": n, "tensors": len(ts), "bytes": sum(nbytes(s, d) for _, s, d in ts),
                         "data_offset": heads[n], "data_offset_mod_64": heads[n] % 64} for n, ts in shards]
    print(f"checkpoint: {len(tensors)} tensors, {total:,} B ({gib(total)}) in {len(shards)} shards -> {out}")
    for s in report["shards"]:
        print(f"  {s['file']}: {s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB, data at byte "
              f"{s['data_offset']} ({'64B-aligned' if s['data_offset_mod_64'] == 0 else 'not 64B-aligned'})")
    ok, why = (False, "--rewrite") if args.rewrite else existing_checkpoint_ok(
        out, shards, hf_config(cfg), recipe, args.align)
    if ok:
        print(f"reusing the complete checkpoint in {out}")
        report["write_s"] = None
    else:
        print(f"writing ({why})", flush=True)
        watch.phase = "write"
        report["write_s"] = write_checkpoint(out, cfg, shards, recipe, args.align)
        print(f"wrote {gib(total)} in {report['write_s']:.1f} s "
              f"({total / report['write_s'] / 1e9:.2f} GB/s)")
    snapshot(report, "after write")
    if args.write_only:
        watch.stop()
        report["memory"]["watch"] = watch.peaks()
        dump_json(report, json_path)
        print(f"results: {json_path}")
        return

    # 2. bandwidth ------------------------------------------------------------------------
    watch.phase = "bandwidth"
    bw = stream_bandwidth(int(args.bandwidth_gib * GiB), repeats=5, threads=os.cpu_count() or 1)
    report["bandwidth"] = bw
    print(f"stream copy bandwidth: {bw['copy_1thread_bytes_per_s'] / 1e9:.2f} GB/s (1 thread), "
          f"{bw['copy_%dthreads_bytes_per_s' % bw['threads']] / 1e9:.2f} GB/s ({bw['threads']} threads)")

    # 3. load -----------------------------------------------------------------------------
    avail = mem_available()
    if avail < total + 2 * GiB:
        print(f"warning: MemAvailable {gib(avail)} < checkpoint {gib(total)} + 2 GiB; the run may be "
              "aborted by the memory watch", file=sys.stderr)
    snapshot(report, "before load")
    watch.phase = "load"
    t = time.perf_counter()
    try:
        model = gj.load(out, progress=True)
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    except Exception as e:  # noqa: BLE001 - reported with its place of origin
        import traceback
        tb = traceback.extract_tb(e.__traceback__)[-1]
        report["error"] = {"phase": "load", "error": repr(e), "where": f"{tb.filename}:{tb.lineno}"}
        dump_json(report, json_path)
        raise
    report["load_s"] = time.perf_counter() - t
    snapshot(report, "after load")
    files = [os.path.join(out, n) for n, _ in shards]
    report["parameter_bytes"] = gj.parameter_bytes(model)
    report["parameter_count"] = gj.parameter_count(model)
    report["aliased_bytes"] = aliased_bytes(model, files)
    print(f"loaded in {report['load_s']:.1f} s: {report['parameter_count']:,} parameters, "
          f"{report['parameter_bytes']:,} B ({gib(report['parameter_bytes'])}) as stored; "
          f"{gib(report['aliased_bytes'])} of it zero-copy views of the checkpoint files")

    # 4. generate -------------------------------------------------------------------------
    prompt = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    report["prompt"] = prompt
    runs = {}
    for label in ("warmup", "timed"):
        watch.phase = f"generate {label}"
        print(f"generate [{label}{' (compiles prefill + decode)' if label == 'warmup' else ''}]: prompt "
              f"{len(prompt)} tokens, {args.new_tokens} new tokens ...", flush=True)
        try:
            runs[label] = r = run_generate(model, prompt, args.new_tokens, args.block)
        except Exception as e:  # noqa: BLE001
            import traceback
            tb = traceback.extract_tb(e.__traceback__)[-1]
            report["error"] = {"phase": f"generate {label}", "error": repr(e), "where": f"{tb.filename}:{tb.lineno}"}
            dump_json(report, json_path)
            raise
        print(f"  wall {r['wall_s']:.2f} s, tokens {r['tokens']}, logprobs finite: {r['logprobs_finite']}",
              flush=True)
        snapshot(report, f"after generate {label}")
    watch.phase = "prefill alone"
    prefill_times = time_prefill(model, prompt, args.new_tokens, repeats=args.prefill_repeats)
    print(f"prefill alone: {', '.join(f'{t:.2f} s' for t in prefill_times)}", flush=True)
    snapshot(report, "after prefill alone")
    # How much of the anonymous RSS is freed memory that glibc keeps (XLA's temporaries): return
    # it to the OS and look again. Done last, so it changes none of the figures above.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        snapshot(report, "after malloc_trim")
    except OSError:
        pass
    timed = dict(runs["timed"])
    timed["prefill_s"] = min(prefill_times)
    timed["prefill_runs_s"] = prefill_times
    timed["decode_s"] = timed["wall_s"] - timed["prefill_s"]
    timed["decode_tokens_per_s"] = args.new_tokens / timed["decode_s"]
    timed["ms_per_token"] = 1e3 * timed["decode_s"] / args.new_tokens
    runs["timed"] = timed
    report["generate"] = runs

    # 5. roofline -------------------------------------------------------------------------
    per_tok = decode_bytes_per_token(model, args.prompt_len + args.new_tokens)
    bound = bw["bandwidth_bytes_per_s"] / per_tok["total"]
    report["decode_bytes_per_token"] = per_tok
    report["roofline"] = {"bandwidth_bytes_per_s": bw["bandwidth_bytes_per_s"], "bound_tokens_per_s": bound,
                          "achieved_tokens_per_s": timed["decode_tokens_per_s"],
                          "achieved_fraction": timed["decode_tokens_per_s"] / bound,
                          "achieved_bytes_per_s": timed["decode_tokens_per_s"] * per_tok["total"]}
    watch.stop()
    report["memory"]["watch"] = watch.peaks()
    peak = report["memory"]["after prefill alone"]["VmHWM"]
    report["peak_rss_bytes"] = peak
    report["peak_rss_goal_met"] = peak <= 16 * GiB
    dump_json(report, json_path)

    m = report["memory"]
    print("\n================ gpt-oss-20b (random weights) on this machine ================")
    print(f"checkpoint        {total:,} B in {len(shards)} shards"
          + (f", written in {report['write_s']:.0f} s" if report["write_s"] else " (reused)"))
    print(f"packed model      {report['parameter_bytes']:,} B ({gib(report['parameter_bytes'])}), "
          f"{report['parameter_count'] / 1e9:.2f}e9 parameters")
    print(f"load              {report['load_s']:.1f} s ({gib(report['aliased_bytes'])} zero-copy from the files)")
    print(f"prefill           {timed['prefill_s']:.2f} s for {args.prompt_len} tokens "
          f"({args.prompt_len / timed['prefill_s']:.1f} tok/s; runs {', '.join(f'{t:.2f}' for t in prefill_times)} s)")
    print(f"decode            {timed['decode_tokens_per_s']:.3f} tok/s = {args.new_tokens} tokens in "
          f"{timed['decode_s']:.2f} s ({timed['ms_per_token']:.0f} ms/token; generate wall {timed['wall_s']:.2f} s "
          f"- prefill {timed['prefill_s']:.2f} s)")
    print(f"compile+1st run   {runs['warmup']['wall_s']:.1f} s (warm-up generate) vs {timed['wall_s']:.1f} s timed")
    print(f"bytes / token     {per_tok['total'] / 1e9:.3f} GB (unembed {per_tok['parts']['unembed'] / 1e9:.3f}, "
          f"{cfg.experts_per_token} experts x {cfg.num_layers} layers "
          f"{per_tok['parts']['experts_k'] / 1e9:.3f}, attention "
          f"{per_tok['parts']['attention'] / 1e9:.3f}, router {per_tok['parts']['router'] / 1e6:.2f} MB, "
          f"KV {per_tok['kv_cache'] / 1e6:.2f} MB)")
    print(f"bandwidth         {bw['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s (numpy copy, read+write)")
    print(f"roofline          {bound:.2f} tok/s; achieved {timed['decode_tokens_per_s']:.3f} tok/s = "
          f"{100 * report['roofline']['achieved_fraction']:.1f}% of the bound "
          f"({report['roofline']['achieved_bytes_per_s'] / 1e9:.2f} GB/s effective)")
    print(f"RSS (VmRSS)       before load {gib(m['before load']['VmRSS'])}, after load "
          f"{gib(m['after load']['VmRSS'])}, after generate {gib(m['after generate timed']['VmRSS'])}")
    print(f"  of it anonymous before {gib(m['before load']['RssAnon'])}, after load {gib(m['after load']['RssAnon'])}, "
          f"after generate {gib(m['after generate timed']['RssAnon'])}; file-backed after generate "
          f"{gib(m['after generate timed']['RssFile'])}")
    print(f"peak RSS (VmHWM)  {gib(peak)} ({'<=' if peak <= 16 * GiB else '>'} 16 GiB goal; counts mapped file "
          f"pages too); sampled peaks: anonymous {gib(m['watch']['peak_rss_anon_bytes'])}, file-backed "
          f"{gib(m['watch']['peak_rss_file_bytes'])}; min MemAvailable {gib(m['watch']['min_mem_available_bytes'])}")
    if "after malloc_trim" in m:
        print(f"  anonymous after malloc_trim(0) {gib(m['after malloc_trim']['RssAnon'])} (the rest of "
              f"{gib(m['after prefill alone']['RssAnon'])} was freed memory kept by the allocator)")
    print(f"tokens            {timed['tokens']} (same in both runs: "
          f"{timed['tokens'] == runs['warmup']['tokens']}); logprobs in "
          f"[{timed['logprob_min']:.2f}, {timed['logprob_max']:.2f}], finite: {timed['logprobs_finite']}")
    print(f"results           {json_path}")


if __name__ == "__main__":
    main()

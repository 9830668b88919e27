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
   (`sampling.prefill`: the same cached jitted function, same shapes: no compilation), timed twice.
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
import ctypes
import os
import sys
import time
import traceback

import jax
import numpy as np
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import flops, generation, peaks, records, weights
from gptoss_jax.bench.memory import GiB, MemoryWatch, aliased_bytes, gib, mem_available, proc_status


def dump_json(report: dict, path: str):
    records.write(report, path, indent=2, default=str)


def stream_bandwidth(nbytes: int, repeats: int, threads: int) -> dict:
    r = peaks.threaded_copy(nbytes, repeats, threads)
    return {
        "array_bytes": nbytes,
        "repeats": repeats,
        "threads": threads,
        "copy_1thread_bytes_per_s": r["one"],
        f"copy_{threads}threads_bytes_per_s": r["many"],
        "bandwidth_bytes_per_s": max(r["one"], r["many"]),
        "check": r["check"],
        "convention": "copy: (bytes read + bytes written) / best time",
    }


def fail(report, json_path, phase, e):
    tb = traceback.extract_tb(e.__traceback__)[-1]
    report["error"] = {"phase": phase, "error": repr(e), "where": f"{tb.filename}:{tb.lineno}"}
    dump_json(report, json_path)


def snapshot(report, label):
    s = proc_status()
    s["MemAvailable"] = mem_available()
    report["memory"][label] = s
    print(
        f"[mem] {label:>22s}: VmRSS {gib(s['VmRSS'])}  RssAnon {gib(s['RssAnon'])}  "
        f"RssFile {gib(s['RssFile'])}  VmHWM {gib(s['VmHWM'])}  MemAvailable {gib(s['MemAvailable'])}",
        flush=True,
    )


# ------------------------------------------------------------------------------------- main
def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/gpt-oss-20b-random", help="checkpoint folder")
    ap.add_argument("--rewrite", action="store_true", help="write the weights even if a complete set exists")
    ap.add_argument("--write-only", action="store_true", help="stop after writing the checkpoint")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to decode")
    ap.add_argument(
        "--block",
        type=int,
        default=None,
        help="decode steps per jitted call (generate's `block`; default: generate's own, 16)",
    )
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt length")
    ap.add_argument("--prefill-repeats", type=int, default=2, help="timings of the prefill alone (best taken)")
    ap.add_argument("--json", default=None, help="result file (default OUT/bench_20b.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of bf16 matrices and biases")
    ap.add_argument(
        "--scales",
        type=int,
        nargs=2,
        default=(118, 122),
        metavar=("LO", "HI"),
        help="MXFP4 E8M0 scale bytes drawn uniformly in [LO, HI]",
    )
    ap.add_argument("--shard-gb", type=float, default=4.0, help="largest shard size, 1e9 bytes")
    ap.add_argument(
        "--align",
        type=int,
        default=64,
        choices=(8, 64),
        help="data section alignment: 64 (default) makes every tensor 64-byte aligned, so the "
        "loader's memory maps are zero-copy; 8 pads as the safetensors library does",
    )
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
    recipe = weights.recipe(args.seed, args.std, args.scales, args.align)
    report: dict = {
        "json_path": json_path,
        "config": "tiny" if args.tiny else "gpt-oss-20b",
        "checkpoint": out,
        "recipe": recipe,
        "memory": {},
        "machine": {
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "huge_pages": host.huge_pages_requested(),
            "backend": jax.default_backend(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
    }
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    watch = MemoryWatch(
        report, args.max_anon_gib * GiB, args.min_available_gib * GiB, save=lambda r: dump_json(r, json_path)
    ).start()
    snapshot(report, "start")
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")

    # 1. checkpoint -----------------------------------------------------------------------
    tensors = weights.plan_tensors(cfg)
    shards = weights.split_shards(tensors, args.shard_gb * 1e9)
    total = sum(weights.nbytes(s, d) for _, s, d in tensors)
    heads = {n: len(weights.shard_header(ts, args.align)) for n, ts in shards}
    report["checkpoint_bytes"] = total
    report["shards"] = [
        {
            "file": n,
            "tensors": len(ts),
            "bytes": sum(weights.nbytes(s, d) for _, s, d in ts),
            "data_offset": heads[n],
            "data_offset_mod_64": heads[n] % 64,
        }
        for n, ts in shards
    ]
    print(f"checkpoint: {len(tensors)} tensors, {total:,} B ({gib(total)}) in {len(shards)} shards -> {out}")
    for s in report["shards"]:
        print(
            f"  {s['file']}: {s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB, data at byte "
            f"{s['data_offset']} ({'64B-aligned' if s['data_offset_mod_64'] == 0 else 'not 64B-aligned'})"
        )
    ok, why = (
        (False, "--rewrite")
        if args.rewrite
        else weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), recipe, args.align)
    )
    if ok:
        print(f"reusing the complete checkpoint in {out}")
        report["write_s"] = None
    else:
        print(f"writing ({why})", flush=True)
        watch.phase = "write"
        report["write_s"] = weights.write_checkpoint(out, cfg, shards, recipe, args.align)
        print(f"wrote {gib(total)} in {report['write_s']:.1f} s ({total / report['write_s'] / 1e9:.2f} GB/s)")
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
    print(
        f"stream copy bandwidth: {bw['copy_1thread_bytes_per_s'] / 1e9:.2f} GB/s (1 thread), "
        f"{bw['copy_{}threads_bytes_per_s'.format(bw['threads'])] / 1e9:.2f} GB/s ({bw['threads']} threads)"
    )

    # 3. load -----------------------------------------------------------------------------
    avail = mem_available()
    if avail < total + 2 * GiB:
        print(
            f"warning: MemAvailable {gib(avail)} < checkpoint {gib(total)} + 2 GiB; the run may be "
            "aborted by the memory watch",
            file=sys.stderr,
        )
    snapshot(report, "before load")
    watch.phase = "load"
    t = time.perf_counter()
    try:
        model = gj.load(out, progress=True)
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    except Exception as e:  # noqa: BLE001 - reported with its place of origin
        fail(report, json_path, "load", e)
        raise
    report["load_s"] = time.perf_counter() - t
    snapshot(report, "after load")
    files = [os.path.join(out, n) for n, _ in shards]
    report["parameter_bytes"] = gj.parameter_bytes(model)
    report["parameter_count"] = gj.parameter_count(model)
    report["aliased_bytes"] = aliased_bytes(model, files)
    print(
        f"loaded in {report['load_s']:.1f} s: {report['parameter_count']:,} parameters, "
        f"{report['parameter_bytes']:,} B ({gib(report['parameter_bytes'])}) as stored; "
        f"{gib(report['aliased_bytes'])} of it zero-copy views of the checkpoint files"
    )

    # 4. generate -------------------------------------------------------------------------
    prompt = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    report["prompt"] = prompt
    runs = {}
    for label in ("warmup", "timed"):
        watch.phase = f"generate {label}"
        print(
            f"generate [{label}{' (compiles prefill + decode)' if label == 'warmup' else ''}]: prompt "
            f"{len(prompt)} tokens, {args.new_tokens} new tokens ...",
            flush=True,
        )
        try:
            runs[label] = r = generation.run_generate(model, prompt, args.new_tokens, args.block)
        except Exception as e:  # noqa: BLE001
            fail(report, json_path, f"generate {label}", e)
            raise
        print(f"  wall {r['wall_s']:.2f} s, tokens {r['tokens']}, logprobs finite: {r['logprobs_finite']}", flush=True)
        snapshot(report, f"after generate {label}")
    watch.phase = "prefill alone"
    prefill_times = generation.time_prefill(model, prompt, args.new_tokens, repeats=args.prefill_repeats)
    print(f"prefill alone: {', '.join(f'{t:.2f} s' for t in prefill_times)}", flush=True)
    snapshot(report, "after prefill alone")
    # How much of the anonymous RSS is freed memory that glibc keeps (XLA's temporaries): return
    # it to the OS and look again. Done last, so it changes none of the figures above.
    try:
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
    per_tok = flops.decode_bytes_per_token(model, args.prompt_len + args.new_tokens)
    bound = bw["bandwidth_bytes_per_s"] / per_tok["total"]
    report["decode_bytes_per_token"] = per_tok
    report["roofline"] = {
        "bandwidth_bytes_per_s": bw["bandwidth_bytes_per_s"],
        "bound_tokens_per_s": bound,
        "achieved_tokens_per_s": timed["decode_tokens_per_s"],
        "achieved_fraction": timed["decode_tokens_per_s"] / bound,
        "achieved_bytes_per_s": timed["decode_tokens_per_s"] * per_tok["total"],
    }
    watch.stop()
    report["memory"]["watch"] = watch.peaks()
    peak = report["memory"]["after prefill alone"]["VmHWM"]
    report["peak_rss_bytes"] = peak
    report["peak_rss_goal_met"] = peak <= 16 * GiB
    dump_json(report, json_path)

    m = report["memory"]
    print("\n================ gpt-oss-20b (random weights) on this machine ================")
    print(
        f"checkpoint        {total:,} B in {len(shards)} shards"
        + (f", written in {report['write_s']:.0f} s" if report["write_s"] else " (reused)")
    )
    print(
        f"packed model      {report['parameter_bytes']:,} B ({gib(report['parameter_bytes'])}), "
        f"{report['parameter_count'] / 1e9:.2f}e9 parameters"
    )
    print(f"load              {report['load_s']:.1f} s ({gib(report['aliased_bytes'])} zero-copy from the files)")
    print(
        f"prefill           {timed['prefill_s']:.2f} s for {args.prompt_len} tokens "
        f"({args.prompt_len / timed['prefill_s']:.1f} tok/s; runs {', '.join(f'{t:.2f}' for t in prefill_times)} s)"
    )
    print(
        f"decode            {timed['decode_tokens_per_s']:.3f} tok/s = {args.new_tokens} tokens in "
        f"{timed['decode_s']:.2f} s ({timed['ms_per_token']:.0f} ms/token; generate wall {timed['wall_s']:.2f} s "
        f"- prefill {timed['prefill_s']:.2f} s)"
    )
    print(f"compile+1st run   {runs['warmup']['wall_s']:.1f} s (warm-up generate) vs {timed['wall_s']:.1f} s timed")
    print(
        f"bytes / token     {per_tok['total'] / 1e9:.3f} GB (unembed {per_tok['parts']['unembed'] / 1e9:.3f}, "
        f"{cfg.experts_per_token} experts x {cfg.num_layers} layers "
        f"{per_tok['parts']['experts_k'] / 1e9:.3f}, attention "
        f"{per_tok['parts']['attention'] / 1e9:.3f}, router {per_tok['parts']['router'] / 1e6:.2f} MB, "
        f"KV {per_tok['kv_cache'] / 1e6:.2f} MB)"
    )
    print(f"bandwidth         {bw['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s (numpy copy, read+write)")
    print(
        f"roofline          {bound:.2f} tok/s; achieved {timed['decode_tokens_per_s']:.3f} tok/s = "
        f"{100 * report['roofline']['achieved_fraction']:.1f}% of the bound "
        f"({report['roofline']['achieved_bytes_per_s'] / 1e9:.2f} GB/s effective)"
    )
    print(
        f"RSS (VmRSS)       before load {gib(m['before load']['VmRSS'])}, after load "
        f"{gib(m['after load']['VmRSS'])}, after generate {gib(m['after generate timed']['VmRSS'])}"
    )
    print(
        f"  of it anonymous before {gib(m['before load']['RssAnon'])}, after load {gib(m['after load']['RssAnon'])}, "
        f"after generate {gib(m['after generate timed']['RssAnon'])}; file-backed after generate "
        f"{gib(m['after generate timed']['RssFile'])}"
    )
    print(
        f"peak RSS (VmHWM)  {gib(peak)} ({'<=' if peak <= 16 * GiB else '>'} 16 GiB goal; counts mapped file "
        f"pages too); sampled peaks: anonymous {gib(m['watch']['peak_rss_anon_bytes'])}, file-backed "
        f"{gib(m['watch']['peak_rss_file_bytes'])}; min MemAvailable {gib(m['watch']['min_mem_available_bytes'])}"
    )
    if "after malloc_trim" in m:
        print(
            f"  anonymous after malloc_trim(0) {gib(m['after malloc_trim']['RssAnon'])} (the rest of "
            f"{gib(m['after prefill alone']['RssAnon'])} was freed memory kept by the allocator)"
        )
    print(
        f"tokens            {timed['tokens']} (same in both runs: "
        f"{timed['tokens'] == runs['warmup']['tokens']}); logprobs in "
        f"[{timed['logprob_min']:.2f}, {timed['logprob_max']:.2f}], finite: {timed['logprobs_finite']}"
    )
    print(f"results           {json_path}")


if __name__ == "__main__":
    main()

"""The phases of scripts/bench_20b.py: a random full-size checkpoint written (or reused) on disk,
the machine's copy bandwidth, loading it, greedy generation, the bytes a decoded token reads and
the roofline they imply, and the summary. One JSON record (`Run.report`) collects them, with
/proc memory snapshots between phases and a `MemoryWatch` that aborts before the machine runs out.

    run = Run(header(...), json_path, max_anon, min_available)
    run.report.update(checkpoint(run, cfg, out, recipe, ...))      # each phase returns its entries
    ...
    run.stop_watch(); run.save(); print(summary(run.report, cfg, new_tokens))
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
import traceback

import jax
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import flops, generation, peaks, records, weights
from gptoss_jax.bench.memory import GiB, MemoryWatch, aliased_bytes, gib, mem_available, proc_status

PEAK_RSS_GOAL = 16 * GiB


def save(report: dict, path: str):
    records.write(report, path, indent=2, default=str)


def shown_path(path: str) -> str:
    """`path` as a record shows it: relative to the working directory when it lies inside it (a
    committed record carries no path of the machine that wrote it), else as given."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def header(config: str, out: str, json_path: str, recipe: dict) -> dict:
    """The record's first entries: the command, UTC date and CPU (`records.provenance`), what
    runs, where, and on which machine."""
    return {
        "provenance": records.provenance(),
        "json_path": shown_path(json_path),
        "config": config,
        "checkpoint": shown_path(out),
        "recipe": recipe,
        "memory": {},
        "machine": {
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "huge_pages": host.huge_pages_requested(),
            "backend": gj.KernelOptions().platform_for(None),  # where the plan runs this host's programs
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
    }


class Run:
    """The record of one run, the file it is saved to, and the memory watch that guards it."""

    def __init__(self, report: dict, json_path: str, max_anon: float, min_available: float, watch: bool = True):
        self.report, self.path = report, json_path
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        self.watch = MemoryWatch(report, max_anon, min_available, save=self.save)
        if watch:
            self.watch.start()

    def save(self, report: dict | None = None):
        save(self.report if report is None else report, self.path)

    def snapshot(self, label: str) -> dict:
        """/proc/self/status and MemAvailable now, kept as report["memory"][label] and printed."""
        s = proc_status()
        s["MemAvailable"] = mem_available()
        self.report["memory"][label] = s
        print(
            f"[mem] {label:>22s}: VmRSS {gib(s['VmRSS'])}  RssAnon {gib(s['RssAnon'])}  "
            f"RssFile {gib(s['RssFile'])}  VmHWM {gib(s['VmHWM'])}  MemAvailable {gib(s['MemAvailable'])}",
            flush=True,
        )
        return s

    @contextlib.contextmanager
    def phase(self, name: str, record_error: bool = False):
        """Names the phase for the watch's abort message; with `record_error`, an exception is
        kept as report["error"] (phase, repr, file:line of origin) and the record saved before
        it propagates."""
        self.watch.phase = name
        try:
            yield
        except Exception as e:
            if record_error:
                tb = traceback.extract_tb(e.__traceback__)[-1]
                self.report["error"] = {"phase": name, "error": repr(e), "where": f"{tb.filename}:{tb.lineno}"}
                self.save()
            raise

    def stop_watch(self):
        self.watch.stop()
        self.report["memory"]["watch"] = self.watch.peaks()


# ------------------------------------------------------------------------------------ phases
def shard_rows(shards, align: int) -> list[dict]:
    """Per shard: file, tensors, bytes, where its data section starts and whether that is 64B-aligned."""
    heads = {n: len(weights.shard_header(ts, align)) for n, ts in shards}
    return [
        {
            "file": n,
            "tensors": len(ts),
            "bytes": sum(weights.nbytes(s, d) for _, s, d in ts),
            "data_offset": heads[n],
            "data_offset_mod_64": heads[n] % 64,
        }
        for n, ts in shards
    ]


def checkpoint(run: Run, cfg, out: str, recipe: dict, *, shard_gb: float, align: int, rewrite: bool) -> dict:
    """Plans the tensors and shards, then reuses a complete matching folder or writes it.
    -> {"checkpoint_bytes", "shards", "write_s" (None when reused)}."""
    tensors = weights.plan_tensors(cfg)
    shards = weights.split_shards(tensors, shard_gb * 1e9)
    total = sum(weights.nbytes(s, d) for _, s, d in tensors)
    rows = shard_rows(shards, align)
    print(f"checkpoint: {len(tensors)} tensors, {total:,} B ({gib(total)}) in {len(shards)} shards -> {out}")
    for s in rows:
        print(
            f"  {s['file']}: {s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB, data at byte "
            f"{s['data_offset']} ({'64B-aligned' if s['data_offset_mod_64'] == 0 else 'not 64B-aligned'})"
        )
    ok, why = (
        (False, "--rewrite")
        if rewrite
        else weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), recipe, align)
    )
    if ok:
        print(f"reusing the complete checkpoint in {out}")
        write_s = None
    else:
        print(f"writing ({why})", flush=True)
        with run.phase("write"):
            write_s = weights.write_checkpoint(out, cfg, shards, recipe, align)
        print(f"wrote {gib(total)} in {write_s:.1f} s ({total / write_s / 1e9:.2f} GB/s)")
    return {"checkpoint_bytes": total, "shards": rows, "write_s": write_s}


def stream_bandwidth(nbytes: int, repeats: int, threads: int) -> dict:
    r = peaks.threaded_copy(nbytes, repeats, threads)
    read = peaks.read_rate(nbytes, repeats)
    return {
        "read_bytes_per_s": read,
        "array_bytes": nbytes,
        "repeats": repeats,
        "threads": threads,
        "copy_1thread_bytes_per_s": r["one"],
        f"copy_{threads}threads_bytes_per_s": r["many"],
        "bandwidth_bytes_per_s": max(r["one"], r["many"]),
        "check": r["check"],
        "convention": "copy: (bytes read + bytes written) / best time; read: bytes read by a jitted max / best time",
    }


def bandwidth(run: Run, nbytes: int) -> dict:
    """A timed numpy copy, best of 5, one thread and one per core -> {"bandwidth": ...}."""
    with run.phase("bandwidth"):
        bw = stream_bandwidth(nbytes, repeats=5, threads=os.cpu_count() or 1)
    many = bw[f"copy_{bw['threads']}threads_bytes_per_s"]
    print(
        f"stream copy bandwidth: {bw['copy_1thread_bytes_per_s'] / 1e9:.2f} GB/s (1 thread), "
        f"{many / 1e9:.2f} GB/s ({bw['threads']} threads); read only: {bw['read_bytes_per_s'] / 1e9:.2f} GB/s"
    )
    return {"bandwidth": bw}


def load(run: Run, out: str, total: int, files: list[str]) -> tuple[object, dict]:
    """`gj.load(out)` timed until every array is ready, with memory snapshots around it; `total`
    bytes on disk, `files` the shards (for the bytes the model aliases).
    -> (model, {"load_s", "parameter_bytes", "parameter_count", "aliased_bytes"})."""
    avail = mem_available()
    if avail < total + 2 * GiB:
        print(
            f"warning: MemAvailable {gib(avail)} < checkpoint {gib(total)} + 2 GiB; the run may be "
            "aborted by the memory watch",
            file=sys.stderr,
        )
    run.snapshot("before load")
    t = time.perf_counter()
    with run.phase("load", record_error=True):
        model = gj.load(out, progress=True)
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    r = {"load_s": time.perf_counter() - t}
    run.snapshot("after load")
    r["parameter_bytes"] = gj.parameter_bytes(model)
    r["parameter_count"] = gj.parameter_count(model)
    r["aliased_bytes"] = aliased_bytes(model, files)
    print(
        f"loaded in {r['load_s']:.1f} s: {r['parameter_count']:,} parameters, "
        f"{r['parameter_bytes']:,} B ({gib(r['parameter_bytes'])}) as stored; "
        f"{gib(r['aliased_bytes'])} of it zero-copy views of the checkpoint files"
    )
    return model, r


def decode_timing(timed: dict, prefill_times: list[float], new_tokens: int) -> dict:
    """The timed generate run plus prefill (the fastest prefill alone). The decode rate is taken
    from the tokens' arrivals when each came on its own (one step per block): (new - 1) / (last -
    first arrival); otherwise decode = wall - prefill and tokens/s = new tokens / that."""
    timed = dict(timed)
    timed["prefill_s"] = min(prefill_times)
    timed["prefill_runs_s"] = prefill_times
    timed["wall_minus_prefill_s"] = timed["wall_s"] - timed["prefill_s"]
    arrivals = timed.get("arrival_s") or []
    if new_tokens > 1 and len(arrivals) == new_tokens and len(set(arrivals)) == new_tokens:
        timed["decode_s"] = arrivals[-1] - arrivals[0]
        timed["decode_tokens_per_s"] = (new_tokens - 1) / timed["decode_s"]
        timed["decode_method"] = "arrivals: (new - 1) / (last - first token's arrival)"
    else:
        timed["decode_s"] = timed["wall_minus_prefill_s"]
        timed["decode_tokens_per_s"] = new_tokens / timed["decode_s"]
        timed["decode_method"] = "new tokens / (generate wall - prefill alone)"
    timed["ms_per_token"] = 1e3 / timed["decode_tokens_per_s"]
    return timed


def generate(run: Run, model, prompt, new_tokens: int, block: int | None, prefill_repeats: int) -> dict:
    """Two identical greedy generate calls (the first compiles), then the prefill alone, then
    malloc_trim(0) to see how much anonymous memory is freed memory kept by glibc.
    -> {"warmup": run, "timed": run with the decode timing}."""
    runs = {}
    for label in ("warmup", "timed"):
        print(
            f"generate [{label}{' (compiles prefill + decode)' if label == 'warmup' else ''}]: prompt "
            f"{len(prompt)} tokens, {new_tokens} new tokens ...",
            flush=True,
        )
        with run.phase(f"generate {label}", record_error=True):
            runs[label] = r = generation.run_generate(model, prompt, new_tokens, block)
        print(f"  wall {r['wall_s']:.2f} s, tokens {r['tokens']}, logprobs finite: {r['logprobs_finite']}", flush=True)
        run.snapshot(f"after generate {label}")
    with run.phase("prefill alone"):
        prefill_times = generation.time_prefill(model, prompt, new_tokens, repeats=prefill_repeats)
    print(f"prefill alone: {', '.join(f'{t:.2f} s' for t in prefill_times)}", flush=True)
    run.snapshot("after prefill alone")
    # Done last, so it changes none of the figures above.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        run.snapshot("after malloc_trim")
    except OSError:
        pass
    runs["timed"] = decode_timing(runs["timed"], prefill_times, new_tokens)
    return runs


def roofline(bandwidth_bytes_per_s: float, bytes_per_token: float, tokens_per_s: float, read_bytes_per_s=None) -> dict:
    """The decode bound at the copy rate (the issue's convention) and, given the read-only rate,
    the bound at that rate too (a decode step only reads its weights)."""
    bound = bandwidth_bytes_per_s / bytes_per_token
    out = {
        "bandwidth_bytes_per_s": bandwidth_bytes_per_s,
        "bound_tokens_per_s": bound,
        "achieved_tokens_per_s": tokens_per_s,
        "achieved_fraction": tokens_per_s / bound,
        "achieved_bytes_per_s": tokens_per_s * bytes_per_token,
    }
    if read_bytes_per_s:
        out["read_bytes_per_s"] = read_bytes_per_s
        out["read_bound_tokens_per_s"] = read_bytes_per_s / bytes_per_token
        out["achieved_fraction_of_read_bound"] = tokens_per_s * bytes_per_token / read_bytes_per_s
    return out


def decode_roofline(model, total_len: int, report: dict) -> dict:
    """Bytes a decoded token reads (the model's own arrays, KV cache of `total_len`) and the
    bandwidth bound they set -> {"decode_bytes_per_token", "roofline"}."""
    per_tok = flops.decode_bytes_per_token(model, total_len)
    bw = report["bandwidth"]["bandwidth_bytes_per_s"]
    rate = report["generate"]["timed"]["decode_tokens_per_s"]
    read = report["bandwidth"].get("read_bytes_per_s")
    return {"decode_bytes_per_token": per_tok, "roofline": roofline(bw, per_tok["total"], rate, read)}


def peak_rss(report: dict) -> dict:
    """VmHWM after the prefill alone (the last figure before malloc_trim) against the 16 GiB goal."""
    peak = report["memory"]["after prefill alone"]["VmHWM"]
    return {"peak_rss_bytes": peak, "peak_rss_goal_met": peak <= PEAK_RSS_GOAL}


def summary(report: dict, cfg, new_tokens: int) -> str:
    """The closing printout of a complete run's record."""
    m, runs = report["memory"], report["generate"]
    timed, per_tok, roof = runs["timed"], report["decode_bytes_per_token"], report["roofline"]
    bw, peak, prompt_len = report["bandwidth"], report["peak_rss_bytes"], len(report["prompt"])
    parts = per_tok["parts"]
    lines = [
        "\n================ gpt-oss-20b (random weights) on this machine ================",
        f"checkpoint        {report['checkpoint_bytes']:,} B in {len(report['shards'])} shards"
        + (f", written in {report['write_s']:.0f} s" if report["write_s"] else " (reused)"),
        f"packed model      {report['parameter_bytes']:,} B ({gib(report['parameter_bytes'])}), "
        f"{report['parameter_count'] / 1e9:.2f}e9 parameters",
        f"load              {report['load_s']:.1f} s ({gib(report['aliased_bytes'])} zero-copy from the files)",
        f"prefill           {timed['prefill_s']:.2f} s for {prompt_len} tokens "
        f"({prompt_len / timed['prefill_s']:.1f} tok/s; runs "
        f"{', '.join(f'{t:.2f}' for t in timed['prefill_runs_s'])} s)",
        f"decode            {timed['decode_tokens_per_s']:.3f} tok/s = {new_tokens} tokens in "
        f"{timed['decode_s']:.2f} s ({timed['ms_per_token']:.0f} ms/token; {timed['decode_method']}; generate "
        f"wall {timed['wall_s']:.2f} s - prefill {timed['prefill_s']:.2f} s = {timed['wall_minus_prefill_s']:.2f} s)",
        f"compile+1st run   {runs['warmup']['wall_s']:.1f} s (warm-up generate) vs {timed['wall_s']:.1f} s timed",
        f"bytes / token     {per_tok['total'] / 1e9:.3f} GB (unembed {parts['unembed'] / 1e9:.3f}, "
        f"{cfg.experts_per_token} experts x {cfg.num_layers} layers {parts['experts_k'] / 1e9:.3f}, attention "
        f"{parts['attention'] / 1e9:.3f}, router {parts['router'] / 1e6:.2f} MB, "
        f"KV {per_tok['kv_cache'] / 1e6:.2f} MB)",
        f"bandwidth         {bw['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s (numpy copy, read+write)",
        f"roofline          {roof['bound_tokens_per_s']:.2f} tok/s; achieved "
        f"{timed['decode_tokens_per_s']:.3f} tok/s = {100 * roof['achieved_fraction']:.1f}% of the bound "
        f"({roof['achieved_bytes_per_s'] / 1e9:.2f} GB/s effective)"
        + (
            f"; read-only bound {roof['read_bound_tokens_per_s']:.2f} tok/s "
            f"({roof['read_bytes_per_s'] / 1e9:.2f} GB/s read): {100 * roof['achieved_fraction_of_read_bound']:.1f}%"
            if "read_bytes_per_s" in roof
            else ""
        ),
        f"RSS (VmRSS)       before load {gib(m['before load']['VmRSS'])}, after load "
        f"{gib(m['after load']['VmRSS'])}, after generate {gib(m['after generate timed']['VmRSS'])}",
        f"  of it anonymous before {gib(m['before load']['RssAnon'])}, after load {gib(m['after load']['RssAnon'])}, "
        f"after generate {gib(m['after generate timed']['RssAnon'])}; file-backed after generate "
        f"{gib(m['after generate timed']['RssFile'])}",
        f"peak RSS (VmHWM)  {gib(peak)} ({'<=' if peak <= PEAK_RSS_GOAL else '>'} 16 GiB goal; counts mapped file "
        f"pages too); sampled peaks: anonymous {gib(m['watch']['peak_rss_anon_bytes'])}, file-backed "
        f"{gib(m['watch']['peak_rss_file_bytes'])}; min MemAvailable {gib(m['watch']['min_mem_available_bytes'])}",
    ]
    if "after malloc_trim" in m:
        lines.append(
            f"  anonymous after malloc_trim(0) {gib(m['after malloc_trim']['RssAnon'])} (the rest of "
            f"{gib(m['after prefill alone']['RssAnon'])} was freed memory kept by the allocator)"
        )
    lines += [
        f"tokens            {timed['tokens']} (same in both runs: "
        f"{timed['tokens'] == runs['warmup']['tokens']}); logprobs in "
        f"[{timed['logprob_min']:.2f}, {timed['logprob_max']:.2f}], finite: {timed['logprobs_finite']}",
        f"results           {report['json_path']}",
    ]
    return "\n".join(lines)

"""
    .venv/bin/python scripts/bench.py                                  # full run, ~30 min
    .venv/bin/python scripts/bench.py --quick                          # bounds + the versus table, ~5 min
    .venv/bin/python scripts/bench.py --only prefill,decode --json runs/bench.json
    .venv/bin/python scripts/bench.py [--repeats 3] [--cap 90] [--budget 40] [--torch-threads N]
                                      [--scaling-dtypes float32,bfloat16]

Throughput of `gptoss_jax` against HF transformers and OpenAI's reference on the same random
weights of the named small config BENCH (= BENCH_CONFIG of scripts/bench_train.py), on CPU, each
figure beside a bound measured on this machine (needs the test extras: `make setup-test`). Run it
on a quiet machine: other processes on the 2 cores distort every figure, torch's most (with a
busy core, HF decode with 2 OpenMP threads ran ~10x slower than with `--torch-threads 1`).

Every run writes its JSON record (the command, UTC date, CPU model, ISA flags and cores, and
every figure) under experiments/: `experiments/<UTC date>-bench/bench.json` (`bench-quick.json`
with --quick), or the path given with --json; the tables of experiments/BENCHMARKS.md are
generated from committed records by scripts/figures.py. The first line printed names the CPU.

Sections (`--only`, comma-separated; default all, in this order; --quick: bounds,versus):

  bounds   peak matmul FLOP/s (fp32, bf16): a jitted `jnp.dot` of square matrices (and, for
           comparison, `torch.mm`), median of repeats; the bound used below is the larger of the
           two medians. Stream bandwidth: a large array copy / add (numpy, torch, jax), bytes
           read + written per second, median of repeats; the bound is the best of them.
  versus   the head-to-head table: ours against HF transformers, fp32 with fp32 and bf16 with bf16,
           interleaved in one process, warm-up excluded, median of --repeats: prefill T = 512,
           2048, 8192; greedy decode at batch 1 and 8 (64 new tokens after 32); the 4 x 512 fp32
           training step (`gptoss_jax/bench/versus.py`).
  prefill  tokens/s of one forward over T tokens, batch 1, full logits (every position, as HF
           and the reference compute them; compile excluded), T = 512, 2048, 8192. Ours: fp32 and
           bf16, dense experts (and MXFP4 up to T = 2048); HF eager fp32; OpenAI reference fp32.
  decode   tokens/s of greedy decoding, batch 1 and 8, 256 new tokens after a 32-token prompt:
           rate = batch * (new - 1) / (t(new) - t(1)) (bench_generate.py's method; prefill and
           first token excluded): one t(new) per repeat, minus the best of the t(1) timings.
           Ours: fp32/bf16 x dense/MXFP4 via `gj.generate`; HF `generate(do_sample=False)` with
           its cache; OpenAI's reference has no KV cache (it re-runs the sequence per token).
  train    tokens/s of a full fine-tuning step (forward, loss on every next token, backward,
           clip 1.0, AdamW) in fp32, batch 4 x 512, 2 steps per repeat (scripts/bench_train.py's
           step, ours vs HF + torch autograd); the first-step losses are printed side by side.
  scaling  prefill time of ONE layer (a 1-layer model: sliding, then full; fp32, XLA path,
           logits of the last token only so the unembedding is negligible) at T = 2048, 4096 ..
           32768 (and 131072 for the sliding layer), the time ratio per doubling of T and the
           least-squares exponent of time ~ T^p.
  --quick  bounds on smaller arrays and the versus table (every row, 2 repeats); asked for with
           --only, the other sections run T <= 2048, fewer variants (ours fp32 dense + bf16 MXFP4
           in prefill, fp32 dense in decode), 32 new tokens, a 1 x 256 training batch; cap 10 s.

Ours runs its default kernel choices on CPU: XLA attention (chunked O(T*W) for sliding layers,
causal query chunks for full ones) and the chunked MoE (the gather MoE for decode-sized steps).

Weights: `gj.init(gj.tiny(**BENCH), seed=0, experts="mxfp4")` is written once in the HF hub
layout (bf16 floats, MXFP4 experts). Every implementation reads those same values: ours via
`gj.load(dtype=fp32|bf16, experts=dense|mxfp4)`; HF `GptOssForCausalLM` (eager attention, fp32)
from a dense fp32 re-save of our fp32 dense model; OpenAI's `gpt_oss.torch.model.Transformer`
(then `.float()`) from an `original/` layout converted from the hub files. A logits check at the
start of `prefill` shows they agree.

Bounds (the ideal of each machine limit, printed as achieved / bound %):
  compute (prefill, train): FLOPs per token / peak FLOP/s of the run's dtype, with FLOPs per
    token (2 per multiply-add) = per layer [qkv 2D(N+2K)H + out 2NHD + router 2DE
    + k active experts k(2D*2F + 2FD)] + attention 4NH * (mean keys a query may see:
    (T+1)/2 causal, mean min(t, W) sliding) + unembedding 2DV (per token for full logits,
    2DV/T for the last token only); training = 3x the forward. Norms, RoPE, softmax, SwiGLU
    and the optimizer are not counted; neither are masked-out scores an implementation computes
    anyway (ours: (n + 1) / 2n of a T x T on full layers, in n <= 16 query chunks, and 2W keys
    per query on sliding ones; HF and the reference: a full T x T on every layer).
  memory (decode): bytes a decode step must read / bandwidth: every non-expert weight (attention,
    router, norms, the unembedding, the batch's embedding rows) + min(E, batch*k) experts per
    layer (k of E at batch 1; the union, estimated as min(E, 8k), at batch 8) in the stored
    format (fp32/bf16 dense or MXFP4 blocks + scales) + the K/V cache the step attends to (the
    mean context over the decode, capped at W on sliding layers); bound = batch * bandwidth /
    bytes per step tokens/s.

Time limits: a case whose predicted single run exceeds `--cap` seconds, or whose predicted memory
(XLA's buffer assignment for ours; a formula for the torch peers) exceeds what is free, prints
"skipped (reason)". Repeats are cut (to no fewer than 2) when they would exceed `--budget` seconds,
and a warm-up longer than the cap is reported as the single sample; each row says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import traceback

import jax

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import peaks, peers, records
from gptoss_jax.bench.memory import mem_available
from gptoss_jax.bench.suite import SECTIONS, Suite

GiB = 2**30
T0 = time.perf_counter()


def log(msg=""):
    print(msg, flush=True)


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small repeats, T up to 2048, no 131k (~2-3 min)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument(
        "--json",
        default=None,
        help="the JSON record (command, UTC date, CPU, every figure); default experiments/<date>-bench/bench.json",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3, quick 2)")
    ap.add_argument(
        "--cap",
        type=float,
        default=None,
        help="skip a case whose predicted single run exceeds this many seconds (default 90, quick 10)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed runs per case before repeats are cut (to >= 2) (default 40, quick 6)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for HF and the reference (default: torch's own, one per core)",
    )
    ap.add_argument("--scaling-dtypes", default="float32", help="dtypes of the scaling section, e.g. float32,bfloat16")
    args = ap.parse_args()
    args.only = args.only or ("bounds,versus" if args.quick else ",".join(SECTIONS))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.json is None:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        args.json = os.path.join("experiments", f"{day}-bench", "bench-quick.json" if args.quick else "bench.json")
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.cap = args.cap or (10.0 if args.quick else 90.0)
    args.budget = args.budget or (6.0 if args.quick else 40.0)
    args.scaling_dtypes = [d.strip() for d in args.scaling_dtypes.split(",")]

    torch = peers.require_torch()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    results = {}
    suite = Suite(args, peers.Models(gj.tiny(**peers.BENCH_CONFIG)), results, log)
    suite.t0 = T0
    results.update(
        provenance=records.provenance(),
        config=peers.BENCH_CONFIG,
        args=vars(args),
        env={
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "jax_backend": jax.default_backend(),
            "huge_pages": host.huge_pages_requested(),
        },
    )
    cpu = records.provenance()["cpu"]
    log(f"CPU: {cpu['model']}, {cpu['cores']} cores usable; ISA: {', '.join(cpu['isa']) or 'none of those listed'}")
    log(f"record: {args.json}")
    log(f"config: {peers.BENCH_CONFIG}")
    log(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
        f"{mem_available(default=8 * GiB) / GiB:.1f} GiB free, malloc huge pages "
        f"{'on' if host.huge_pages_requested() else 'off'}; sections {','.join(only)}{' (quick)' if args.quick else ''}"
    )
    if "bounds" in only:
        log(f"\n== bounds: machine peaks {suite.elapsed()}")
        results["bounds"] = peaks.bounds(args.quick, log)
    else:
        log(f"\n== bounds not selected: measuring them quickly for the % columns {suite.elapsed()}")
        results["bounds"] = peaks.bounds(True, lambda *a: None)
        pk = suite.peaks
        log(
            f"  fp32 {pk['float32'] / 1e9:.1f} GFLOP/s, bf16 {pk['bfloat16'] / 1e9:.1f} GFLOP/s, "
            f"{pk['bandwidth'] / 1e9:.2f} GB/s"
        )
    suite.save()
    for sec in SECTIONS[1:]:
        if sec not in only:
            continue
        try:
            getattr(suite, sec)()
        except Exception:  # noqa: BLE001  a failing section must not lose the others
            log(f"  section {sec} failed:\n{traceback.format_exc()}")
            results.setdefault("errors", {})[sec] = traceback.format_exc()
        suite.save()
    results["wall_seconds"] = time.perf_counter() - suite.t0
    suite.save()
    log(
        f"\ndone in {time.perf_counter() - suite.t0:.0f} s" + (f"; figures written to {args.json}" if args.json else "")
    )


if __name__ == "__main__":
    main()

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
   prefill = the faster of those. Decoding runs one step per jitted call (`--block`, default 1)
   so each token reaches the host as it is made: decode tokens/s = (N - 1) / (arrival of the
   last token - arrival of the first), the prefill that makes the first token excluded. (With
   `--block` > 1, tokens arrive a block at a time and decode time = timed generate wall - prefill,
   decode tokens/s = N / that.) logprobs=True returns each chosen token's log-probability under the
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
import os

import numpy as np

import gptoss_jax as gj
from gptoss_jax import host
from gptoss_jax.bench import full_size, weights
from gptoss_jax.bench.memory import GiB


def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--out", default="runs/gpt-oss-20b-random", help="checkpoint folder")
    add("--rewrite", action="store_true", help="write the weights even if a complete set exists")
    add("--write-only", action="store_true", help="stop after writing the checkpoint")
    add("--new-tokens", type=int, default=16, help="greedy tokens to decode")
    add("--block", type=int, default=1, help="decode steps per jitted call (generate's `block`)")
    add("--prompt-len", type=int, default=16, help="random prompt length")
    add("--prefill-repeats", type=int, default=2, help="timings of the prefill alone (best taken)")
    add("--json", default=None, help="result file (default OUT/bench_20b.json)")
    add("--seed", type=int, default=0)
    add("--std", type=float, default=0.02, help="std of bf16 matrices and biases")
    scales_help = "MXFP4 E8M0 scale bytes drawn uniformly in [LO, HI]"
    add("--scales", type=int, nargs=2, default=(118, 122), metavar=("LO", "HI"), help=scales_help)
    add("--shard-gb", type=float, default=4.0, help="largest shard size, 1e9 bytes")
    align_help = (
        "data section alignment: 64 (default) makes every tensor 64-byte aligned, so the loader's memory maps "
        "are zero-copy; 8 pads as the safetensors library does"
    )
    add("--align", type=int, default=64, choices=(8, 64), help=align_help)
    add("--bandwidth-gib", type=float, default=1.0, help="array size of the copy benchmark")
    add("--max-anon-gib", type=float, default=19.0, help="abort above this anonymous RSS")
    add("--min-available-gib", type=float, default=1.0, help="abort below this MemAvailable")
    add("--tiny", action="store_true", help="gj.tiny() instead of 20b (smoke test)")
    args = ap.parse_args()
    if args.new_tokens < 1:
        ap.error("--new-tokens must be >= 1")
    if not 0 <= args.scales[0] <= args.scales[1] <= 254:
        ap.error("--scales needs 0 <= LO <= HI <= 254")

    out = os.path.abspath(args.out)
    json_path = os.path.abspath(args.json or os.path.join(out, "bench_20b.json"))
    cfg = gj.tiny() if args.tiny else gj.gpt_oss_20b()
    recipe = weights.recipe(args.seed, args.std, args.scales, args.align)
    report = full_size.header("tiny" if args.tiny else "gpt-oss-20b", out, json_path, recipe)
    run = full_size.Run(report, json_path, args.max_anon_gib * GiB, args.min_available_gib * GiB)
    run.snapshot("start")
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")

    report.update(
        full_size.checkpoint(run, cfg, out, recipe, shard_gb=args.shard_gb, align=args.align, rewrite=args.rewrite)
    )
    run.snapshot("after write")
    if args.write_only:
        run.stop_watch()
        run.save()
        print(f"results: {json_path}")
        return
    report.update(full_size.bandwidth(run, int(args.bandwidth_gib * GiB)))
    files = [os.path.join(out, s["file"]) for s in report["shards"]]
    model, loaded = full_size.load(run, out, report["checkpoint_bytes"], files)
    report.update(loaded)
    report["prompt"] = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    report["generate"] = full_size.generate(
        run, model, report["prompt"], args.new_tokens, args.block, args.prefill_repeats
    )
    report.update(full_size.decode_roofline(model, args.prompt_len + args.new_tokens, report))
    run.stop_watch()
    report.update(full_size.peak_rss(report))
    run.save()
    print(full_size.summary(report, cfg, args.new_tokens))


if __name__ == "__main__":
    main()

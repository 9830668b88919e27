"""gpt-oss-20b (random weights, HF MXFP4 layout) on this CPU: ours against llama.cpp (issue 25).

    python experiments/2026-12-06-llamacpp/run.py --gguf runs/gpt-oss-20b-random.gguf \
        [--checkpoint runs/gpt-oss-20b-random] [--prompt-len 512] [--new-tokens 16] [--out DIR]

Steps, each recorded in `llamacpp.json` beside this file:
1. ours: `scripts/bench_20b.py --prompt-len P --new-tokens N` on the checkpoint (its own record,
   `ours_20b.json`: load, prefill of the P-token prompt, greedy decode, the stream bandwidth it
   measured and the bytes a decode step must read);
2. llama.cpp through `llama-cpp-python` (the version installed; the build time is passed in with
   --build-seconds), on the GGUF that llama.cpp's own `convert_hf_to_gguf.py` wrote from the same
   checkpoint (MXFP4 experts kept, other weights bf16): prefill of the same P tokens (`eval`), then
   N greedy tokens one `eval` each after them, the first step excluded from the rate;
3. both rates beside the bandwidth bound of step 1 (bytes per decode step / stream bandwidth).
Run on a quiet machine; the two never run at the same time (each needs ~14 GB).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def llama(gguf: str, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=len(prompt) + new_tokens + 16, n_batch=512, n_threads=threads, verbose=False
    )
    load = time.perf_counter() - t
    out = {"version": llama_cpp.__version__, "load_seconds": load, "threads": threads}
    import numpy as np

    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    out["prefill_seconds"] = time.perf_counter() - t
    out["prefill_tokens_per_second"] = len(prompt) / out["prefill_seconds"]

    # greedy decoding after the whole prompt, one token per eval, as ours decodes after it
    def greedy() -> int:  # the last position's logits (eval keeps them only with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    stamps, tok = [], greedy()
    for _ in range(new_tokens):
        llm.eval([tok])
        tok = greedy()
        stamps.append(time.perf_counter())
    out["decode_tokens"] = len(stamps)
    out["decode_tokens_per_second"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return out


# How the first record's build and conversion times were taken (records before --build-note)
FIRST_BUILD_NOTE = "both while the other and the checkpoint writer ran"


def table(record: dict, ours: dict) -> str:
    """Both stacks beside the decode bound, from the two records."""
    ll, gen = record["llama_cpp"], ours["generate"]["timed"]
    bound = ours["roofline"]["bound_tokens_per_s"]
    read_bound = ours["roofline"].get("read_bound_tokens_per_s")  # records from before it lack it
    ours_prefill = len(ours["prompt"]) / gen["prefill_s"]
    gen = {**gen, "decode_tok_s": gen["decode_tokens_per_s"], "new_tokens": ll["decode_tokens"]}
    rows = [
        ("ours (`gptoss_jax`, bf16 + packed MXFP4 experts)", ours_prefill, gen["decode_tok_s"]),
        (f"llama.cpp (llama-cpp-python {ll['version']}, GGUF bf16 + MXFP4)", ll["prefill_tokens_per_second"],
         ll["decode_tokens_per_second"]),
    ]  # fmt: skip
    lines = [
        f"Run {record['provenance']['date_utc']}, {record['provenance']['cpu']['model']}, "
        f"{record['provenance']['cpu']['cores']} cores; prompt {len(ours['prompt'])} random tokens, "
        f"{gen['new_tokens']} greedy tokens after it. Decode bound: "
        f"{ours['decode_bytes_per_token']['total'] / 1e9:.3f} GB per step / "
        f"{ours['roofline']['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s stream = {bound:.2f} tok/s.",
        "",
        "| stack | prefill tok/s | decode tok/s | decode / bound |"
        + (" decode / read-only bound |" if read_bound else ""),
        "|---|---|---|---|" + ("---|" if read_bound else ""),
    ]
    for name, p, d in rows:
        lines.append(
            f"| {name} | {p:.2f} | {d:.3f} | {100 * d / bound:.1f}% |"
            + (f" {100 * d / read_bound:.1f}% |" if read_bound else "")
        )
    if read_bound:
        lines += [
            "",
            f"Read-only bound: {ours['decode_bytes_per_token']['total'] / 1e9:.3f} GB per step / "
            f"{ours['roofline']['read_bytes_per_s'] / 1e9:.2f} GB/s read by a jitted max = {read_bound:.2f} tok/s "
            "(a decode step only reads its weights).",
        ]
    lines += [
        "",
        f"ours / llama.cpp: prefill {ours_prefill / ll['prefill_tokens_per_second']:.2f}x, decode "
        f"{gen['decode_tok_s'] / ll['decode_tokens_per_second']:.2f}x. "
        + (
            f"llama-cpp-python built from source by pip in {record['build_seconds']:.0f} s, convert_hf_to_gguf.py "
            f"{record['convert_seconds']:.0f} s ({record.get('build_note', FIRST_BUILD_NOTE)}); "
            if record.get("build_seconds") is not None and record.get("convert_seconds") is not None
            else "Build and conversion times: not given to this run (measured once, in the first record). "
        )
        + f"GGUF {record['gguf_bytes'] / 1e9:.2f} GB.",
        "",
        "Bytes a decode step must read (ours): "
        + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in ours["decode_bytes_per_token"]["parts"].items())
        + f", KV cache {ours['decode_bytes_per_token']['kv_cache'] / 1e9:.3f} GB; ours achieved "
        f"{ours['roofline']['achieved_bytes_per_s'] / 1e9:.2f} GB/s of them.",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--checkpoint", default="runs/gpt-oss-20b-random")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--build-seconds", type=float, help="llama-cpp-python's pip build time, as measured")
    ap.add_argument("--convert-seconds", type=float, help="convert_hf_to_gguf.py's time, as measured")
    ap.add_argument("--build-note", default=FIRST_BUILD_NOTE, help="what else ran during the build and conversion")
    ap.add_argument("--skip-ours", action="store_true", help="reuse ours_20b.json")
    ap.add_argument("--table", action="store_true", help="only render table.md from the two records")
    ap.add_argument("--out", default=HERE, help="folder of the records and table.md (default: beside this script)")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.table:
        with open(os.path.join(out, "llamacpp.json")) as f, open(os.path.join(out, "ours_20b.json")) as g:
            text = table(json.load(f), json.load(g))
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(text)
        return
    from gptoss_jax.bench import records

    ours_json = os.path.join(out, "ours_20b.json")
    if not args.skip_ours:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "scripts", "bench_20b.py"),
            "--out",
            args.checkpoint,
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.new_tokens),
            "--prefill-repeats",
            "1",
            "--json",
            os.path.relpath(ours_json),
        ]
        print("== ours: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(ours_json) as f:
        ours = json.load(f)
    prompt = ours["prompt"]
    print("== llama.cpp", flush=True)
    ll = llama(args.gguf, prompt, args.new_tokens, os.cpu_count())
    record = {
        "provenance": records.provenance(),
        "gguf": os.path.relpath(os.path.abspath(args.gguf), ROOT),
        "gguf_bytes": os.path.getsize(args.gguf),
        "build_seconds": args.build_seconds,
        "convert_seconds": args.convert_seconds,
        "build_note": args.build_note,
        "llama_cpp": ll,
        "ours_record": os.path.relpath(ours_json, ROOT),
    }
    records.write(record, os.path.join(out, "llamacpp.json"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table(record, ours))
    print(json.dumps(ll, indent=1))


if __name__ == "__main__":
    main()

"""The head-to-head table of scripts/bench.py (section `versus`): ours against HF transformers on
the same weights, fp32 against fp32 and bf16 against bf16, the two interleaved in one process.

Rows: prefill of T = 512, 2048, 8192 tokens (batch 1, full logits); greedy decoding at batch 1
and 8 (64 new tokens after a 32-token prompt); one fine-tuning step on 4 x 512 tokens (fp32: HF
trains in fp32). Ours runs dense experts with its default plan; HF eager attention.

Each row takes `repeats` rounds; in each, every side runs twice back to back, the second run
timed (the first compiles ours in round one and absorbs the other stack's leftovers), and the
order of the sides alternates between rounds, so that a slow stretch of the machine falls on
both; the figure is the median (min and max kept). Decode rate = B * (new - 1) / (t(new) - t(1)),
the t(1) being the best of the run's one-token calls (prefill and first token excluded). Each
row also gives ours and HF as a share of the bound of its kind (`bench.flops`): the FLOP bound
for prefill and training, the bytes bound for decoding (bytes a step reads / the stream rate, a
copy's bytes read + written); decode rows also against the rate this machine reads alone (a
jitted max), the ceiling of a step that only reads its weights.
"""

from __future__ import annotations

import statistics

import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax.bench import peers, timing
from gptoss_jax.bench.flops import decode_bytes_per_step, forward_flops_per_token

PREFILL_T = (512, 2048, 8192)
DECODE_B = (1, 8)
PROMPT, NEW = 32, 64
TRAIN_B, TRAIN_T = 4, 512
DTYPES = ("float32", "bfloat16")


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: [seconds, ...]}: `repeats` rounds, each calling every side twice in a row (the first
    untimed, the second timed), the order of the sides reversed every other round. The untimed
    call absorbs what the other stack left behind: ours' training step right after an HF step ran
    at about half its rate even after 2 s of sleep, its next step at the full rate (the heap and
    page state the other stack left, not its threads)."""
    out = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            timing.once(fns[name])
            out[name].append(timing.once(fns[name]))
    return out


def row_record(kind: str, key: dict, rates: dict, bound: float, unit_work: float, read_bound=None) -> dict:
    """One table row: each side's tokens/s stats, ours / HF of the medians, % of the bound (and of
    `read_bound`, tokens/s at the read-only rate, where given)."""
    rec = {"row": kind, **key, "bound_tokens_per_s": bound, "work_per_token": unit_work}
    if read_bound:
        rec["read_bound_tokens_per_s"] = read_bound
    for side, rs in rates.items():
        st = timing.stats(rs)
        rec[side] = {"tokens_per_s": st, "pct_of_bound": 100 * st["median"] / bound}
        if read_bound:
            rec[side]["pct_of_read_bound"] = 100 * st["median"] / read_bound
    rec["ratio"] = rec["ours"]["tokens_per_s"]["median"] / rec["hf"]["tokens_per_s"]["median"]
    return rec


def line(rec: dict) -> str:
    key = " ".join(f"{k}={rec[k]}" for k in ("T", "batch") if k in rec)
    o, h = rec["ours"], rec["hf"]
    return (
        f"  {rec['row']:8s} {rec['dtype']:8s} {key:10s} ours {o['tokens_per_s']['median']:9.1f} "
        f"[{o['tokens_per_s']['min']:.1f}-{o['tokens_per_s']['max']:.1f}]  HF {h['tokens_per_s']['median']:9.1f} "
        f"[{h['tokens_per_s']['min']:.1f}-{h['tokens_per_s']['max']:.1f}] tok/s  ours/HF {rec['ratio']:5.2f}x  "
        f"bound {rec['bound_tokens_per_s']:8.0f}: ours {o['pct_of_bound']:5.1f}%, HF {h['pct_of_bound']:5.1f}%"
        + (
            f"  (read-only bound {rec['read_bound_tokens_per_s']:.0f}: ours {o['pct_of_read_bound']:.1f}%)"
            if "read_bound_tokens_per_s" in rec
            else ""
        )
    )


def run(models: peers.Models, peaks: dict, repeats: int, log=print, save=lambda: None, into=None) -> list[dict]:
    """Every row, appended to `into` (a list in the run's record, saved after each row)."""
    torch = peers.require_torch()
    cfg = models.cfg
    rows = [] if into is None else into

    def add(rec):
        rows.append(rec)
        log(line(rec))
        save()

    for dtype in DTYPES:
        hf = models.hf(dtype=dtype)
        ours = models.ours(dtype, "dense")
        for T in PREFILL_T:
            tokens = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T))
            fwd, _, _ = peers.compile_forward(ours, 1, T)
            jtok, ids = jnp.asarray(tokens, jnp.int32), torch.tensor(tokens)

            def hf_prefill(ids=ids, hf=hf):
                with torch.no_grad():
                    return hf(input_ids=ids, use_cache=False).logits

            secs = interleaved({"ours": lambda jtok=jtok, fwd=fwd: fwd(jtok), "hf": hf_prefill}, repeats)
            flops = forward_flops_per_token(cfg, T)
            rates = {k: [T / s for s in v] for k, v in secs.items()}
            add(row_record("prefill", {"dtype": dtype, "T": T}, rates, peaks[dtype] / flops, flops))
        for B in DECODE_B:
            prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, PROMPT))

            def ours_gen(k, prompts=prompts):
                return lambda: gj.generate(
                    ours, None, prompts.tolist(), max_new_tokens=k, temperature=0, stop_tokens=(), prefill_chunk=PROMPT
                )

            fns = {
                "ours": ours_gen(NEW),
                "hf": peers.hf_greedy_generate(hf, prompts, NEW),
                "ours_1": ours_gen(1),
                "hf_1": peers.hf_greedy_generate(hf, prompts, 1),
            }
            secs = interleaved(fns, repeats)
            w = 4 if dtype == "float32" else 2
            byt = decode_bytes_per_step(
                cfg, batch=B, prompt=PROMPT, new=NEW, weight_bytes=w, experts="dense", cache_bytes=w
            )
            rates = {k: [B * (NEW - 1) / (s - min(secs[k + "_1"])) for s in secs[k]] for k in ("ours", "hf")}
            read = B * peaks["read"] / byt if peaks.get("read") else None
            add(row_record("decode", {"dtype": dtype, "batch": B}, rates, B * peaks["bandwidth"] / byt, byt, read))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (TRAIN_B, TRAIN_T)).astype(np.int32)
    ours_step, hf_step = peers.training_steps(
        models.ours("float32", "dense"), models.hf(train=True, dtype="float32"), tokens
    )
    secs = interleaved({"ours": ours_step, "hf": hf_step}, repeats)
    flops = 3 * forward_flops_per_token(cfg, TRAIN_T)
    rates = {k: [TRAIN_B * TRAIN_T / s for s in v] for k, v in secs.items()}
    key = {"dtype": "float32", "T": TRAIN_T, "batch": TRAIN_B}
    add(row_record("train", key, rates, peaks["float32"] / flops, flops))
    behind = [r for r in rows if r["ratio"] < 1]
    log(
        f"  ours ahead of HF on {len(rows) - len(behind)} of {len(rows)} rows"
        + (f"; behind on: {', '.join(describe(r) for r in behind)}" if behind else "")
        + f" (median ratio {statistics.median(r['ratio'] for r in rows):.2f}x)"
    )
    return rows


def describe(rec: dict) -> str:
    key = f"T={rec['T']}" if rec["row"] == "prefill" else (f"B={rec['batch']}" if rec["row"] == "decode" else "")
    return f"{rec['row']} {key} {rec['dtype']} ({rec['ratio']:.2f}x)".replace("  ", " ")

"""The rows of scripts/bench.py: ours against HF transformers and OpenAI's reference on the same
weights (`peers.Models`), on CPU, each figure beside the bound of this machine (`peaks.bounds`)
that the FLOP and byte models (`flops`) give. A `Suite` runs the sections (`prefill`, `decode`,
`train`, `scaling`), prints one line per row and keeps every row in `results`, written to the
JSON record after each section.

A row's record: {"section", "impl", its keys (T, batch), "tokens_per_s": {median, min, max, n},
"seconds", "ratio_to_hf", "bound_tokens_per_s", "pct_of_bound", ...}, or {"skipped": why}.
"""

from __future__ import annotations

import statistics
import time

import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax import attention
from gptoss_jax.bench import peers, records, timing, versus
from gptoss_jax.bench.flops import decode_bytes_per_step, forward_flops_per_token
from gptoss_jax.bench.memory import mem_available
from gptoss_jax.bench.peaks import peaks_of
from gptoss_jax.config import FULL, SLIDING

GiB = 2**30
SECTIONS = ("bounds", "versus", "prefill", "decode", "train", "scaling")


class Skip(Exception):
    """A case that is not run (predicted too slow or too large); the message says why."""


class Suite:
    def __init__(self, args, models: peers.Models | None, results: dict, log=print):
        self.args, self.models, self.results, self.log = args, models, results, log
        self.t0 = time.perf_counter()

    def elapsed(self) -> str:
        return f"[{time.perf_counter() - self.t0:6.0f} s]"

    @property
    def peaks(self) -> dict:
        return peaks_of(self.results["bounds"])

    def save(self):
        if self.args.json:
            records.write(self.results, self.args.json, indent=1, default=float)

    def check_memory(self, need_bytes, how):
        free = mem_available(default=8 * GiB) - 2 * GiB  # keep 2 GiB for everything else
        if need_bytes is not None and need_bytes > free:
            raise Skip(
                f"needs ~{need_bytes / GiB:.1f} GiB ({how}), {max(free, 0) / GiB:.1f} GiB free beyond a 2 GiB margin"
            )

    def report(self, section, name, *, rates=None, seconds=None, bound=None, hf=None, extra="", skipped=None, **key):
        """Print one row and record it. rates: tokens/s per repeat; hf: HF's median rate, or
        "self" for HF's own row."""
        rec = {"section": section, "impl": name, **key}
        label = " ".join(f"{k}={v}" for k, v in key.items())
        if skipped is not None:
            rec["skipped"] = skipped
            self.log(f"  {name:34s} {label:14s} skipped ({skipped})")
        else:
            st = timing.stats(rates)
            rec["tokens_per_s"] = st
            if isinstance(hf, str):
                hf = st["median"]
            if seconds is not None:
                rec["seconds"] = timing.stats(seconds)
            line = f"  {name:34s} {label:14s} {st['median']:10.1f} tok/s [{st['min']:.1f}-{st['max']:.1f}]"
            if hf is not None:
                rec["ratio_to_hf"] = st["median"] / hf
                line += f"  {st['median'] / hf:5.2f}x HF"
            else:
                line += "  " + " " * 8
            if bound:
                rec["bound_tokens_per_s"] = bound
                rec["pct_of_bound"] = 100 * st["median"] / bound
                line += f"  bound {bound:9.0f} tok/s  {100 * st['median'] / bound:5.1f}%"
            self.log(line + extra)
        self.results.setdefault(section, []).append(rec)
        return rec

    # -------------------------------------------------------------------------------------- versus
    def versus(self):
        reps = self.args.repeats
        self.log(
            f"\n== versus: ours against HF transformers, fp32/fp32 and bf16/bf16, interleaved, warm-up "
            f"excluded, median [min-max] of {reps} {self.elapsed()}"
        )
        self.results["versus"] = []
        versus.run(self.models, self.peaks, reps, self.log, self.save, into=self.results["versus"])

    # ------------------------------------------------------------------------------------- prefill
    def prefill(self):
        args, models = self.args, self.models
        torch = peers.require_torch()
        cfg = models.cfg
        pk = self.peaks
        Ts = [512, 2048] if args.quick else [512, 2048, 8192]
        reps = args.repeats
        self.log(
            f"\n== prefill: batch 1, full logits [B, T, V], compile excluded; median [min-max] of {reps} "
            f"{self.elapsed()}"
        )
        hf, ref = models.hf(), models.openai()
        # same weights everywhere: logits of the three fp32 implementations at a short length
        Tc = cfg.sliding_window + 32  # longer than a window: sliding layers drop keys
        toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, Tc))
        ours = np.asarray(models.ours("float32", "dense")(jnp.asarray(toks)).logits[0])
        # peer -> (T, seconds) of its last run, to predict the next T's time. The reference's check
        # run seeds it (its per-token MoE gather makes it ~linear in T and slow: ~30 s at T=512)
        prev = {}
        with torch.no_grad():
            hf_l = hf(input_ids=torch.tensor(toks), use_cache=False).logits[0].numpy()
            t = time.perf_counter()
            ref_l = ref(torch.tensor(toks[0])).numpy()
            prev["OpenAI"] = (Tc, time.perf_counter() - t)

        def rel(a, b):
            return float(np.abs(a - b).max() / np.abs(b).max())

        check = {
            "T": Tc,
            "ours_vs_hf": rel(ours, hf_l),
            "ours_vs_openai": rel(ours, ref_l),
            "hf_vs_openai": rel(hf_l, ref_l),
        }
        self.results["weights_check"] = check
        self.log(
            f"  weights check at T={Tc} (max|dlogit|/max|logit|, fp32): ours-HF {check['ours_vs_hf']:.1e}, "
            f"ours-OpenAI {check['ours_vs_openai']:.1e}, HF-OpenAI {check['hf_vs_openai']:.1e}"
        )

        variants = [("float32", "dense"), ("bfloat16", "dense"), ("float32", "mxfp4"), ("bfloat16", "mxfp4")]
        if args.quick:
            variants = [("float32", "dense"), ("bfloat16", "mxfp4")]
        for T in Ts:
            tokens = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T))
            flops = forward_flops_per_token(cfg, T)
            self.log(
                f"  -- T={T}: {flops / 1e6:.1f} MFLOP/token (useful), bound fp32 {pk['float32'] / flops:.0f}, "
                f"bf16 {pk['bfloat16'] / flops:.0f} tok/s"
            )
            hf_rate = [None]

            def row(name, dtype, ts, info):
                rec = self.report(
                    "prefill",
                    name,
                    rates=[T / t for t in ts],
                    seconds=ts,
                    bound=pk[dtype] / flops,
                    hf=hf_rate[0],
                    T=T,
                    extra=(f"  (compile {info['compile_s']:.1f} s)" if "compile_s" in info else "")
                    + (f"  ({info['note']})" if info.get("note") else ""),
                )
                rec.update(flops_per_token=flops, **info)
                return rec

            def peer(name, key, fn, mem):
                try:
                    self.check_memory(mem, "estimate")
                    p = peers.predict_peer(prev.get(key), T, cfg, pk["float32"])
                    if p is not None and p > args.cap:
                        raise Skip(f"predicted {p:.0f} s per run > cap {args.cap:.0f} s")
                    ts, note = timing.capped(fn, reps, args.cap, args.budget)
                    prev[key] = (T, statistics.median(ts))
                    return row(name, "float32", ts, {"note": note} if note else {})
                except Skip as e:
                    self.report("prefill", name, skipped=str(e), T=T)
                except (RuntimeError, MemoryError) as e:  # torch's CPU allocator failing
                    self.report("prefill", name, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", T=T)

            ids, ids1 = torch.tensor(tokens), torch.tensor(tokens[0])

            def hf_run():
                with torch.no_grad():
                    return hf(input_ids=ids, use_cache=False).logits

            def ref_run():
                with torch.no_grad():
                    ref(ids1)

            hf_rate[0] = "self"
            rec = peer("HF transformers (eager, fp32)", "HF", hf_run, peers.eager_attention_bytes(cfg, T))
            hf_rate[0] = rec["tokens_per_s"]["median"] if rec else None
            peer("OpenAI reference (torch, fp32)", "OpenAI", ref_run, peers.reference_bytes(cfg, T))

            jtok = jnp.asarray(tokens, jnp.int32)
            for dtype, experts in variants:
                name = f"ours XLA ({'fp32' if dtype == 'float32' else 'bf16'}, {experts})"
                if experts == "mxfp4" and T > 2048:  # keeps the default run inside its time budget
                    self.report("prefill", name, skipped="MXFP4 is measured up to T=2048 only", T=T)
                    continue
                try:
                    run, comp, need = peers.compile_forward(models.ours(dtype, experts), 1, T)
                    self.check_memory(need, "XLA buffer assignment")
                    ts, note = timing.capped(lambda: run(jtok), reps, args.cap, args.budget)
                    row(name, dtype, ts, {"compile_s": comp, "xla_bytes": need, **({"note": note} if note else {})})
                except Skip as e:
                    self.report("prefill", name, skipped=str(e), T=T)
            self.save()

    # -------------------------------------------------------------------------------------- decode
    def decode(self):
        args, models = self.args, self.models
        torch = peers.require_torch()
        cfg = models.cfg
        pk = self.peaks
        P, n = 32, (32 if args.quick else 256)
        reps = args.repeats
        self.log(
            f"\n== decode: greedy, prompt {P}, {n} new tokens; rate = B*(new-1)/(t(new)-min t(1)), "
            f"median [min-max] of {reps} {self.elapsed()}"
        )
        variants = [("float32", "dense"), ("float32", "mxfp4"), ("bfloat16", "dense"), ("bfloat16", "mxfp4")]
        if args.quick:
            variants = [("float32", "dense")]
        hf = models.hf()
        ref = models.openai()
        for B in (1, 8):
            prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, P))
            self.log(
                f"  -- batch {B}: experts read per layer per step min(E, B*k) = "
                f"{min(cfg.num_experts, B * cfg.experts_per_token)}"
            )
            hf_rate = [None]

            def measure(name, make, wbytes, experts, cbytes):
                one, many = make(1), make(n)
                one(), many()  # warm-up (compiles ours)
                # t(1) is a small fixed cost (prefill + first token) that noise only lengthens: its
                # best of reps+1 is subtracted from each t(new)
                t1s, tns = [timing.once(one)], []
                for _ in range(reps):
                    tns.append(timing.once(many))
                    t1s.append(timing.once(one))
                pairs = [tn - min(t1s) for tn in tns]
                rates = [B * (n - 1) / d for d in pairs]
                byt = decode_bytes_per_step(
                    cfg, batch=B, prompt=P, new=n, weight_bytes=wbytes, experts=experts, cache_bytes=cbytes
                )
                rec = self.report(
                    "decode",
                    name,
                    rates=rates,
                    bound=B * pk["bandwidth"] / byt,
                    hf=hf_rate[0],
                    extra=f"  ({byt / 1e6:.1f} MB/step)",
                    batch=B,
                )
                rec.update(bytes_per_step=byt, seconds_new_minus_one=timing.stats(pairs), seconds_one=timing.stats(t1s))
                return rec

            make_hf = lambda k: peers.hf_greedy_generate(hf, prompts, k)
            hf_rate[0] = "self"
            rec = measure("HF transformers generate (fp32)", make_hf, 4, "dense", 4)
            hf_rate[0] = rec["tokens_per_s"]["median"]

            name = "OpenAI ref (no KV cache, fp32)"
            if B == 1:

                def make_ref(k):  # the reference's own TokenGenerator loop: no KV cache, re-forward
                    def run():
                        toks = prompts[0].tolist()
                        with torch.no_grad():
                            for _ in range(k):
                                toks.append(int(ref(torch.tensor(toks, dtype=torch.int32))[-1].argmax()))

                    return run

                one = make_ref(1)
                one()
                t_f = timing.once(one)  # one forward over the prompt; step j re-reads P + j tokens
                p = sum(t_f * (P + j) / P for j in range(n))
                if p > args.cap:
                    self.report(
                        "decode",
                        name,
                        skipped=f"re-forwards the whole sequence per token: predicted {p:.0f} s "
                        f"for {n} tokens > cap {args.cap:.0f} s",
                        batch=B,
                    )
                else:
                    measure(name, make_ref, 4, "dense", 4)
            else:
                self.report("decode", name, skipped="batch 1 only (the reference generator is unbatched)", batch=B)

            for dtype, experts in variants:
                model = models.ours(dtype, experts)

                def make(k, model=model):
                    return lambda: gj.generate(
                        model, None, prompts.tolist(), max_new_tokens=k, temperature=0, stop_tokens=(), prefill_chunk=P
                    )

                w = 4 if dtype == "float32" else 2
                measure(f"ours ({'fp32' if w == 4 else 'bf16'}, {experts})", make, w, experts, w)
            self.save()

    # --------------------------------------------------------------------------------------- train
    def train(self):
        args, models = self.args, self.models
        cfg = models.cfg
        pk = self.peaks
        B, T = (1, 256) if args.quick else (4, 512)
        steps, reps = (1, 2) if args.quick else (2, args.repeats)
        self.log(
            f"\n== train: fp32, batch {B} x {T}, AdamW + clip 1.0, every weight (dense experts) trained; "
            f"median [min-max] of {reps} x {steps} steps {self.elapsed()}"
        )
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
        model = models.ours("float32", "dense")
        hf = models.hf(train=True)  # a fresh copy: training changes its weights
        ours_step, hf_step = peers.training_steps(model, hf, tokens)

        t = time.perf_counter()
        first = ours_step()
        comp = time.perf_counter() - t
        first_hf = hf_step()
        self.log(f"  first-step loss: ours {first:.6f}  HF {first_hf:.6f}  (|diff| {abs(first - first_hf):.1e})")
        flops = 3 * forward_flops_per_token(cfg, T)
        bound = pk["float32"] / flops
        self.log(f"  {flops / 1e6:.1f} MFLOP/token (3 x forward), bound {bound:.0f} tok/s")
        res = {}
        for name, fn in (("ours (XLA, fp32)", ours_step), ("HF transformers + torch (fp32)", hf_step)):
            times = [timing.once(lambda: [fn() for _ in range(steps)]) / steps for _ in range(reps)]
            res[name] = times
        hf_rate = statistics.median(B * T / t for t in res["HF transformers + torch (fp32)"])
        for name, times in res.items():
            rec = self.report(
                "train",
                name,
                rates=[B * T / t for t in times],
                seconds=times,
                bound=bound,
                hf=hf_rate,
                extra=f"  (step {statistics.median(times):.2f} s)",
                batch=B,
                T=T,
            )
            rec["flops_per_token"] = flops
            rec["first_loss"] = first if name.startswith("ours") else first_hf
            if name.startswith("ours"):
                rec["first_step_s_with_compile"] = comp
        self.save()

    # ------------------------------------------------------------------------------------- scaling
    def scaling(self):
        args = self.args
        pk = self.peaks
        Ts = [512, 1024, 2048] if args.quick else [2048, 4096, 8192, 16384, 32768]
        reps = 2 if args.quick else args.repeats
        self.log(
            f"\n== scaling: ONE layer (1-layer model, last-token logits), ours XLA path, batch 1; median "
            f"[min-max] of {reps} {self.elapsed()}"
        )
        self.results["scaling"] = []
        for dtype in args.scaling_dtypes:
            for kind, lt in (("sliding", SLIDING), ("full", FULL)):
                cfg1 = gj.tiny(**{**peers.BENCH_CONFIG, "num_layers": 1, "layer_types": (lt,)})
                model = gj.init(cfg1, seed=0, dtype=dtype, experts="dense")
                name = f"{kind} layer ({'fp32' if dtype == 'float32' else 'bf16'})"
                self.log(f"  -- {name}")
                pts, prev = [], None
                for T in Ts + ([131072] if kind == "sliding" and not args.quick else []):
                    flops = forward_flops_per_token(cfg1, T, all_logits=False)
                    rec = {"layer": kind, "dtype": dtype, "T": T, "flops_per_token": flops}
                    try:
                        p = peers.predict(prev, T, 2 if kind == "full" else 1.2)
                        if p is not None and p > args.cap:
                            raise Skip(f"predicted {p:.0f} s per run > cap {args.cap:.0f} s")
                        run, comp, need = peers.compile_forward(model, 1, T, last_only=True)
                        # XLA's own figure once let a 16k full layer start that was then OOM-killed; a
                        # full layer also needs at least one query chunk's fp32 scores and probabilities
                        floor = 3 * cfg1.num_heads * attention.causal_chunk(T) * T * 4 if kind == "full" else 0
                        self.check_memory(
                            max(need or 0, floor), "XLA buffer assignment, or a full layer's chunk of scores"
                        )
                        tok = jnp.asarray(np.random.default_rng(T).integers(0, cfg1.vocab_size, (1, T)), jnp.int32)
                        ts, note = timing.capped(lambda: run(tok), reps, args.cap, args.budget)
                        if note:
                            rec["note"] = note
                    except Skip as e:
                        rec["skipped"] = str(e)
                        self.log(f"    T={T:6d}  skipped ({e})")
                        self.results["scaling"].append(rec)
                        continue
                    st = timing.stats(ts)
                    bound = pk[dtype] / flops
                    ratio = ""
                    if pts:
                        r = st["median"] / pts[-1][1]
                        ratio = f"  x{r:.2f} per x{T // pts[-1][0]} T"
                        rec["ratio_to_previous"] = r
                    rec.update(
                        seconds=st,
                        tokens_per_s=T / st["median"],
                        compile_s=comp,
                        bound_tokens_per_s=bound,
                        pct_of_bound=100 * T / st["median"] / bound,
                        xla_bytes=need,
                    )
                    self.log(
                        f"    T={T:6d}  {st['median'] * 1e3:9.1f} ms [{st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f}]"
                        f"  {T / st['median']:8.0f} tok/s  {100 * T / st['median'] / bound:5.1f}% of bound"
                        f"{ratio}  (XLA buffers {need / GiB if need else float('nan'):.2f} GiB, compile {comp:.1f} s"
                        f"{'; ' + note if note else ''})"
                    )
                    pts.append((T, st["median"]))
                    prev = (T, st["median"])
                    self.results["scaling"].append(rec)
                if len(pts) >= 2:
                    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
                    slope = float(np.polyfit(x, y, 1)[0])
                    self.log(f"    fitted exponent: time ~ T^{slope:.2f} over T = {pts[0][0]}..{pts[-1][0]}")
                    self.results["scaling"].append(
                        {"layer": kind, "dtype": dtype, "exponent": slope, "T_range": [pts[0][0], pts[-1][0]]}
                    )
                del model
        self.save()

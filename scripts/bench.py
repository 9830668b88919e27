"""
    .venv/bin/python scripts/bench.py                                  # full run, ~20-25 min
    .venv/bin/python scripts/bench.py --quick                          # smoke run, ~2-3 min
    .venv/bin/python scripts/bench.py --only prefill,decode --json runs/bench.json
    .venv/bin/python scripts/bench.py [--repeats 3] [--cap 90] [--budget 40] [--torch-threads N]
                                      [--scaling-dtypes float32,bfloat16]

Throughput of `gptoss_jax` against HF transformers and OpenAI's reference on the same random
weights of the named small config BENCH (= BENCH_CONFIG of scripts/bench_train.py), on CPU, each
figure beside a bound measured on this machine (needs the test extras: `make setup-test`). Run it
on a quiet machine: other processes on the 2 cores distort every figure, torch's most (with a
busy core, HF decode with 2 OpenMP threads ran ~10x slower than with `--torch-threads 1`).

Sections (`--only`, comma-separated; default all, in this order):

  bounds   peak matmul FLOP/s (fp32, bf16): a jitted `jnp.dot` of square matrices (and, for
           comparison, `torch.mm`), median of repeats; the bound used below is the larger of the
           two medians. Stream bandwidth: a large array copy / add (numpy, torch, jax), bytes
           read + written per second, median of repeats; the bound is the best of them.
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
  --quick  bounds on smaller arrays; T <= 2048; fewer variants (ours fp32 dense + bf16 MXFP4 in
           prefill, fp32 dense in decode), 32 new tokens, a 1 x 256 training batch; cap 10 s.

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
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import gptoss_jax as gj  # noqa: E402
from bench_train import BENCH_CONFIG, training_steps  # noqa: E402  (the training bench's config and step)
from gptoss_jax.config import FULL, SLIDING  # noqa: E402
from gptoss_jax import host  # noqa: E402
from gptoss_jax import attention  # noqa: E402
from provenance import provenance  # noqa: E402  (command, UTC date, CPU of the record)

BENCH = dict(BENCH_CONFIG)
SECTIONS = ("bounds", "prefill", "decode", "train", "scaling")
GiB = 2 ** 30
RESULTS: dict = {}
T0 = time.perf_counter()


def log(msg=""):
    print(msg, flush=True)


def elapsed():
    return f"[{time.perf_counter() - T0:6.0f} s]"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * GiB


def stats(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def clock(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_repeats(fn, repeats, warmup=1):
    """Seconds per call, `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [clock(fn) for _ in range(repeats)]


def run_capped(fn, repeats, cap, budget):
    """A warm-up call, then `repeats` timed calls, fewer (but at least 2) when they would take
    more than `budget` seconds. A warm-up longer than `cap` is itself the one sample (torch has
    nothing to compile; ours is compiled before). -> (seconds, note)."""
    t_w = clock(fn)
    if t_w > cap:
        return [t_w], "1 run: the warm-up, longer than the cap"
    n = max(2, min(repeats, int(budget / max(t_w, 1e-9))))
    return [clock(fn) for _ in range(n)], (f"{n} of {repeats} repeats (time budget)" if n < repeats else "")


class Skip(Exception):
    pass


# ------------------------------------------------------------------------------ FLOPs and bytes
def mean_keys(T: int, window: int | None) -> float:
    """Mean number of keys a query of a length-T causal sequence may see (itself included)."""
    if window is None:
        return (T + 1) / 2
    w = min(window, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def forward_flops_per_token(cfg, T: int, *, all_logits: bool = True) -> float:
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E, k, F, V = cfg.num_experts, cfg.experts_per_token, cfg.expert_dim, cfg.vocab_size
    linear = 2 * D * (N + 2 * K) * H + 2 * N * H * D + 2 * D * E + k * (2 * D * 2 * F + 2 * F * D)
    attn = sum(4 * N * H * mean_keys(T, cfg.sliding_window if cfg.is_sliding(i) else None)
               for i in range(cfg.num_layers))
    unembed = 2 * D * V * (1 if all_logits else 1 / T)
    return cfg.num_layers * linear + attn + unembed


def decode_bytes_per_step(cfg, *, batch: int, prompt: int, new: int, weight_bytes: int,
                          experts: str, cache_bytes: int) -> float:
    """Bytes one decode step of `batch` rows must read (see the module docstring)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E, k, F, V = cfg.num_experts, cfg.experts_per_token, cfg.expert_dim, cfg.vocab_size
    w = weight_bytes
    attn = (D * (N + 2 * K) * H + N * H * D + (N + 2 * K) * H + D) * w + (N + D) * 4  # + sinks, norm
    router = (D * E + E) * w + D * 4
    if experts == "dense":
        per_expert = (D * 2 * F + F * D + 2 * F + D) * w
    else:  # MXFP4: half a byte per weight + one scale byte per 32 weights; biases dense
        n = D * 2 * F + F * D
        per_expert = n / 2 + n / 32 + (2 * F + D) * w
    n_experts = min(E, batch * k)
    # decode steps j = 1 .. new-1 attend to prompt + j keys (capped at W on sliding layers)
    ctx = {win: statistics.fmean(min(prompt + j, win or 1 << 60) for j in range(1, new))
           for win in (None, cfg.sliding_window)}
    kv = sum(2 * K * H * cache_bytes * batch * ctx[cfg.sliding_window if cfg.is_sliding(i) else None]
             for i in range(cfg.num_layers))
    head = V * D * w + D * 4 + batch * D * w  # unembedding, final norm, embedding rows
    return cfg.num_layers * (attn + router + n_experts * per_expert) + kv + head


# --------------------------------------------------------------------------------- formatting
def fmt_rate(st):
    return f"{st['median']:10.1f} tok/s [{st['min']:.1f}-{st['max']:.1f}]"


def report(section, name, *, rates=None, seconds=None, bound=None, hf=None, extra="", skipped=None, **key):
    """Print one row and record it. rates: tokens/s per repeat."""
    rec = {"section": section, "impl": name, **key}
    label = " ".join(f"{k}={v}" for k, v in key.items())
    if skipped is not None:
        rec["skipped"] = skipped
        log(f"  {name:34s} {label:14s} skipped ({skipped})")
    else:
        st = stats(rates)
        rec["tokens_per_s"] = st
        if isinstance(hf, str):  # "self": this row is the HF reference
            hf = st["median"]
        if seconds is not None:
            rec["seconds"] = stats(seconds)
        line = f"  {name:34s} {label:14s} {fmt_rate(st)}"
        if hf is not None:
            rec["ratio_to_hf"] = st["median"] / hf
            line += f"  {st['median'] / hf:5.2f}x HF"
        else:
            line += "  " + " " * 8
        if bound:
            rec["bound_tokens_per_s"] = bound
            rec["pct_of_bound"] = 100 * st["median"] / bound
            line += f"  bound {bound:9.0f} tok/s  {100 * st['median'] / bound:5.1f}%"
        log(line + extra)
    RESULTS.setdefault(section, []).append(rec)
    return rec


def save_json(path):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1, default=float)


# ------------------------------------------------------------------------------------- bounds
def measure_bounds(args, quiet=False):
    say = (lambda *a: None) if quiet else log
    sizes = [1024, 2048] if args.quick else [2048, 4096]
    reps = 3 if args.quick else 5
    out = {"matmul": {}, "bandwidth": {}}
    say("  peak matmul (square n x n, median of %d; GFLOP/s = 2n^3 / s):" % reps)
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        variants = {"jax": {}, "torch": {}}
        probe = torch.randn(512, 512).to(getattr(torch, name))
        rate = 2 * 512 ** 3 / statistics.median(run_repeats(lambda: torch.mm(probe, probe), 3))
        probe_slow = rate < 10e9
        if probe_slow:
            variants["torch"]["torch.mm n=512 (larger sizes skipped: too slow)"] = rate
        for n in sizes:
            a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
            b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dt)
            accs = [None] if dt == jnp.float32 else [None, jnp.float32]  # bf16 out, fp32 accumulate-out
            for acc in accs:
                f = jax.jit(lambda a, b, acc=acc: jnp.dot(a, b, preferred_element_type=acc))
                ts = run_repeats(lambda: f(a, b).block_until_ready(), reps)
                tag = f"jnp.dot n={n}" + ("" if acc is None else " ->f32")
                variants["jax"][tag] = 2 * n ** 3 / statistics.median(ts)
            if probe_slow:  # e.g. bf16 on a CPU without bf16 instructions: minutes per product
                continue
            ta = torch.randn(n, n).to(getattr(torch, name))
            tb = torch.randn(n, n).to(getattr(torch, name))
            ts = run_repeats(lambda: torch.mm(ta, tb), reps)
            variants["torch"][f"torch.mm n={n}"] = 2 * n ** 3 / statistics.median(ts)
        best = {lib: max(v.items(), key=lambda kv: kv[1]) for lib, v in variants.items()}
        bound_lib = max(best, key=lambda lib: best[lib][1])
        out["matmul"][name] = {"jax": best["jax"][1], "jax_case": best["jax"][0], "torch": best["torch"][1],
                               "torch_case": best["torch"][0], "bound": best[bound_lib][1],
                               "bound_from": f"{bound_lib} ({best[bound_lib][0]})",
                               "all": {**variants["jax"], **variants["torch"]}}
        say(f"    {name:9s} jax {best['jax'][1] / 1e9:7.1f} GFLOP/s ({best['jax'][0]})   torch "
            f"{best['torch'][1] / 1e9:7.1f} GFLOP/s ({best['torch'][0]})   -> bound "
            f"{best[bound_lib][1] / 1e9:.1f} GFLOP/s [{bound_lib}]")
        say("      all: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in {**variants['jax'], **variants['torch']}.items()))

    nbytes = (256 if args.quick else 1024) * 2 ** 20
    n = nbytes // 4
    say(f"  stream bandwidth ({nbytes // 2 ** 20} MiB fp32 arrays, bytes read + written, median of {reps}):")
    bw = {}
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.ones(n, np.float32)
    c = np.empty(n, np.float32)
    bw["numpy copy (1 thread)"] = 2 * nbytes / statistics.median(run_repeats(lambda: np.copyto(c, a), reps))
    bw["numpy add (1 thread)"] = 3 * nbytes / statistics.median(run_repeats(lambda: np.add(a, b, out=c), reps))
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
    bw[f"torch copy ({torch.get_num_threads()} threads)"] = 2 * nbytes / statistics.median(
        run_repeats(lambda: tc.copy_(ta), reps))
    bw[f"torch add ({torch.get_num_threads()} threads)"] = 3 * nbytes / statistics.median(
        run_repeats(lambda: torch.add(ta, tb, out=tc), reps))
    del ta, tb, tc, c
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    del a, b
    # donated input: the output reuses its buffer, so no fresh pages are faulted in per call
    fadd = jax.jit(lambda x, y: x + y, donate_argnums=0)
    box = [fadd(ja, jb)]

    def jadd():
        box[0] = fadd(box[0], jb)
        box[0].block_until_ready()
    bw["jax add (jit, donated)"] = 3 * nbytes / statistics.median(run_repeats(jadd, reps))
    del box, ja, jb
    for k_, v in bw.items():
        say(f"    {k_:28s} {v / 1e9:7.2f} GB/s")
    best = max(bw, key=bw.get)
    out["bandwidth"] = {"all": bw, "bound": bw[best], "bound_from": best}
    say(f"    -> bound {bw[best] / 1e9:.2f} GB/s [{best}]")
    return out


def section_bounds(args):
    log(f"\n== bounds: machine peaks {elapsed()}")
    RESULTS["bounds"] = measure_bounds(args)


def peaks():
    b = RESULTS["bounds"]
    return {"float32": b["matmul"]["float32"]["bound"], "bfloat16": b["matmul"]["bfloat16"]["bound"],
            "bandwidth": b["bandwidth"]["bound"]}


# ------------------------------------------------------------------------------------- models
class Models:
    """The one set of weights, in every implementation and format, built lazily."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._dir = tempfile.TemporaryDirectory()
        self.root = self._dir.name
        self._ours = {}
        self._hub = self._dense = self._orig = None

    def hub(self):
        if self._hub is None:
            self._hub = os.path.join(self.root, "hub_mxfp4")
            gj.save_hf(gj.init(self.cfg, seed=0, dtype="float32", experts="mxfp4"), self._hub)
        return self._hub

    def ours(self, dtype: str, experts: str):
        if (dtype, experts) not in self._ours:
            self._ours[dtype, experts] = gj.load(self.hub(), dtype=dtype, experts=experts)
        return self._ours[dtype, experts]

    def hf_dir(self):
        if self._dense is None:
            self._dense = os.path.join(self.root, "hub_dense_fp32")
            gj.save_hf(self.ours("float32", "dense"), self._dense, dtype="float32")
        return self._dense

    def hf(self, train=False):
        from transformers import GptOssForCausalLM

        m = GptOssForCausalLM.from_pretrained(self.hf_dir(), dtype=torch.float32, attn_implementation="eager")
        return m.train() if train else m.eval()

    def original_dir(self):
        """OpenAI's original/ layout from the hub files: fused qkv, renamed keys, same bytes."""
        if self._orig is None:
            from safetensors import safe_open
            from safetensors.torch import save_file

            hub = {}
            for fn in os.listdir(self.hub()):
                if fn.endswith(".safetensors"):
                    with safe_open(os.path.join(self.hub(), fn), framework="pt") as f:
                        hub.update({k: f.get_tensor(k) for k in f.keys()})
            cfg = self.cfg
            t = {"embedding.weight": hub["model.embed_tokens.weight"], "norm.scale": hub["model.norm.weight"],
                 "unembedding.weight": hub["lm_head.weight"]}
            for n in range(cfg.num_layers):
                p, b = f"model.layers.{n}.", f"block.{n}."
                sa, ex = p + "self_attn.", p + "mlp.experts."
                for s in ("weight", "bias"):
                    t[b + f"attn.qkv.{s}"] = torch.cat([hub[sa + f"{x}_proj.{s}"] for x in "qkv"], 0)
                    t[b + f"attn.out.{s}"] = hub[sa + f"o_proj.{s}"]
                    t[b + f"mlp.gate.{s}"] = hub[p + f"mlp.router.{s}"]
                t[b + "attn.sinks"] = hub[sa + "sinks"]
                t[b + "attn.norm.scale"] = hub[p + "input_layernorm.weight"]
                t[b + "mlp.norm.scale"] = hub[p + "post_attention_layernorm.weight"]
                for mine, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
                    t[b + f"mlp.{mine}_weight.blocks"] = hub[ex + theirs + "_blocks"]
                    t[b + f"mlp.{mine}_weight.scales"] = hub[ex + theirs + "_scales"]
                    t[b + f"mlp.{mine}_bias"] = hub[ex + theirs + "_bias"]
            self._orig = os.path.join(self.root, "original")
            os.makedirs(self._orig)
            with open(os.path.join(self._orig, "config.json"), "w") as f:
                json.dump(cfg.to_original_dict(), f)
            save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(self._orig, "model.safetensors"))
        return self._orig

    def openai(self):
        from gpt_oss.torch.model import Transformer

        return Transformer.from_checkpoint(self.original_dir(), device="cpu").float().eval()


def compile_forward(model, B: int, T: int, *, last_only=False):
    """Our jitted forward at [B, T] (weights passed as arguments, not baked in as constants).
    -> (run(tokens) -> logits, compile seconds, bytes XLA will allocate beyond the weights)."""
    graphdef, state = nnx.split(model)

    def f(state, tokens):
        m = nnx.merge(graphdef, state)
        if last_only:
            return m(tokens, logits_at=jnp.full((tokens.shape[0],), tokens.shape[1] - 1)).logits
        return m(tokens).logits

    t = time.perf_counter()
    compiled = jax.jit(f).lower(state, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile()
    seconds = time.perf_counter() - t
    need = None
    try:
        ma = compiled.memory_analysis()
        need = int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        pass
    return (lambda tokens: compiled(state, tokens).block_until_ready()), seconds, need


def check_memory(need_bytes, how):
    free = mem_available() - 2 * GiB  # keep 2 GiB for everything else
    if need_bytes is not None and need_bytes > free:
        raise Skip(f"needs ~{need_bytes / GiB:.1f} GiB ({how}), {max(free, 0) / GiB:.1f} GiB free beyond a 2 GiB margin")


def eager_attention_bytes(cfg, T):
    """HF eager attention's working set at T: ~3 live [N, T, T] fp32 score tensors (scores,
    scores + sink column, softmax) and the [T, T] masks (1.5 GiB measured at T=4096)."""
    return 3 * cfg.num_heads * T * T * 4 + 2 * T * T * 4 + GiB / 2


def reference_bytes(cfg, T):
    """OpenAI's reference at T: its MoE gathers each token's k expert matrices ([T, k, 2F, D] and
    [T, k, D, F] fp32), plus ~4 [N, T, T] fp32 attention tensors."""
    gather = T * cfg.experts_per_token * 3 * cfg.expert_dim * cfg.d_model * 4
    return gather + 4 * cfg.num_heads * T * T * 4 + GiB / 2


def predict_peer(prev, T, cfg, peak):
    """Seconds a torch peer should take at T from its last measurement (T0, s0): linear in T,
    plus the growth of a full T x T attention on every layer (what both peers compute) at peak."""
    if prev is None:
        return None
    T0_, s0 = prev
    attn = lambda t: cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * t * t
    return s0 * T / T0_ + max(attn(T) - attn(T0_) * T / T0_, 0) / peak


def predict(prev, T, power):
    """Seconds predicted at T from the last measured (T0, seconds), scaling as T^power."""
    if prev is None:
        return None
    t0_, s0 = prev
    return s0 * (T / t0_) ** power


# ------------------------------------------------------------------------------------ prefill
def section_prefill(args, models: Models):
    cfg = models.cfg
    pk = peaks()
    Ts = [512, 2048] if args.quick else [512, 2048, 8192]
    reps = args.repeats
    log(f"\n== prefill: batch 1, full logits [B, T, V], compile excluded; median [min-max] of {reps} "
        f"{elapsed()}")
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
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    check = {"T": Tc, "ours_vs_hf": rel(ours, hf_l), "ours_vs_openai": rel(ours, ref_l), "hf_vs_openai": rel(hf_l, ref_l)}
    RESULTS["weights_check"] = check
    log(f"  weights check at T={Tc} (max|dlogit|/max|logit|, fp32): ours-HF {check['ours_vs_hf']:.1e}, "
        f"ours-OpenAI {check['ours_vs_openai']:.1e}, HF-OpenAI {check['hf_vs_openai']:.1e}")

    variants = [("float32", "dense"), ("bfloat16", "dense"), ("float32", "mxfp4"), ("bfloat16", "mxfp4")]
    if args.quick:
        variants = [("float32", "dense"), ("bfloat16", "mxfp4")]
    for T in Ts:
        tokens = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T))
        flops = forward_flops_per_token(cfg, T)
        log(f"  -- T={T}: {flops / 1e6:.1f} MFLOP/token (useful), bound fp32 {pk['float32'] / flops:.0f}, "
            f"bf16 {pk['bfloat16'] / flops:.0f} tok/s")
        hf_rate = [None]

        def row(name, dtype, ts, info):
            rec = report("prefill", name, rates=[T / t for t in ts], seconds=ts, bound=pk[dtype] / flops,
                         hf=hf_rate[0], T=T, extra=(f"  (compile {info['compile_s']:.1f} s)" if "compile_s" in info
                                                    else "") + (f"  ({info['note']})" if info.get("note") else ""))
            rec.update(flops_per_token=flops, **info)
            return rec

        def peer(name, key, fn, mem):
            try:
                check_memory(mem, "estimate")
                p = predict_peer(prev.get(key), T, cfg, pk["float32"])
                if p is not None and p > args.cap:
                    raise Skip(f"predicted {p:.0f} s per run > cap {args.cap:.0f} s")
                ts, note = run_capped(fn, reps, args.cap, args.budget)
                prev[key] = (T, statistics.median(ts))
                return row(name, "float32", ts, {"note": note} if note else {})
            except Skip as e:
                report("prefill", name, skipped=str(e), T=T)
            except (RuntimeError, MemoryError) as e:  # torch's CPU allocator failing
                report("prefill", name, skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", T=T)

        ids, ids1 = torch.tensor(tokens), torch.tensor(tokens[0])

        def hf_run():
            with torch.no_grad():
                hf(input_ids=ids, use_cache=False).logits

        def ref_run():
            with torch.no_grad():
                ref(ids1)
        hf_rate[0] = "self"
        rec = peer("HF transformers (eager, fp32)", "HF", hf_run, eager_attention_bytes(cfg, T))
        hf_rate[0] = rec["tokens_per_s"]["median"] if rec else None
        peer("OpenAI reference (torch, fp32)", "OpenAI", ref_run, reference_bytes(cfg, T))

        jtok = jnp.asarray(tokens, jnp.int32)
        for dtype, experts in variants:
            name = f"ours XLA ({'fp32' if dtype == 'float32' else 'bf16'}, {experts})"
            if experts == "mxfp4" and T > 2048:  # keeps the default run inside its time budget
                report("prefill", name, skipped="MXFP4 is measured up to T=2048 only", T=T)
                continue
            try:
                run, comp, need = compile_forward(models.ours(dtype, experts), 1, T)
                check_memory(need, "XLA buffer assignment")
                ts, note = run_capped(lambda: run(jtok), reps, args.cap, args.budget)
                row(name, dtype, ts, {"compile_s": comp, "xla_bytes": need, **({"note": note} if note else {})})
            except Skip as e:
                report("prefill", name, skipped=str(e), T=T)
        save_json(args.json)


# ------------------------------------------------------------------------------------- decode
def section_decode(args, models: Models):
    cfg = models.cfg
    pk = peaks()
    P, n = 32, (32 if args.quick else 256)
    reps = args.repeats
    log(f"\n== decode: greedy, prompt {P}, {n} new tokens; rate = B*(new-1)/(t(new)-min t(1)), "
        f"median [min-max] of {reps} {elapsed()}")
    variants = [("float32", "dense"), ("float32", "mxfp4"), ("bfloat16", "dense"), ("bfloat16", "mxfp4")]
    if args.quick:
        variants = [("float32", "dense")]
    hf = models.hf()
    ref = models.openai()
    for B in (1, 8):
        prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, P))
        log(f"  -- batch {B}: experts read per layer per step min(E, B*k) = "
            f"{min(cfg.num_experts, B * cfg.experts_per_token)}")
        hf_rate = [None]

        def measure(name, make, wbytes, experts, cbytes):
            one, many = make(1), make(n)
            one(), many()  # warm-up (compiles ours)
            # t(1) is a small fixed cost (prefill + first token) that noise only lengthens: its
            # best of reps+1 is subtracted from each t(new)
            t1s, tns = [clock(one)], []
            for _ in range(reps):
                tns.append(clock(many))
                t1s.append(clock(one))
            pairs = [tn - min(t1s) for tn in tns]
            rates = [B * (n - 1) / d for d in pairs]
            byt = decode_bytes_per_step(cfg, batch=B, prompt=P, new=n, weight_bytes=wbytes, experts=experts,
                                        cache_bytes=cbytes)
            rec = report("decode", name, rates=rates, bound=B * pk["bandwidth"] / byt, hf=hf_rate[0],
                         extra=f"  ({byt / 1e6:.1f} MB/step)", batch=B)
            rec.update(bytes_per_step=byt, seconds_new_minus_one=stats(pairs), seconds_one=stats(t1s))
            return rec

        ids = torch.tensor(prompts)

        def make_hf(k):
            def run():
                with torch.no_grad():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                do_sample=False, pad_token_id=0)
            return run
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
            t_f = clock(one)  # one forward over the prompt; step j re-reads P + j tokens
            p = sum(t_f * (P + j) / P for j in range(n))
            if p > args.cap:
                report("decode", name, skipped=f"re-forwards the whole sequence per token: predicted {p:.0f} s "
                       f"for {n} tokens > cap {args.cap:.0f} s", batch=B)
            else:
                measure(name, make_ref, 4, "dense", 4)
        else:
            report("decode", name, skipped="batch 1 only (the reference generator is unbatched)", batch=B)

        for dtype, experts in variants:
            model = models.ours(dtype, experts)

            def make(k, model=model):
                return lambda: gj.generate(model, None, prompts.tolist(), max_new_tokens=k, temperature=0,
                                           stop_tokens=(), prefill_chunk=P)
            w = 4 if dtype == "float32" else 2
            measure(f"ours ({'fp32' if w == 4 else 'bf16'}, {experts})", make, w, experts, w)
        save_json(args.json)


# -------------------------------------------------------------------------------------- train
def section_train(args, models: Models):
    cfg = models.cfg
    pk = peaks()
    B, T = (1, 256) if args.quick else (4, 512)
    steps, reps = (1, 2) if args.quick else (2, args.repeats)
    log(f"\n== train: fp32, batch {B} x {T}, AdamW + clip 1.0, every weight (dense experts) trained; "
        f"median [min-max] of {reps} x {steps} steps {elapsed()}")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    model = models.ours("float32", "dense")
    hf = models.hf(train=True)  # a fresh copy: training changes its weights
    ours_step, hf_step = training_steps(model, hf, tokens)

    t = time.perf_counter()
    first = ours_step()
    comp = time.perf_counter() - t
    first_hf = hf_step()
    log(f"  first-step loss: ours {first:.6f}  HF {first_hf:.6f}  (|diff| {abs(first - first_hf):.1e})")
    flops = 3 * forward_flops_per_token(cfg, T)
    bound = pk["float32"] / flops
    log(f"  {flops / 1e6:.1f} MFLOP/token (3 x forward), bound {bound:.0f} tok/s")
    res = {}
    for name, fn in (("ours (XLA, fp32)", ours_step), ("HF transformers + torch (fp32)", hf_step)):
        times = [clock(lambda: [fn() for _ in range(steps)]) / steps for _ in range(reps)]
        res[name] = times
    hf_rate = statistics.median(B * T / t for t in res["HF transformers + torch (fp32)"])
    for name, times in res.items():
        rec = report("train", name, rates=[B * T / t for t in times], seconds=times, bound=bound, hf=hf_rate,
                     extra=f"  (step {statistics.median(times):.2f} s)", batch=B, T=T)
        rec["flops_per_token"] = flops
        rec["first_loss"] = first if name.startswith("ours") else first_hf
        if name.startswith("ours"):
            rec["first_step_s_with_compile"] = comp
    save_json(args.json)


# ------------------------------------------------------------------------------------ scaling
def section_scaling(args):
    pk = peaks()
    Ts = [512, 1024, 2048] if args.quick else [2048, 4096, 8192, 16384, 32768]
    reps = 2 if args.quick else args.repeats
    log(f"\n== scaling: ONE layer (1-layer model, last-token logits), ours XLA path, batch 1; median "
        f"[min-max] of {reps} {elapsed()}")
    RESULTS["scaling"] = []
    for dtype in args.scaling_dtypes:
        for kind, lt in (("sliding", SLIDING), ("full", FULL)):
            cfg1 = gj.tiny(**{**BENCH, "num_layers": 1, "layer_types": (lt,)})
            model = gj.init(cfg1, seed=0, dtype=dtype, experts="dense")
            name = f"{kind} layer ({'fp32' if dtype == 'float32' else 'bf16'})"
            log(f"  -- {name}")
            pts, prev = [], None
            for T in Ts + ([131072] if kind == "sliding" and not args.quick else []):
                flops = forward_flops_per_token(cfg1, T, all_logits=False)
                rec = {"layer": kind, "dtype": dtype, "T": T, "flops_per_token": flops}
                try:
                    p = predict(prev, T, 2 if kind == "full" else 1.2)
                    if p is not None and p > args.cap:
                        raise Skip(f"predicted {p:.0f} s per run > cap {args.cap:.0f} s")
                    run, comp, need = compile_forward(model, 1, T, last_only=True)
                    # XLA's own figure once let a 16k full layer start that was then OOM-killed; a
                    # full layer also needs at least one query chunk's fp32 scores and probabilities
                    floor = 3 * cfg1.num_heads * attention.causal_chunk(T) * T * 4 if kind == "full" else 0
                    check_memory(max(need or 0, floor), "XLA buffer assignment, or a full layer's chunk of scores")
                    tok = jnp.asarray(np.random.default_rng(T).integers(0, cfg1.vocab_size, (1, T)), jnp.int32)
                    ts, note = run_capped(lambda: run(tok), reps, args.cap, args.budget)
                    if note:
                        rec["note"] = note
                except Skip as e:
                    rec["skipped"] = str(e)
                    log(f"    T={T:6d}  skipped ({e})")
                    RESULTS["scaling"].append(rec)
                    continue
                st = stats(ts)
                bound = pk[dtype] / flops
                ratio = ""
                if pts:
                    r = st["median"] / pts[-1][1]
                    ratio = f"  x{r:.2f} per x{T // pts[-1][0]} T"
                    rec["ratio_to_previous"] = r
                rec.update(seconds=st, tokens_per_s=T / st["median"], compile_s=comp, bound_tokens_per_s=bound,
                           pct_of_bound=100 * T / st["median"] / bound, xla_bytes=need)
                log(f"    T={T:6d}  {st['median'] * 1e3:9.1f} ms [{st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f}]"
                    f"  {T / st['median']:8.0f} tok/s  {100 * T / st['median'] / bound:5.1f}% of bound"
                    f"{ratio}  (XLA buffers {need / GiB if need else float('nan'):.2f} GiB, compile {comp:.1f} s"
                    f"{'; ' + note if note else ''})")
                pts.append((T, st["median"]))
                prev = (T, st["median"])
                RESULTS["scaling"].append(rec)
            if len(pts) >= 2:
                x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
                slope = float(np.polyfit(x, y, 1)[0])
                log(f"    fitted exponent: time ~ T^{slope:.2f} over T = {pts[0][0]}..{pts[-1][0]}")
                RESULTS["scaling"].append({"layer": kind, "dtype": dtype, "exponent": slope,
                                           "T_range": [pts[0][0], pts[-1][0]]})
            del model
    save_json(args.json)


# --------------------------------------------------------------------------------------- main
def main():
    host.reexec_with_huge_pages()  # first: huge pages for XLA's host buffers (gptoss_jax/host.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small repeats, T up to 2048, no 131k (~2-3 min)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--json", default=None,
                    help="write every figure to this JSON record (with its command, UTC date and CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3, quick 2)")
    ap.add_argument("--cap", type=float, default=None,
                    help="skip a case whose predicted single run exceeds this many seconds (default 90, quick 10)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed runs per case before repeats are cut (to >= 2) (default 40, quick 6)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for HF and the reference (default: torch's own, one per core)")
    ap.add_argument("--scaling-dtypes", default="float32", help="dtypes of the scaling section, e.g. float32,bfloat16")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.cap = args.cap or (10.0 if args.quick else 90.0)
    args.budget = args.budget or (6.0 if args.quick else 40.0)
    args.scaling_dtypes = [d.strip() for d in args.scaling_dtypes.split(",")]

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = gj.tiny(**BENCH)
    RESULTS.update(provenance=provenance(), config=BENCH, args=vars(args), env={
        "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.processor() or
        platform.machine(), "jax_backend": jax.default_backend(),
        "huge_pages": host.huge_pages_requested()})
    log(f"config: {BENCH}")
    log(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
        f"{mem_available() / GiB:.1f} GiB free, malloc huge pages {'on' if host.huge_pages_requested() else 'off'}; sections {','.join(only)}{' (quick)' if args.quick else ''}")
    if "bounds" in only:
        section_bounds(args)
    else:
        log(f"\n== bounds not selected: measuring them quickly for the % columns {elapsed()}")
        quick_args = argparse.Namespace(**{**vars(args), "quick": True})
        RESULTS["bounds"] = measure_bounds(quick_args, quiet=True)
        pk = peaks()
        log(f"  fp32 {pk['float32'] / 1e9:.1f} GFLOP/s, bf16 {pk['bfloat16'] / 1e9:.1f} GFLOP/s, "
            f"{pk['bandwidth'] / 1e9:.2f} GB/s")
    save_json(args.json)
    models = Models(cfg)
    for sec in SECTIONS[1:]:
        if sec not in only:
            continue
        try:
            if sec == "scaling":
                section_scaling(args)
            else:
                globals()[f"section_{sec}"](args, models)
        except Exception:  # noqa: BLE001  a failing section must not lose the others
            log(f"  section {sec} failed:\n{traceback.format_exc()}")
            RESULTS.setdefault("errors", {})[sec] = traceback.format_exc()
        save_json(args.json)
    RESULTS["wall_seconds"] = time.perf_counter() - T0
    save_json(args.json)
    log(f"\ndone in {time.perf_counter() - T0:.0f} s" + (f"; figures written to {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()

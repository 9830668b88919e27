"""Page faults and time of the benchmark model's prefill and training step, with and without
glibc's huge-page tunable, and the training step's skip logic two ways (where vs cond).

    .venv/bin/python experiments/2026-12-02-host-memory/huge_pages.py

Runs itself twice in subprocesses (GPTOSS_HUGE_PAGES=0 without the tunable; GLIBC_TUNABLES with
it), each timing: a jitted forward of scripts/bench.py's BENCH config (fp32, dense experts, all
logits) at 1 x 2048 and 1 x 8192; the trainer's step at 4 x 512 (AdamW, clipping); and the
optimizer update alone over the model's 61M fp32 parameters, as the trainer did it before
(`jnp.where(finite, new, old)` over the parameter and moment trees) and as it does now
(`lax.cond(finite, update, keep)`). Minor page faults per call come from getrusage.
"""

import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure():
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import gptoss_jax as gj
    from gptoss_jax.train.step import OptimConfig, make_optimizer, make_trainer
    from profile_prefill import BENCH, median_ms

    def timed(fn, args, repeats):
        f0 = faults()
        ms = median_ms(fn, args, repeats)  # one warm-up call + repeats
        return ms, (faults() - f0) / (repeats + 1)

    cfg = gj.tiny(**BENCH)
    model = gj.init(cfg, seed=0, dtype=jnp.float32, experts="dense")
    rng = np.random.default_rng(1)
    gd, st = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(gd, st)(t).logits)
    out = {}
    for T in (2048, 8192):
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        jax.block_until_ready(fwd(st, tokens))  # compile
        out[f"prefill 1 x {T}"] = timed(fwd, (st, tokens), 3)

    opt = make_optimizer(OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10_000))
    trainer = make_trainer(model, opt)
    state = [trainer.init(model)]
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 512)), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": jnp.ones((4, 512), jnp.int32)}

    def step():
        state[0], m = trainer.step(state[0], batch)
        return m["loss"]
    jax.block_until_ready(step())  # compile
    out["train step 4 x 512"] = timed(lambda: step(), (), 5)

    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32) * 1e-3, params)

    def where_update(s, g):
        p, o = s
        finite = jnp.isfinite(optax.tree.norm(g))
        u, o2 = opt.update(g, o, p)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        return keep(optax.apply_updates(p, u), p), keep(o2, o)

    def cond_update(s, g):
        def apply(p, o, g):
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o
        return jax.lax.cond(jnp.isfinite(optax.tree.norm(g)), apply, lambda p, o, g: (p, o), *s, g)

    for name, fn in (("optimizer update, where", where_update), ("optimizer update, cond", cond_update)):
        f = jax.jit(fn, donate_argnums=(0,))
        master = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
        box = [(master, opt.init(master))]

        def run(f=f, box=box):
            box[0] = f(box[0], grads)
            return box[0]
        out[name] = timed(lambda: run(), (), 7)
    print(json.dumps(out))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return measure()
    results = {}
    for label, change in (("4 KiB pages", {"GPTOSS_HUGE_PAGES": "0"}),
                          ("huge pages", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GPTOSS_HUGE_PAGES")}
        env.update(change)
        print(f"running with {label} ...", flush=True)
        res = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                             check=True)
        results[label] = json.loads(res.stdout.strip().splitlines()[-1])
    a, b = results["4 KiB pages"], results["huge pages"]
    print(f"{'':28s} {'4 KiB pages':>24s} {'huge pages':>24s} {'speed-up':>9s}")
    for k in a:
        print(f"{k:28s} {a[k][0]:9.0f} ms {a[k][1]:9.0f} faults {b[k][0]:9.0f} ms {b[k][1]:9.0f} faults "
              f"{a[k][0] / b[k][0]:8.2f}x")


if __name__ == "__main__":
    main()

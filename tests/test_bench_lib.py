"""gptoss_jax.bench: the timer, the FLOP model, the random checkpoint writer, the JSON records, the
phases of the 20b benchmark (`full_size`) and the pieces of the profile scripts (`pieces`,
`prefill_pieces`, `decode_pieces`); and `sampling.prefill`, the public prefill that the 20b
benchmark times."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax import moe as moe_lib
from gptoss_jax import safetensors_io, sampling
from gptoss_jax.bench import decode_pieces, flops, full_size, peaks, pieces, prefill_pieces, records, timing, weights
from gptoss_jax.cache import init_cache
from gptoss_jax.config import FULL, SLIDING


class FakeClock:
    """A clock that only moves when the timed function runs: each call takes the next duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self):
        return self.now

    def fn(self):
        self.calls += 1
        self.now += self.durations.pop(0)


def test_timer_leaves_out_the_warmup():
    c = FakeClock([100.0, 1.0, 3.0, 2.0])  # a slow first (compiling) call
    assert timing.seconds(c.fn, 3, warmup=1, clock=c) == [1.0, 3.0, 2.0]
    assert c.calls == 4
    c = FakeClock([100.0, 1.0, 3.0, 2.0])
    assert timing.median(c.fn, 3, clock=c) == 2.0
    c = FakeClock([100.0, 1.0, 3.0, 2.0])
    assert timing.best(c.fn, 3, clock=c) == 1.0
    # control: without the warm-up the slow call is a sample
    c = FakeClock([100.0, 1.0, 3.0, 2.0])
    assert timing.median(c.fn, 4, warmup=0, clock=c) == 2.5
    assert timing.stats([100.0, 1.0, 3.0, 2.0]) == {"median": 2.5, "min": 1.0, "max": 100.0, "n": 4}


def test_capped_cuts_repeats_to_the_budget():
    c = FakeClock([2.0] * 10)
    ts, note = timing.capped(c.fn, 5, cap=10, budget=4.5, clock=c)  # 4.5 s holds 2 runs of 2 s
    assert ts == [2.0, 2.0] and note == "2 of 5 repeats (time budget)"
    c = FakeClock([20.0] + [1.0] * 10)
    ts, note = timing.capped(c.fn, 5, cap=10, budget=100, clock=c)  # the warm-up alone is over the cap
    assert ts == [20.0] and "warm-up" in note and c.calls == 1
    c = FakeClock([1.0] * 10)  # control: within budget, every repeat runs
    assert timing.capped(c.fn, 3, cap=10, budget=100, clock=c) == ([1.0, 1.0, 1.0], "")


def test_mean_keys_counts_the_visible_keys():
    for T, W in ((1, 4), (5, 2), (7, 7), (9, 4), (16, None)):
        brute = np.mean([min(t, W or t) for t in range(1, T + 1)])
        assert flops.mean_keys(T, W) == pytest.approx(brute)


@pytest.mark.parametrize("layer", [FULL, SLIDING])
def test_forward_flops_of_one_layer_by_hand(layer):
    cfg = gj.tiny(num_layers=1, layer_types=(layer,), sliding_window=2)
    T = 4
    D, N, K, H = 64, 4, 2, 16
    E, k, F, V = 8, 2, 64, 512
    assert (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (D, N, K, H)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_dim, cfg.vocab_size) == (E, k, F, V)
    per_token = (
        2 * D * N * H
        + 2 * D * K * H * 2
        + 2 * N * H * D  # q, k and v, out
        + 2 * D * E  # router
        + k * (2 * D * 2 * F + 2 * F * D)  # k experts: gate/up, down
        + 2 * D * V
    )  # unembedding
    keys = [1, 2, 3, 4] if layer == FULL else [1, 2, 2, 2]  # window 2 on the sliding layer
    by_hand = per_token + sum(2 * 2 * N * H * n for n in keys) / T  # QK^T and PV per visible key
    assert flops.forward_flops_per_token(cfg, T) == pytest.approx(by_hand)
    # last-token logits only: the unembedding is spread over the T tokens
    assert flops.forward_flops_per_token(cfg, T, all_logits=False) == pytest.approx(by_hand - 2 * D * V * (1 - 1 / T))
    # control: a longer sequence changes only the attention term (mean keys 4.5 / 15/8 at T = 8)
    mean8 = 4.5 if layer == FULL else 15 / 8
    assert flops.forward_flops_per_token(cfg, 8) == pytest.approx(per_token + 2 * 2 * N * H * mean8)
    assert flops.forward_flops_per_token(cfg, 8) != pytest.approx(by_hand)


def test_random_checkpoint_loads_with_the_expected_tensors(tmp_path):
    cfg = gj.tiny()
    rec = weights.recipe(seed=3)
    plan = weights.plan_tensors(cfg)
    shards = weights.split_shards(plan, 2e5)  # several shards for a ~0.5 MB model
    assert len(shards) > 1
    out = str(tmp_path / "ckpt")
    weights.write_checkpoint(out, cfg, shards, rec, align=64, progress=False)

    names = {n: s for n, s, _ in plan}
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert names["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (8, 2 * 64, 64 // 32, 16)
    assert names["model.embed_tokens.weight"] == (512, 64)
    seen = {}
    for fn, ts in shards:
        f = safetensors_io.SafetensorsFile(os.path.join(out, fn))
        assert f._base % 64 == 0  # the data section starts 64-byte aligned
        for name, shape, dtype in ts:
            seen[name] = f.get(name)
            assert f.shape(name) == shape and f.dtype(name) == dtype
    assert set(seen) == set(names)
    lo, hi = rec["scales"]
    scales = seen["model.layers.1.mlp.experts.down_proj_scales"]
    assert scales.min() >= lo and scales.max() <= hi
    assert np.all(seen["model.layers.0.input_layernorm.weight"].astype(np.float32) == 1.0)
    w = seen["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    assert 0.01 < w.std() < 0.04

    model = gj.load(out, dtype="bfloat16")
    assert model.experts == "mxfp4" and model.cfg == cfg
    assert gj.parameter_bytes(model) > 0
    assert weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), rec, 64) == (True, "complete")
    # controls: another recipe, or a header written with another alignment, is not reused
    assert not weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), weights.recipe(seed=4), 64)[0]
    assert not weights.existing_checkpoint_ok(out, shards, weights.hf_config(cfg), rec, 8)[0]


def test_shard_header_is_the_safetensors_header_at_alignment_8(tmp_path):
    arrays = {"a": np.zeros((3, 5), np.uint8), "b": np.ones((7,), weights.BF16)}
    path = tmp_path / "x.safetensors"
    safetensors_io.save_file(arrays, path, metadata={"format": "pt"})
    head = weights.shard_header([(k, v.shape, v.dtype) for k, v in sorted(arrays.items())], align=8)
    assert path.read_bytes()[: len(head)] == head
    assert len(weights.shard_header([("a", (3, 5), np.dtype(np.uint8))], align=64)) % 64 == 0


def test_random_values_depend_on_seed_and_name_only():
    a = weights.random_array("x.weight", (4, 8), weights.BF16, weights.recipe(seed=1))
    b = np.concatenate(list(weights.chunks("x.weight", (4, 8), weights.BF16, weights.recipe(seed=1), chunk_bytes=16)))
    assert np.array_equal(a.reshape(-1), b)  # chunking does not change the values
    assert not np.array_equal(a, weights.random_array("y.weight", (4, 8), weights.BF16, weights.recipe(seed=1)))
    assert not np.array_equal(a, weights.random_array("x.weight", (4, 8), weights.BF16, weights.recipe(seed=2)))


def test_record_written_whole_with_provenance(tmp_path):
    path = tmp_path / "sub" / "rec.json"
    records.write({"provenance": records.provenance(), "x": np.float32(1.5)}, path)
    rec = json.loads(path.read_text())
    assert rec["x"] == 1.5 and set(rec["provenance"]) == {"command", "date_utc", "cpu", "environment"}
    assert os.listdir(path.parent) == ["rec.json"]  # no temporary left beside it


def test_public_prefill_logits_are_each_prompts_last():
    model = gj.init(gj.tiny(), seed=0, dtype="float32")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]  # the short row is padded inside the chunks
    _, logits = sampling.prefill(model, prompts, init_cache(model.cfg, 2, 8, model.dtype), prefill_chunk=2)
    # a causal forward of [7, 8, ...] at position 1 sees only 7 and 8
    full = model(jnp.asarray([prompts[0], [7, 8, 9, 10, 11]], jnp.int32)).logits
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[0, 4]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(full[1, 1]), rtol=1e-4, atol=1e-4)
    # control: not the logits of the padded row's last position
    assert not np.allclose(np.asarray(logits[1]), np.asarray(full[1, 4]), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ bench_20b's phases (full_size)
def test_read_rate_counts_the_bytes_read():
    # 64 MiB read in well under a second on any machine this runs on, well over 100 MB/s
    rate = peaks.read_rate(64 * 2**20, 3)
    assert 1e8 < rate < 1e13


def test_decode_timing_and_roofline_by_hand():
    timed = {"wall_s": 1.0, "tokens": [1, 2, 3, 4]}
    t = full_size.decode_timing(timed, [0.3, 0.2], 4)
    assert t["prefill_s"] == 0.2 and t["prefill_runs_s"] == [0.3, 0.2]  # the faster prefill
    assert t["decode_s"] == pytest.approx(0.8) and t["decode_tokens_per_s"] == pytest.approx(5.0)
    assert t["ms_per_token"] == pytest.approx(200.0)
    assert "prefill_s" not in timed  # the run's own record is left as it was
    r = full_size.roofline(100.0, 10.0, 5.0)
    assert r == {
        "bandwidth_bytes_per_s": 100.0,
        "bound_tokens_per_s": 10.0,
        "achieved_tokens_per_s": 5.0,
        "achieved_fraction": 0.5,
        "achieved_bytes_per_s": 50.0,
    }
    r = full_size.roofline(100.0, 10.0, 5.0, read_bytes_per_s=80.0)  # 5 tok/s x 10 B of 80 B/s read
    assert r["read_bound_tokens_per_s"] == 8.0 and r["achieved_fraction_of_read_bound"] == pytest.approx(0.625)
    gib16 = 16 * 2**30
    assert full_size.peak_rss({"memory": {"after prefill alone": {"VmHWM": gib16}}})["peak_rss_goal_met"]
    assert not full_size.peak_rss({"memory": {"after prefill alone": {"VmHWM": gib16 + 1}}})["peak_rss_goal_met"]


def test_run_records_an_error_only_where_asked(tmp_path):
    path = str(tmp_path / "out" / "rec.json")
    run = full_size.Run(full_size.header("tiny", "ckpt", path, {}), path, 2**40, 0, watch=False)
    with pytest.raises(ValueError), run.phase("load", record_error=True):
        raise ValueError("boom")
    assert run.watch.phase == "load"
    rec = json.loads(open(path).read())
    assert rec["error"]["phase"] == "load" and "boom" in rec["error"]["error"]
    assert os.path.basename(rec["error"]["where"]).startswith("test_bench_lib.py:")  # where it was raised
    del run.report["error"]
    with pytest.raises(ValueError), run.phase("write"):  # control: not recorded
        raise ValueError("boom")
    assert "error" not in run.report and run.watch.phase == "write"
    s = run.snapshot("x")
    assert run.report["memory"]["x"] is s and s["VmRSS"] > 0 and "MemAvailable" in s


def test_checkpoint_phase_writes_then_reuses(tmp_path, capsys):
    cfg, out, rec = gj.tiny(), str(tmp_path / "ckpt"), weights.recipe(seed=5)
    path = str(tmp_path / "rec.json")
    run = full_size.Run(full_size.header("tiny", out, path, rec), path, 2**40, 0, watch=False)
    first = full_size.checkpoint(run, cfg, out, rec, shard_gb=2e-4, align=64, rewrite=False)
    assert first["write_s"] is not None and len(first["shards"]) > 1
    assert first["checkpoint_bytes"] == sum(s["bytes"] for s in first["shards"])
    assert all(s["data_offset_mod_64"] == 0 for s in first["shards"])
    assert sorted(s["file"] for s in first["shards"]) == sorted(
        n for n in os.listdir(out) if n.endswith(".safetensors")
    )
    again = full_size.checkpoint(run, cfg, out, rec, shard_gb=2e-4, align=64, rewrite=False)
    assert again["write_s"] is None and "reusing the complete checkpoint" in capsys.readouterr().out
    # controls: --rewrite, and another recipe, write again
    assert full_size.checkpoint(run, cfg, out, rec, shard_gb=2e-4, align=64, rewrite=True)["write_s"] is not None
    other = weights.recipe(seed=6)
    assert full_size.checkpoint(run, cfg, out, other, shard_gb=2e-4, align=64, rewrite=False)["write_s"] is not None
    # at alignment 8 the offsets are those of the safetensors library's header
    rows = full_size.shard_rows(weights.split_shards(weights.plan_tensors(cfg), 2e-4 * 1e9), 8)
    assert any(r["data_offset_mod_64"] != 0 for r in rows)


def test_summary_of_a_record():
    mem = {"VmRSS": 2**30, "RssAnon": 2**29, "RssFile": 2**29, "VmHWM": 3 * 2**30}
    watch = {"peak_rss_anon_bytes": 2**30, "peak_rss_file_bytes": 2**30, "min_mem_available_bytes": 2**33}
    run = {"wall_s": 2.0, "tokens": [5, 6], "logprob_min": -3.0, "logprob_max": -1.0, "logprobs_finite": True}
    report = {
        "checkpoint_bytes": 1000,
        "shards": [{}, {}],
        "write_s": None,
        "parameter_bytes": 2000,
        "parameter_count": 3e9,
        "load_s": 1.5,
        "aliased_bytes": 0,
        "prompt": [1, 2, 3, 4],
        "bandwidth": {"bandwidth_bytes_per_s": 1e10},
        "memory": {k: mem for k in ("before load", "after load", "after generate timed", "after prefill alone")}
        | {"watch": watch},
        "generate": {"warmup": dict(run, wall_s=9.0), "timed": full_size.decode_timing(run, [0.5, 1.0], 2)},
        "decode_bytes_per_token": {
            "total": 1e9,
            "kv_cache": 1e6,
            "parts": {"unembed": 1e8, "experts_k": 5e8, "attention": 1e8, "router": 1e6},
        },
        "json_path": "/x.json",
    }
    report["roofline"] = full_size.roofline(1e10, 1e9, report["generate"]["timed"]["decode_tokens_per_s"])
    report |= full_size.peak_rss(report)
    text = full_size.summary(report, gj.tiny(), 2)
    assert "1,000 B in 2 shards (reused)" in text
    assert "prefill           0.50 s for 4 tokens (8.0 tok/s; runs 0.50, 1.00 s)" in text
    assert "decode            1.333 tok/s = 2 tokens in 1.50 s (750 ms/token" in text
    assert "roofline          10.00 tok/s; achieved 1.333 tok/s = 13.3% of the bound" in text
    assert "3.00 GiB (<= 16 GiB goal" in text and "malloc_trim" not in text
    report["write_s"] = 12.0
    report["memory"]["after malloc_trim"] = mem
    text = full_size.summary(report, gj.tiny(), 2)
    assert "written in 12 s" in text and "anonymous after malloc_trim(0) 0.50 GiB" in text


# ------------------------------------------------------------ the profile scripts' pieces
def test_piece_rows_and_lines():
    said = []
    fwd = pieces.FlopPieces(100.0, 1, say=lambda s, **kw: said.append(s))
    row, line = fwd.row("attn", 10.0, 5e8)  # 0.5 GFLOP in 10 ms = 50 GFLOP/s of 100
    assert row == dict(piece="attn", ms=10.0, gflop=0.5, of_peak=pytest.approx(0.5))
    assert line.split()[-4:] == ["GFLOP", "50.0%", "of", "peak"]
    train = pieces.FlopPieces(100.0, 1, train=True)
    assert train.row("attn", 10.0, 5e8)[0]["gflop"] == pytest.approx(1.5)  # forward + backward
    assert fwd.add(row, line) == 10.0 and fwd.rows == [row] and said == [line]
    dec = pieces.BytePieces(10.0, 4, 1)
    row, line = dec.row("head", 2.0, 1e7)  # 10 MB in 2 ms = 5 GB/s of 10
    assert row == dict(piece="head", ms=2.0, bytes=1e7, gbs=pytest.approx(5.0), of_bandwidth=pytest.approx(0.5))
    assert "50.0% of stream" in line
    assert pieces.nbytes({"a": jnp.zeros((3, 4), jnp.bfloat16), "b": [np.zeros(5, np.float32)]}) == 24 + 20


def test_vjp_step_is_the_gradient():
    f = lambda w, x, s: jnp.tanh(x @ w) * s
    w, x, ct = jnp.arange(6.0).reshape(3, 2) / 6, jnp.ones((4, 3)), jnp.arange(8.0).reshape(4, 2)
    gw, gx = pieces.vjp_step(f)(w, x, ct, 2.0)
    rw, rx = jax.grad(lambda w, x: jnp.sum(f(w, x, 2.0) * ct), argnums=(0, 1))(w, x)
    np.testing.assert_allclose(gw, rw, rtol=1e-6)
    np.testing.assert_allclose(gx, rx, rtol=1e-6)
    assert not np.allclose(gw, jax.grad(lambda w: jnp.sum(f(w, x, 1.0) * ct))(w))  # control: extra is used


def test_bucket_capacity_holds_the_largest_group():
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])  # expert 0 chosen 4 times
    largest, cap = prefill_pieces.bucket_capacity(ids, 4, 2, 4)
    caps = moe_lib.bucket_capacities(4, 2, 4)
    assert largest == 4 and cap >= 4 and all(c < 4 for c in caps if c < cap)
    assert prefill_pieces.bucket_capacity(np.array([[0, 1], [2, 3]]), 2, 2, 4)[0] == 1


def test_decode_bytes_and_prediction():
    assert decode_pieces.moe_read_bytes(100, 3300, B=1, k=4, E=32) == 100 + 3200 * 4 // 32
    assert decode_pieces.moe_read_bytes(100, 3300, B=16, k=4, E=32) == 3300  # at most every expert
    ms = {"embed": 1.0, "attention": [2.0, 3.0], "moe": 5.0, "head": 7.0}
    cfg = gj.gpt_oss_20b()  # 24 layers, 12 sliding
    assert decode_pieces.predicted_ms(cfg, ms) == 1.0 + 12 * 2.0 + 12 * 3.0 + 24 * 5.0 + 7.0
    two = dataclasses.replace(cfg, num_layers=2, layer_types=None)
    assert decode_pieces.predicted_ms(two, ms) == 1.0 + 2.0 + 3.0 + 2 * 5.0 + 7.0


class Untimed:
    """A piece that runs each function once (eagerly) and keeps its name, amount and output shape."""

    def __init__(self):
        self.seen = []

    def __call__(self, name, f, weights, x, amount, *extra):
        out = f(weights, x, *extra)
        self.seen.append((name, amount, jax.tree.leaves(out)[0].shape))
        return 1.0


def test_prefill_and_decode_pieces_run_on_the_model():
    model = gj.init(gj.tiny(num_layers=2, layer_types=None), seed=0, dtype="float32", experts="dense")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (1, 8)), jnp.int32)
    piece = Untimed()
    ms = prefill_pieces.layer_pieces(model, tokens, piece, train=True)
    assert set(ms) == {"attention 0", "moe 0", "attention 1", "moe 1", "head"}
    names = [n for n, _, _ in piece.seen]
    assert names.count("  projections only") == 2 and names.count("  routing only") == 1  # per kind / layer 0
    assert ("final norm + unembedding + loss", 8 * flops.unembed_flops(model.cfg), ()) in piece.seen
    assert piece.seen[0][2] == (1, 8, 64)
    piece = Untimed()
    ms = decode_pieces.step_pieces(model, 2, 5, piece)
    assert ms == {"embed": 1.0, "attention": [1.0, 1.0], "moe": 1.0, "head": 1.0}
    assert [n for n, _, _ in piece.seen][1:3] == ["attention (sliding, 6 keys)", "attention (full, 6 keys)"]
    assert all(shape == (2, 1, 64) for _, _, shape in piece.seen)


def test_record_paths_are_relative_inside_the_working_directory(tmp_path, monkeypatch):
    """A record written from the repository shows its paths relative to it; a path outside the
    working directory is kept as given (control)."""
    monkeypatch.chdir(tmp_path)
    head = full_size.header("tiny", str(tmp_path / "runs" / "ckpt"), str(tmp_path / "runs" / "r.json"), {})
    assert (head["checkpoint"], head["json_path"]) == (os.path.join("runs", "ckpt"), os.path.join("runs", "r.json"))
    outside = str(tmp_path.parent / "elsewhere")
    assert full_size.header("tiny", outside, outside + ".json", {})["checkpoint"] == outside


def test_versus_interleaves_and_records_rows_by_hand():
    from gptoss_jax.bench import versus

    calls = []
    fns = {"ours": lambda: calls.append("ours"), "hf": lambda: calls.append("hf")}
    secs = versus.interleaved(fns, 3)
    # rounds alternating which side goes first, each side twice in a row (untimed, then timed)
    assert calls == ["ours"] * 2 + ["hf"] * 4 + ["ours"] * 4 + ["hf"] * 2
    assert {k: len(v) for k, v in secs.items()} == {"ours": 3, "hf": 3}
    rec = versus.row_record("prefill", {"dtype": "float32", "T": 8}, {"ours": [30, 10, 20], "hf": [8, 10, 12]}, 40.0, 1)
    assert rec["ours"]["tokens_per_s"]["median"] == 20 and rec["hf"]["tokens_per_s"]["median"] == 10
    assert rec["ratio"] == 2.0 and rec["ours"]["pct_of_bound"] == 50.0 and rec["hf"]["pct_of_bound"] == 25.0
    assert versus.describe(rec) == "prefill T=8 float32 (2.00x)"
    assert "read_bound_tokens_per_s" not in rec and "pct_of_read_bound" not in rec["ours"]
    assert "read-only" not in versus.line(rec)
    # a decode row also against the read-only rate's bound, when the run measured it
    dec = versus.row_record("decode", {"dtype": "float32", "batch": 1}, {"ours": [20], "hf": [10]}, 40.0, 1, 80.0)
    assert dec["ours"]["pct_of_bound"] == 50.0 and dec["ours"]["pct_of_read_bound"] == 25.0
    assert dec["hf"]["pct_of_read_bound"] == 12.5 and dec["read_bound_tokens_per_s"] == 80.0
    assert "read-only bound 80: ours 25.0%" in versus.line(dec)

"""gptoss_jax.demo: the walk-through of `gptoss demo` and the preset sizes of `gptoss info`."""

import io

import gptoss_jax as gj
from gptoss_jax import demo


def test_fmt_bytes():
    assert demo.fmt_bytes(0) == "0 B"
    assert demo.fmt_bytes(1023) == "1023 B"
    assert demo.fmt_bytes(1536) == "1.50 KiB"
    assert demo.fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert demo.fmt_bytes(2**50) == "1024.00 TiB"


def test_preset_info():
    lines = demo.preset_info("20b")
    assert lines[0] == "gpt-oss-20b: 24 layers, 32 experts (top-4), d_model 2880, window 128"
    packed = gj.abstract(gj.gpt_oss_20b(), experts="mxfp4")
    assert lines[1] == f"  parameters       {gj.parameter_count(packed):,}"
    assert len(lines) == 4 and "(bf16 everywhere)" in lines[3]


def test_demo_runs_and_stops_when_the_round_trip_differs(tmp_path, monkeypatch):
    out = io.StringIO()
    assert demo.run(str(tmp_path), seed=1, new_tokens=2, out=out)
    text = out.getvalue()
    for step in range(1, 6):
        assert f"== {step}. " in text
    assert "identical to the in-memory model: True" in text and str(tmp_path / "checkpoint") in text
    monkeypatch.setattr(gj, "load", lambda path: gj.init(demo.config(), seed=2))  # not the model written
    out = io.StringIO()
    assert not demo.run(str(tmp_path), seed=1, new_tokens=2, out=out)
    assert out.getvalue().rstrip().endswith("identical to the in-memory model: False")

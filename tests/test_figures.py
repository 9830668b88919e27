"""The figures quoted in README.md and experiments/BENCHMARKS.md equal their committed records.

scripts/figures.py renders each generated block from JSON records under experiments/; these
tests run its --check logic in-process (no benchmark runs) and show, on copies in tmp_path, that
the check catches a hand-edited digit, a changed record and a removed block.
"""

import copy
import importlib.util
import json
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("figures", os.path.join(ROOT, "scripts", "figures.py"))
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

DOCUMENTS = sorted({doc for doc, _, _ in figures.BLOCKS.values()})


def copy_tree(dst):
    """The documents and every record, at the same relative paths under dst."""
    for rel in DOCUMENTS + [path for path, _ in figures.RECORDS.values()]:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), os.path.join(dst, rel))
    return str(dst)


def block_text(root, name):
    doc = figures.BLOCKS[name][0]
    with open(os.path.join(root, doc)) as f:
        text = f.read()
    start, end = figures.find_blocks(text)[name]
    return doc, text, start, end


def test_every_generated_block_matches_its_records():
    _, problems = figures.compare(ROOT)
    assert problems == [], "\n".join(map(str, problems)) + "\n(run: python scripts/figures.py)"


def test_every_block_is_present_and_holds_figures():
    for name, (doc, _, _) in figures.BLOCKS.items():
        _, text, start, end = block_text(ROOT, name)
        assert re.search(r"\d", text[start:end]), f"{doc}: block {name!r} holds no figure"


def test_check_names_a_block_with_one_digit_edited(tmp_path, capsys):
    root = copy_tree(tmp_path)
    assert figures.main(["--check", "--root", root]) == 0  # the untouched copy passes
    doc, text, start, end = block_text(root, "bench-summary")
    m = re.search(r"\d", text[start:end])
    i = start + m.start()
    edited = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :]
    with open(os.path.join(root, doc), "w") as f:
        f.write(edited)
    capsys.readouterr()
    assert figures.main(["--check", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "'bench-summary' differs" in out
    assert out.count("differs") == 1, out  # only the edited block
    # rewriting restores the rendering, and the check passes again
    assert figures.main(["--root", root]) == 0
    assert figures.main(["--check", "--root", root]) == 0
    with open(os.path.join(root, doc)) as f:
        assert f.read() == text


def test_check_names_the_blocks_of_a_changed_record(tmp_path):
    root = copy_tree(tmp_path)
    path = os.path.join(root, figures.RECORDS["prefill_train"][0])
    with open(path) as f:
        record = json.load(f)
    [ours] = [r for r in record["train"] if r["impl"].startswith("ours")]
    ours["tokens_per_s"]["median"] *= 1.25  # one figure of the record, as a stale record would differ
    with open(path, "w") as f:
        json.dump(record, f)
    _, problems = figures.compare(root)
    assert {p.kind for p in problems} == {"differs"}
    named = {p.block for p in problems}
    # every block that quotes the training step (its ratio to HF, its share of the bound)
    assert {"checked-measured", "bench-summary", "bench-table", "bench-status"} <= named, problems
    assert "bench-scaling" not in named  # renders from the other record only


def test_check_reports_a_missing_block(tmp_path):
    root = copy_tree(tmp_path)
    doc, text, start, end = block_text(root, "bench-scaling")
    opening = text.rfind("<!--", 0, start)
    closing = end + len(figures.CLOSE)
    with open(os.path.join(root, doc), "w") as f:
        f.write(text[:opening] + text[start:end] + text[closing:])  # markers removed, text kept
    _, problems = figures.compare(root)
    assert [str(p) for p in problems] == [f"{doc}: block 'bench-scaling' is missing"]


@pytest.mark.parametrize("name", sorted({r for _, needs, _ in figures.BLOCKS.values() for r in needs}))
def test_each_record_exists_and_carries_command_date_cpu(name):
    path, has_provenance = figures.RECORDS[name]
    with open(os.path.join(ROOT, path)) as f:
        record = json.load(f)
    if name == "compile":  # rows written before provenance existed: each names its own command
        assert not has_provenance  # (the table script's, or the `gptoss compile` line that wrote the row)
        assert record and all(
            r["command"].startswith(("python scripts/compile_targets.py", "gptoss compile ")) for r in record
        )
        return
    assert has_provenance
    p = record["provenance"]
    # a script of the package, or a dated experiment's own script
    assert re.fullmatch(r"python (scripts|experiments/[\w-]+)/\w+\.py( .*)?", p["command"]), p["command"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["date_utc"]), p["date_utc"]
    assert p["date_utc"][:10] in path  # the dated folder holds the run of that day
    assert p["cpu"]["model"] and p["cpu"]["cores"] >= 1 and isinstance(p["cpu"]["isa"], list)
    if "--json" in p["command"]:
        assert p["command"].split("--json ")[1].split()[0] == path  # the command wrote this file


def test_versus_block_sets_decoding_beside_the_read_rate_where_the_record_has_it():
    with open(os.path.join(ROOT, figures.RECORDS["versus"][0])) as f:
        record = json.load(f)
    bare = copy.deepcopy(record)  # as a record from before the read-only rate: no sentence
    bare["bounds"]["bandwidth"].pop("read", None)
    for r in bare["versus"]:
        r.pop("read_bound_tokens_per_s", None)
    assert "reads alone" not in figures.render_versus({"versus": bare})
    record["bounds"]["bandwidth"]["read"] = 40.0e9
    for r in record["versus"]:
        if r["row"] == "decode":
            r["read_bound_tokens_per_s"] = 1.0
            r["ours"]["pct_of_read_bound"] = 61.4 if r["batch"] == 1 else 50.0
            r["hf"]["pct_of_read_bound"] = 12.0
    text = " ".join(figures.render_versus({"versus": record}).split())  # lines joined
    assert "reads alone in the same run (40.0 GB/s, a jitted max)" in text
    assert "61% (decode B=1 fp32)" in text and "50% (decode B=8 bf16)" in text

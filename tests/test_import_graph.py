"""The package's imports form a DAG, with no package import inside a function (scripts/import_graph.py)."""

import importlib.util
import os
import re

_spec = importlib.util.spec_from_file_location(
    "import_graph", os.path.join(os.path.dirname(__file__), "..", "scripts", "import_graph.py")
)
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def _package(root, files: dict):
    for rel, text in files.items():
        path = os.path.join(root, import_graph.PACKAGE, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


def test_the_package_is_a_dag_without_function_level_imports(capsys):
    assert import_graph.main(["--check"]) == 0, capsys.readouterr().out
    assert ", 0 cycles" in capsys.readouterr().out


def test_a_cycle_and_a_function_level_import_fail_the_check(tmp_path, capsys):
    clean = _package(tmp_path / "clean", {"__init__.py": "", "a.py": "from gptoss_jax import b\n", "b.py": "x = 1\n"})
    assert import_graph.main(["--check", "--root", clean]) == 0  # control: a DAG passes
    looped = _package(
        tmp_path / "loop",
        {"__init__.py": "", "a.py": "from gptoss_jax import b\n", "b.py": "def f():\n    from gptoss_jax import a\n"},
    )
    assert import_graph.main(["--check", "--root", looped]) == 1
    out = capsys.readouterr().out
    assert "cycle: gptoss_jax.a -> gptoss_jax.b -> gptoss_jax.a" in out and "inside functions: gptoss_jax.a" in out
    inner = _package(
        tmp_path / "inner", {"__init__.py": "", "a.py": "def f():\n    from gptoss_jax import b\n", "b.py": "x = 1\n"}
    )
    assert import_graph.main(["--check", "--root", inner]) == 1  # no cycle, but an import inside a function


def _layout_order():
    """The top-level modules and subpackages in the order the README's Layout section lists them."""
    readme = open(os.path.join(import_graph.ROOT, "README.md")).read()
    block = readme[readme.index("## Layout") :]
    block = block[block.index("gptoss_jax/") : block.index("\nnotebooks/")]
    return [m.group(1) for m in re.finditer(r"^  (\w+?)(?:\.py|/)\s", block, re.M)]


def test_the_readme_layout_lists_the_package_in_import_order():
    """A reader going down the Layout section meets every module after the modules it imports."""
    order = _layout_order()
    graph = import_graph.imports()
    top = {m.split(".")[1] for m in graph if m.count(".") >= 1}
    assert top <= set(order) | {"inspect_report"}, sorted(top - set(order))  # every module is listed
    rank = lambda mod: order.index({"inspect_report": "inspect"}.get(mod.split(".")[1], mod.split(".")[1]))
    upward = [
        (mod, dep)
        for mod, edges in graph.items()
        if mod != import_graph.PACKAGE
        for dep in edges["top"]
        if dep != import_graph.PACKAGE and rank(dep) > rank(mod)
    ]
    assert upward == [], upward
    swapped = order[:]
    i, j = swapped.index("atomic"), swapped.index("safetensors_io")
    swapped[i], swapped[j] = swapped[j], swapped[i]  # control: safetensors_io imports atomic
    assert any(
        swapped.index(d.split(".")[1]) > swapped.index(m.split(".")[1])
        for m, e in graph.items()
        if m == "gptoss_jax.safetensors_io"
        for d in e["top"]
    )

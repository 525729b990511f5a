"""The code's shape, checked: no import circles (lazy imports included), one naming scheme for subcommands,
the model file free of distributed/CLI code, and the one training loop made of short functions."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "tinyllama"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_even_through_lazy_imports():
    mods = _modules()
    edges = {m: {t for t in _imports(f) if t in mods and t not in (m, "tinyllama")} for m, f in mods.items()}
    assert _cycles(edges) == []
    # the detector itself finds a circle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_subcommands_live_in_one_package():
    from tinyllama.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module == f"tinyllama.cli.{name}"
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run)
    stray = [f for f in PKG.rglob("*.py") if f.name == "cli.py" or f.name.endswith("_cli.py") and f.name != "lm_eval_cli.py"]
    assert stray == [] and not (PKG / "commands").exists()


def test_model_file_knows_nothing_of_distribution_or_the_command_line():
    imports = _imports(PKG / "model.py")
    assert not {i for i in imports if i.startswith(("torch.distributed", "tinyllama.train", "tinyllama.cli",
                                                    "tinyllama.kernels", "argparse", "os", "subprocess"))}


@pytest.mark.parametrize("module", ["train/loop.py", "train/trainer.py", "finetune/trainer.py"])
def test_loop_functions_are_short(module):
    tree = ast.parse((PKG / module).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def test_install_hints_name_this_distribution_and_its_extras():
    """Every `pip install '...[extra]'` in messages and the README names the distribution on the package index
    (`tinyllama` there is another project) and an extra that pyproject.toml declares."""
    import re
    import tomllib

    from tinyllama.errors import DISTRIBUTION, pip_extra

    project = tomllib.loads((PKG.parents[1] / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION != "tinyllama"
    assert "tinyllama" in project["scripts"]
    extras = set(project["optional-dependencies"])
    used = set()
    for f in [*PKG.rglob("*.py"), PKG.parents[1] / "README.md", PKG.parents[1] / "BENCHMARKS.md"]:
        text = f.read_text()
        assert "'tinyllama[" not in text, f
        used |= set(re.findall(r"pip_extra\(['\"](\w+)['\"]\)", text))
        used |= set(re.findall(rf"{DISTRIBUTION}\[(\w+)\]", text))
    assert used and used <= extras, used - extras
    assert pip_extra("serve") == f"pip install '{DISTRIBUTION}[serve]'"

"""The layering rule of torch_backend/ (docs/status.md "Layers"), checked over the import graph:

    cli -> experiments -> jobs -> training -> models -> data / parallel / objectives -> core

Every module under torch_backend/ is parsed with `ast` (imports inside functions count too), each
is mapped to its layer by its path, and every `mugv.torch_backend.*` import must point to the
same package or to a layer further down. Nothing imports the CLI; no job imports an experiment;
the three bottom packages do not import each other; the production package imports neither the
JAX oracle nor the tests. A failure names the file, the line and the import.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "torch_backend"

# Higher imports lower; the same rank (the three bottom packages) does not import across.
RANK = {"cli": 6, "experiments": 5, "jobs": 4, "training": 3, "models": 2,
        "data": 1, "parallel": 1, "objectives": 1}
# The objectives layer: the torch mechanics of core's formula families, one module each (the same
# names as core/ and jax_reference/); they may import each other.
OBJECTIVES = ("flow", "preference", "sampler")
FORBIDDEN = ("mugv.parity_tests", "mugv.jax_reference")


def layer_of(parts: list[str]) -> str | None:
    """'jobs' for ['jobs', 'pretrain'], 'objectives' for ['flow'], None for the package root."""
    if not parts or parts == ["__init__"]:
        return None
    return "objectives" if parts[0] in OBJECTIVES else parts[0]


def module_parts(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(tree: ast.AST, parts: list[str]):
    """(line, dotted module) for every import of the file, `from a import b` as both a.b and a
    (b may be a module or a name; the layer check only needs the first component under
    torch_backend, which is the same unless a is the package root)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this module's package
                base = ["mugv", "torch_backend", *parts[:len(parts) - node.level]]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "mugv.torch_backend":
                for alias in node.names:
                    yield node.lineno, f"{mod}.{alias.name}"
            else:
                yield node.lineno, mod


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = module_parts(path)
        here = layer_of(parts)
        rel = path.relative_to(ROOT.parent)
        if here is None:
            continue
        if here not in RANK:
            found.append(f"{rel}: not in a layer (expected under one of {sorted(RANK)})")
            continue
        for line, mod in imported_modules(ast.parse(path.read_text(), str(path)), parts):
            if mod.startswith(FORBIDDEN):
                found.append(f"{rel}:{line} imports {mod}: production code imports neither the tests nor the JAX oracle")
                continue
            if not mod.startswith("mugv.torch_backend."):
                continue
            there = layer_of(mod.split(".")[2:])
            if there == here:
                continue
            if there not in RANK:
                found.append(f"{rel}:{line} imports {mod}: not in a layer")
            elif RANK[there] >= RANK[here]:
                found.append(f"{rel}:{line} imports {mod}: {here} may not import {there} "
                             f"(cli -> experiments -> jobs -> training -> models -> data / parallel / objectives)")
    return found


def test_every_import_points_down_the_layers():
    bad = violations()
    assert not bad, "layering rule broken:\n  " + "\n  ".join(bad)


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: an upward import inside a function is reported with file and line."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.py").write_text("def f():\n    from mugv.torch_backend.cli import main\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "bad.py").write_text("from mugv.torch_backend.experiments import demo\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    bad = violations()
    assert any("data/bad.py:2 imports mugv.torch_backend.cli" in b and "data may not import cli" in b for b in bad), bad
    assert any("jobs/bad.py:1" in b and "jobs may not import experiments" in b for b in bad), bad

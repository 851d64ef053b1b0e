"""The package layers hold (issue 13): read from the source with ``ast``, so a lazy import inside a
function counts as much as one at the top.

    hooocus (the product CLI)
       |            |
    hooocus_ws   hooocus_mcp      the front doors: neither imports the other, nor the CLI above
       \\            /
         engine                   never imports a front door or the CLI
         engine/core              family-neutral: no engine.sdxl / engine.io / engine.prompts / torch
                                  at module level

Two kinds of file are allowed an upward import, each named here with its reason:

- ``hooocus_ws/__main__.py`` and ``hooocus_mcp/__main__.py`` are launchers (``python -m ...``) that
  hand the command line to ``hooocus.cli.main``; nothing imports a ``__main__`` module, so they
  cannot close a cycle.
- ``engine/core/testing.py`` (the FakeRunner, a stand-in for the SDXL runner) reads the SDXL
  performance table ``engine.sdxl.modes`` for its step counts rather than copying the numbers;
  that module is pure data on top of engine.core (checked below, and torch stays out of every
  engine.core import: :func:`test_importing_engine_core_loads_no_torch`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "hooocus", "hooocus_ws", "hooocus_mcp")

#: (importing file, imported top package or module prefix) pairs that are allowed, with the reason above.
ALLOWED = {
    ("hooocus_ws/__main__.py", "hooocus"),
    ("hooocus_mcp/__main__.py", "hooocus"),
    ("engine/core/testing.py", "engine.sdxl.modes"),
}

#: package (path prefix) -> module prefixes it must never import, anywhere in a file.
FORBIDDEN_ANYWHERE = {
    "engine/": ("hooocus", "hooocus_ws", "hooocus_mcp"),
    "hooocus_ws/": ("hooocus_mcp", "hooocus"),
    "hooocus_mcp/": ("hooocus_ws", "hooocus"),
    # the two model families stand side by side on engine.core/prompts/imaging/io (issue 17)
    "engine/flux/": ("engine.sdxl",),
    "engine/sdxl/": ("engine.flux",),
    # Enhance's mask models (issue 16) are family-neutral, like engine/describe
    "engine/masking/": ("engine.sdxl", "engine.flux"),
}
#: package -> module prefixes it must not import at module level (a lazy import in a function is
#: the documented way to reach the heavy family code, e.g. engine.core.runtime -> SDXLRunner).
FORBIDDEN_AT_MODULE_LEVEL = {
    "engine/core/": ("engine.sdxl", "engine.io", "engine.prompts", "torch"),
    # The distributed backends are family-neutral too, and Ray is an optional extra: a replica
    # reaches the SDXL runner, and every function reaches ray, lazily (issue 15).
    "engine/distributed/": ("engine.sdxl", "engine.io", "engine.prompts", "torch", "ray"),
    # the mask models load only when a mask is made
    "engine/masking/": ("torch", "transformers", "onnxruntime", "cv2"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_import(call: ast.Call) -> str:
    """The module of ``__import__("x")`` / ``importlib.import_module("x")`` with a literal name, else ''."""
    func = call.func
    named = (isinstance(func, ast.Name) and func.id == "__import__") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module")
    if named and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return ""


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports, with True when the import runs at import time (module level,
    outside functions and ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, at_module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, at_module_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(child, path)
                found.append((module, at_module_level))
                # ``from engine.sdxl import modes`` imports engine.sdxl.modes
                found.extend((f"{module}.{alias.name}", at_module_level) for alias in child.names)
            elif isinstance(child, ast.Call) and _dynamic_import(child):
                found.append((_dynamic_import(child), at_module_level))
                visit(child, at_module_level)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), at_module_level)
            else:
                visit(child, at_module_level)

    visit(tree, True)
    return found


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _allowed(rel: str, module: str) -> bool:
    return any(rel == file and _matches(module, prefix) for file, prefix in ALLOWED)


def _source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def layering_violations() -> list[str]:
    problems = []
    for path in _source_files():
        rel = path.relative_to(REPO).as_posix()
        for module, at_module_level in imports_of(path):
            rules = [prefixes for folder, prefixes in FORBIDDEN_ANYWHERE.items() if rel.startswith(folder)]
            if at_module_level:
                rules += [p for folder, p in FORBIDDEN_AT_MODULE_LEVEL.items() if rel.startswith(folder)]
            for prefixes in rules:
                for prefix in prefixes:
                    if _matches(module, prefix) and not _allowed(rel, module):
                        problems.append(f"{rel} imports {module}")
    return sorted(set(problems))


def test_no_layer_imports_upward_or_across() -> None:
    assert layering_violations() == []


def test_the_import_reader_sees_lazy_relative_and_type_checking_imports(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: without this, a reader that found nothing would pass the test above."""
    package = tmp_path / "hooocus_ws"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import protocol\n"
        "if TYPE_CHECKING:\n    import torch\n"
        "def later():\n    from hooocus_mcp.http import create_mcp_mount\n"
        "cli = __import__('hooocus.cli', fromlist=['main'])\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = imports_of(package / "bad.py")
    assert ("hooocus_ws.protocol", True) in found
    assert ("torch", False) in found and ("hooocus_mcp.http", False) in found
    assert ("typing.TYPE_CHECKING", True) in found and ("hooocus.cli", True) in found


def test_the_real_tree_has_the_imports_the_rules_are_about() -> None:
    """The product CLI joins both doors, and the one allowed core->family import is really there;
    if these disappear, the allowances above are stale and must go."""
    cli = {m for m, _ in imports_of(REPO / "hooocus" / "cli.py")}
    assert any(_matches(m, "hooocus_ws") for m in cli) and any(_matches(m, "hooocus_mcp") for m in cli)
    for file, prefix in ALLOWED:
        assert any(_matches(m, prefix) for m, _ in imports_of(REPO / file)), (file, prefix)
    # engine.sdxl.modes, the one family module core reaches, stands on engine.core alone.
    for module, at_module_level in imports_of(REPO / "engine" / "sdxl" / "modes.py"):
        if at_module_level and module.split(".")[0] in PACKAGES:
            assert _matches(module, "engine.core"), module


def test_the_ray_backend_reaches_ray_and_the_sdxl_runner_only_lazily() -> None:
    """The engine/distributed rule above is about real imports: the Ray backend does import ray and
    the runners (through engine.core.families, which reaches SDXL and Flux), inside functions."""
    found = imports_of(REPO / "engine" / "distributed" / "ray_serve.py")
    assert ("ray", False) in found and ("engine.core.families", False) in found
    families = imports_of(REPO / "engine" / "core" / "families.py")
    assert ("engine.sdxl.pipeline", False) in families and ("engine.flux.runner", False) in families
    assert not any(at_module_level and (_matches(m, "ray") or _matches(m, "torch")) for m, at_module_level in found)


def test_importing_engine_core_loads_no_torch() -> None:
    """What the module-level rule protects: every engine.core (and engine.distributed) module imports
    without torch or ray (the front doors and the CLI's fast paths rely on it). A subprocess, so this test's own imports do
    not count."""
    modules = sorted(_module_name(p) for folder in ("core", "distributed") for p in (REPO / "engine" / folder).glob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

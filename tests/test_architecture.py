"""The package's shape: one-way layers that read like the pipeline, small modules and functions, packaging.

Layers, lowest first; a module may import only from its own layer or lower ones (function-level imports
count too), and the module graph has no cycle:

    errors → graph, files → runtime → converters → load → lower → pairs → rules → check, augment →
    run, cache, forward64 → additivity, explanation, plots, text, timeseries → explainer → integrations →
    support, cli → the package facade
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    ["onnxshap.errors"],
    ["onnxshap.graph", "onnxshap.files"],
    ["onnxshap.runtime"],
    ["onnxshap.converters"],
    ["onnxshap.load"],
    ["onnxshap.lower"],
    ["onnxshap.pairs"],
    ["onnxshap.rules"],
    ["onnxshap.check", "onnxshap.augment"],
    ["onnxshap.run", "onnxshap.cache", "onnxshap.forward64"],
    ["onnxshap.additivity", "onnxshap.explanation", "onnxshap.plots", "onnxshap.text", "onnxshap.timeseries"],
    ["onnxshap.explainer"],
    ["onnxshap.integrations"],
    ["onnxshap.support", "onnxshap.cli"],
    ["onnxshap"],
]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> dict[str, Path]:
    """Module name → file, for the package and the converters folder it installs as onnxshap.converters."""
    found = {}
    for root, package in ((REPO / "onnxshap", "onnxshap"), (REPO / "converters", "onnxshap.converters")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer"
    return layer


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports (resolved to the longest existing module name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import (the package uses absolute imports)"
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_import_goes_down_the_layers():
    upward = [f"{src} → {dst}" for src, targets in GRAPH.items() for dst in targets
              if _layer(dst) > _layer(src) and not src.startswith(dst + ".")]
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_the_module_graph_has_no_cycle():
    """Package facades (``__init__``) may import their own children; anything else going round is a cycle."""
    def edges(src):
        return [dst for dst in GRAPH[src] if not src.startswith(dst + ".")]

    state: dict[str, int] = {}
    stack_path: list[str] = []

    def visit(module):
        state[module] = 1
        stack_path.append(module)
        for dst in edges(module):
            if state.get(dst) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack_path[stack_path.index(dst):] + [dst]))
            if dst not in state:
                visit(dst)
        stack_path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def _has_reason(lines: list[str], line: int, marker: str) -> bool:
    return any(marker in text for text in lines[max(line - 2, 0): line + 1])


def test_modules_and_functions_stay_small():
    """No module over ~400 lines and no function over ~60 without a comment saying why (``# long: ...``)."""
    too_long = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES and not any("# long module:" in text for text in lines[:40]):
            too_long.append(f"{module}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES and not _has_reason(lines, node.lineno, "# long:"):
                    too_long.append(f"{module}.{node.name}: {size} lines")
    assert not too_long, "\n".join(too_long)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_converters_install_inside_the_package(tmp_path):
    """``onnxshap.converters`` imports from anywhere; a top-level ``converters`` is not this project's."""
    done = _python("from onnxshap.converters import export_keras, export_torch; print('ok')", tmp_path)
    assert done.stdout.strip() == "ok", done.stderr
    done = _python("import converters, sys; print(converters.__file__)", tmp_path)
    assert str(REPO) not in done.stdout, f"a top-level 'converters' resolves to this project: {done.stdout}"


def _stages_visited(action, arrays: list[np.ndarray]) -> list[str]:
    """The package functions that receive one of ``arrays`` (directly or as a value of a dict argument, following
    the arrays those dicts hold) while ``action()`` runs, as ``module.function``, up to the first one of the run
    stage; onnxshap.explainer is left out (it wires the stages)."""
    tracked = {id(array) for array in arrays}
    visited: list[str] = []

    def holds(value) -> bool:
        if isinstance(value, dict):
            return any(id(item) in tracked for item in value.values())
        return id(value) in tracked

    def profile(frame, event, _):
        module = frame.f_globals.get("__name__", "")
        if event != "call" or not module.startswith("onnxshap.") or module == "onnxshap.explainer":
            return
        if visited and _layer(visited[-1].rpartition(".")[0]) == _layer("onnxshap.run"):
            return
        arguments = list(frame.f_locals.values())
        if any(holds(value) for value in arguments):
            visited.append(f"{module}.{frame.f_code.co_name}")
            tracked.update(id(item) for value in arguments if isinstance(value, dict) for item in value.values()
                           if isinstance(item, np.ndarray))

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return visited


def test_the_data_flows_down_the_stages_once():
    """The background from ``DeepExplainer(...)`` and the data from ``explain(X)`` each go down
    load → check → lower → augment → run without climbing back to a stage they have left (issue 11)."""
    import onnxshap

    background = np.load(REPO / "models" / "digits_background.npy")
    sample = np.load(REPO / "models" / "digits_sample.npy")[:2]
    made = []
    paths = {"background": _stages_visited(
        lambda: made.append(onnxshap.DeepExplainer(REPO / "models" / "digits_cnn.onnx", background)), [background])}
    paths["data"] = _stages_visited(lambda: made[0].explain(sample), [sample])
    for what, path in paths.items():
        layers = [_layer(function.rpartition(".")[0]) for function in path]
        assert layers and layers[0] == _layer("onnxshap.load") and layers[-1] == _layer("onnxshap.run"), (what, path)
        climbs = [f"{a} → {b}" for a, b, la, lb in zip(path, path[1:], layers, layers[1:]) if lb < la]
        assert not climbs, f"the {what} climbs back up: " + ", ".join(climbs)

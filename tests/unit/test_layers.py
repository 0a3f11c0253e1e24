"""The import rules of docs/architecture.md ("Layers and what each may import"), read from the source.

Every ``import`` statement counts, including those inside functions and under TYPE_CHECKING. A
change that needs a new edge changes this table and the page together. No two modules import each
other, directly or through others (no import cycles, even deferred ones).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dllm_serve

SRC = Path(dllm_serve.__file__).parent
ENTRY_POINTS = {"bench", "commands", "preflight", "cli", "terminal_view", "evaluation"}
ALLOWED: dict[str, set[str]] = {
    "tensors": set(),
    "config": set(),
    "threads": set(),
    "decoding": {"tensors"},
    "models": set(),
    "checkpoints": {"models", "config"},
    "engine": {"config", "tensors", "threads", "decoding", "models", "checkpoints"},
    "protocol": {"engine.algorithms"},
    "protocol_responses": set(),
    "server": {"config", "protocol", "protocol_responses", "engine", "preflight", "cluster.replicas"},
    "cluster": {"config", "threads", "server"},
}
# Third-party packages confined to one layer: the single-process server never needs Ray, and the
# engine and models never touch HTTP.
CONFINED = {"ray": {"cluster"}, "fastapi": {"server"}, "starlette": {"server"}}


def _imports() -> list[tuple[str, str, str]]:
    """(layer, file, imported module) for every absolute import in the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "dllm_serve":
                    names = [f"dllm_serve.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(layer, str(rel), name) for name in names]
    return out


def test_layers_import_only_what_the_architecture_page_allows() -> None:
    wrong = []
    for layer, file, module in _imports():
        if not module.startswith("dllm_serve.") or layer in ENTRY_POINTS:
            continue
        target = module.removeprefix("dllm_serve.")
        if target.split(".")[0] == layer:
            continue
        allowed = ALLOWED[layer]
        if not any(target == a or target.startswith(a + ".") for a in allowed):
            wrong.append(f"{file} imports {module}")
    assert not wrong, wrong


def test_heavy_dependencies_stay_in_their_layer() -> None:
    wrong = [
        f"{file} imports {module}"
        for layer, file, module in _imports()
        if module.split(".")[0] in CONFINED and layer not in CONFINED[module.split(".")[0]]
    ]
    assert not wrong, wrong


def test_every_layer_is_in_the_table() -> None:
    layers = {layer for layer, _, _ in _imports()} | {
        p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or p.is_dir()
    }
    layers -= {"__init__", "__pycache__"}
    assert layers <= set(ALLOWED) | ENTRY_POINTS, layers - set(ALLOWED) - ENTRY_POINTS


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _module_graph() -> dict[str, set[str]]:
    """dllm_serve module -> the dllm_serve modules it imports (``from pkg import mod`` is ``pkg.mod``)."""
    files = {_module_of(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
                targets = [n if n in files else node.module for n in names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


# Import cycles the suite tolerates (none today; add one only with the reason it cannot be broken).
KNOWN_CYCLES: set[tuple[str, str]] = set()


def test_no_import_cycles() -> None:
    graph = _module_graph()
    for a, b in KNOWN_CYCLES:
        graph[a].discard(b)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], module, target]))
            elif target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles

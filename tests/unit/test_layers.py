"""The import rules of docs/architecture.md ("Layers and what each may import"), read from the source.

Every ``import`` statement counts, including those inside functions. A change that needs a new
edge changes this table and the page together.
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
    "models": {"tensors", "config", "engine.algorithms"},
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

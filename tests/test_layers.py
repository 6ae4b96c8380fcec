"""The import graph of `serve` points one way: api → engine → runtime.

Every module of `serve` is placed in one layer below; a module may import its own layer,
any layer under it, and the leaves (text utilities, the error types), never one above it.
Leaves import only leaves. `serve` never imports `export` (the exporter is an offline tool;
the server reads only what it wrote to disk). A new module fails this test until it is
placed, so the table stays the map of the package (docs/architecture.md draws it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SERVE = Path(__file__).resolve().parent.parent / "serve"

API, ENGINE, RUNTIME, LEAF = "api", "engine", "runtime", "leaf"
RANK = {API: 2, ENGINE: 1, RUNTIME: 0}

LAYERS = {
    # api: HTTP routes, the wire (protocol) models, adapters, SSE, the server's wiring
    "serve.app": API, "serve.main": API, "serve.body": API, "serve.protocol": API,
    "serve.chat_prep": API, "serve.responses": API, "serve.streaming": API,
    "serve.api_responses": API, "serve.api_messages": API, "serve.models": API,
    "serve.response_store": API, "serve.webui": API, "serve.metrics": API,
    "serve.options": API, "serve.fingerprint": API, "serve.tool_protocol": API,
    "serve.param_names": API, "serve.text_parts": API, "serve.scale": API,  # scale-out on Ray Serve: wraps the whole single-process app
    "serve.frontend": API,  # --api-workers: the engine in a process of its own, HTTP workers in front
    "serve.foreign_fields": API,  # another wire format's fields, refused by name
    "serve.request_id": API,  # x-request-id / request-id on every response (ASGI middleware)
    "serve.tool_flags": API,  # tools' allowed_callers / async / boolean flags, checked per route
    # engine: the scheduler, sequences, sampling, constraints and the events it sends
    "serve.engine": ENGINE, "serve.events": ENGINE, "serve.sequence": ENGINE,
    "serve.sampling": ENGINE, "serve.constraints": ENGINE, "serve.tool_grammar": ENGINE,
    "serve.prefix_cache": ENGINE, "serve.speculative": ENGINE, "serve.draft_model": ENGINE,
    "serve.unique_keys": ENGINE,  # structured outputs: no object repeats a key (a mask beside the grammar)
    # runtime: ONNX Runtime sessions and KV slots, and the model directory they read
    "serve.runtime": RUNTIME, "serve.model_dir": RUNTIME,
    "serve.runtime.device_sampling": RUNTIME,  # token choice on the device (an ONNX graph)
    # leaves any layer may use: text utilities, the error types and their SSE framing
    "serve.tokenizer": LEAF, "serve.chat_template": LEAF, "serve.token_bytes": LEAF,
    "serve.detokenizer": LEAF, "serve.stops": LEAF, "serve.parsers": LEAF,
    "serve.errors": LEAF, "serve.sse": LEAF, "serve.jsonfile": LEAF,
}


def layer(module: str) -> str | None:
    """The layer of `module` or of the package above it that the table names."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:n]))
        if found:
            return found
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(SERVE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, nested and type-only ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if f"{base}.{alias.name}" in LAYERS]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(SERVE.rglob("*.py")):
        me = module_name(path)
        mine = LEAF if me == "serve" else layer(me)
        if mine is None:
            out.append(f"{me}: not placed in a layer (add it to tests/test_layers.py LAYERS)")
            continue
        for line, target in imports(path):
            where = f"{path.relative_to(SERVE.parent)}:{line}"
            if target == "export" or target.startswith("export."):
                out.append(f"{where}: serve imports {target}")
                continue
            if not target.startswith("serve.") or target == "serve":
                continue
            theirs = layer(target)
            if theirs is None:
                continue  # `from serve import webui` names the module in the alias (above)
            if mine == LEAF and theirs != LEAF:
                out.append(f"{where}: leaf {me} imports {target} ({theirs})")
            elif mine != LEAF and theirs != LEAF and RANK[theirs] > RANK[mine]:
                out.append(f"{where}: {me} ({mine}) imports {target} ({theirs}), a layer above")
    return out


def test_serve_layers_point_one_way():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: an engine module importing a route is reported."""
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "sampling.py").write_text("from serve.app import create_app\nimport export.graph\n")
    (tmp_path / "serve" / "stops.py").write_text("from serve.engine import Engine\n")
    (tmp_path / "serve" / "newthing.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SERVE", tmp_path / "serve")
    found = violations()
    assert any("serve.sampling (engine) imports serve.app (api)" in v for v in found)
    assert any("serve imports export.graph" in v for v in found)
    assert any("leaf serve.stops imports serve.engine" in v for v in found)
    assert any("serve.newthing: not placed" in v for v in found)

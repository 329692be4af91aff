"""The rules of the house, checked: which folder of edge_runtime may import which.

Each folder's `__init__.py` says what lives there and what it may import; RULES below is the
same list, and this test reads every import in the package (module level and inside
functions, since a lazy import is still an arrow; `if TYPE_CHECKING:` blocks excepted, since
they never run) and fails on any arrow the rules do not allow, on any import circle between
modules, and on the third-party imports only one place may make.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edge_runtime"

# Top-level modules are their own units: errors, atomic, signing, tomlconfig (the TOML →
# dataclass loader that config.py and edge_build's recipes share) at the bottom; config above
# serving and model (it reads their config dataclasses); cli at the top.
RULES: dict[str, set[str]] = {
    "errors": set(),
    "atomic": {"errors"},
    "signing": {"atomic", "errors"},
    "tomlconfig": {"errors"},
    "bundle": {"signing", "atomic", "errors"},
    "engines": {"bundle", "atomic", "errors"},
    "model": {"engines", "bundle", "errors"},
    "serving": {"model", "engines", "bundle", "errors"},
    "mqtt": {"errors"},
    "config": {"serving", "model", "tomlconfig", "errors"},
    "offload": {"serving", "mqtt", "config", "errors"},
    "api": {"serving", "offload", "model", "bundle", "config", "errors"},
    "cloud": {"serving", "model", "engines", "bundle", "mqtt", "offload.messages",
              "api.schemas", "config", "errors"},
    "fleet": {"serving", "model", "engines", "bundle", "mqtt", "api.metrics", "config",
              "tomlconfig", "signing", "pki", "atomic", "errors"},
    "rollout": {"fleet.messages", "fleet.slots", "fleet.command_auth", "fleet.audit",
                "fleet.config_update", "fleet.remote_config", "bundle", "mqtt", "signing",
                "config", "pki",
                "atomic", "errors"},
    "sdnotify": set(),  # systemd's notify protocol, called by cli's serve
    "startup": {"engines", "errors"},  # serve's checks before the model loads
    "pki": {"atomic", "errors"},  # the fleet CA and device certificates (ECDSA P-256)
    "doctor": {"engines", "config", "pki", "fleet.remote_config", "errors"},  # only reads
    "cli": {"*"},
    "__main__": {"cli"},  # `python -m edge_runtime` = the edge-runtime command
    "edge_runtime": {"bundle", "model", "errors"},  # the package's public API re-exports
}
# Every unit may read the package's version (edge_runtime/__init__.py).
ANYONE = {"edge_runtime"}

# Third-party packages that only one place may import.
ONLY_HERE = {
    "paho": {"mqtt.client"},
    "fastapi": {"api"},
    "uvicorn": {"cli"},
    "tensorrt": {"engines"},
    "torch": set(),  # never on a device
    "transformers": set(),
}


@dataclass(frozen=True)
class Arrow:
    source: str  # dotted module under edge_runtime, "serving.engine_loop"
    target: str  # dotted module or package under edge_runtime, or a third-party top name
    line: int
    internal: bool


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "edge_runtime"


def arrows(path: Path, modules: set[str]) -> list[Arrow]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    source = module_name(path)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [a.name for a in node.names]
            mod = node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.append(_arrow(source, a.name, [], node.lineno, modules))
            continue
        else:
            continue
        # `from edge_runtime.mqtt import topics` is an arrow to mqtt.topics, not to mqtt.
        subs = [f"{mod}.{n}".removeprefix("edge_runtime.") for n in names]
        subs = [s for s in subs if mod.startswith("edge_runtime") and s in modules]
        if len(subs) < len(names):
            out.append(_arrow(source, mod, names, node.lineno, modules))
        out.extend(Arrow(source, s, node.lineno, True) for s in subs)
    return out


def _arrow(source: str, mod: str, names: list[str], line: int, modules: set[str]) -> Arrow:
    if mod == "edge_runtime" or mod.startswith("edge_runtime."):
        target = mod.removeprefix("edge_runtime").removeprefix(".") or "edge_runtime"
        return Arrow(source, target, line, True)
    return Arrow(source, mod.split(".", maxsplit=1)[0], line, False)


def unit(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def allowed(source: str, target: str) -> bool:
    s, t = unit(source), unit(target)
    if s == t or target in ANYONE:
        return True
    rules = RULES[s]
    return "*" in rules or t in rules or any(
        target == r or target.startswith(r + ".") for r in rules if "." in r
    )


def all_arrows(root: Path = PACKAGE) -> list[Arrow]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return [a for p in files for a in arrows(p, modules)]


def violations(items: list[Arrow]) -> list[str]:
    bad = []
    for a in items:
        if a.internal:
            if not allowed(a.source, a.target):
                bad.append(f"{a.source} imports {a.target} (line {a.line}): "
                           f"{unit(a.source)} may import only {sorted(RULES[unit(a.source)])}")
        elif a.target in ONLY_HERE:
            places = ONLY_HERE[a.target]
            if not any(a.source == p or a.source.startswith(p + ".") for p in places):
                bad.append(f"{a.source} imports {a.target} (line {a.line}): only "
                           f"{sorted(places) or 'nothing in edge_runtime'} may")
    return bad


def circles(items: list[Arrow]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for a in items:
        if a.internal and a.target not in (a.source, "edge_runtime"):
            graph.setdefault(a.source, set()).add(a.target)
    found, state, stack = [], {}, []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                found.append([*stack[stack.index(w):], w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def test_every_unit_has_a_rule_and_every_folder_says_what_it_may_import():
    for child in sorted(PACKAGE.iterdir()):
        if child.name.startswith("_") or child.name == "__pycache__":
            continue
        name = child.stem
        if child.suffix != ".py" and not child.is_dir():
            continue
        assert name in RULES, f"{child} has no entry in RULES"
        if child.is_dir():
            doc = ast.get_docstring(ast.parse((child / "__init__.py").read_text())) or ""
            assert "May import" in doc, f"{child}/__init__.py does not say what it may import"


def test_no_folder_imports_what_its_rules_forbid():
    assert violations(all_arrows()) == []


def test_the_import_graph_has_no_circles():
    assert circles(all_arrows()) == []


def test_the_rules_catch_a_forbidden_import(tmp_path):
    """The checker itself: a serving module that imports offload, a model module that
    imports paho, and two modules that import each other are all reported."""
    pkg = tmp_path / "edge_runtime"
    for folder in ("serving", "offload", "model"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "serving" / "loop.py").write_text("from edge_runtime.offload.client import X\n")
    (pkg / "offload" / "client.py").write_text(
        "def f():\n    from edge_runtime.serving import loop\n")
    (pkg / "model" / "gen.py").write_text("import paho.mqtt.client\n")
    import test_layout

    old = test_layout.PACKAGE
    test_layout.PACKAGE = pkg
    try:
        items = all_arrows(pkg)
        bad = violations(items)
        loops = circles(items)
    finally:
        test_layout.PACKAGE = old
    assert any(b.startswith("serving.loop imports offload.client") for b in bad)
    assert any(b.startswith("model.gen imports paho") for b in bad)
    assert ["offload.client", "serving.loop", "offload.client"] in loops


@pytest.mark.parametrize("module", ["edge_runtime.cloud.worker", "edge_runtime.api.schemas"])
def test_the_cloud_path_does_not_load_fastapi(module):
    import subprocess
    import sys

    code = f"import sys, {module}; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    assert out == "False"


def test_test_modules_have_unique_names():
    """pytest imports test modules by their basename (tests/ folders have no __init__.py):
    two files of one name in two folders stop the whole collection."""
    tests = Path(__file__).resolve().parent
    names: dict[str, list[str]] = {}
    for p in tests.rglob("test_*.py"):
        names.setdefault(p.name, []).append(str(p.relative_to(tests)))
    assert {n: ps for n, ps in names.items() if len(ps) > 1} == {}

"""The hash of this project's own code that a stage runs: part of every stage's cache key.

Tool versions pin torch, ONNX Runtime and friends, but this project's code is installed
editable and its version string does not move when a stage's code does; without this hash a
changed quantizer would silently reuse yesterday's artifact.

What is hashed: the source of the stage's entry modules and of every module of this project
(`edge_build`, `edge_runtime`) they import, transitively — read from the files with `ast`,
so imports inside functions count too (the stages import their heavy helpers lazily), and
nothing is imported to find them. A package's `__init__.py` counts only when something is
imported from it by name: Python runs it before any of its modules, but here the packages'
`__init__`s only re-export (edge_runtime's pulls in the generator, which no model-space stage
calls), and following them would tie every stage to every runtime change. This still
over-approximates — a module imported for one helper puts
all of its bytes into the key, a changed comment reruns the stage — and that is the side to
err on: a spurious rerun costs minutes, a stale artifact ships a wrong model. Third-party
code is not followed; `stage.tool_versions` covers it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_PACKAGES = ("edge_build", "edge_runtime")


@cache
def _package_roots() -> dict[str, Path]:
    """Each project package's directory, from its (light) `__init__` module's file."""
    import importlib

    roots = {}
    for name in PROJECT_PACKAGES:
        module = importlib.import_module(name)
        assert module.__file__ is not None  # a regular package, not a namespace
        roots[name] = Path(module.__file__).parent
    return roots


def module_file(name: str) -> Path | None:
    """The source file of project module `name` (a.b.c → a/b/c.py or a/b/c/__init__.py);
    None for third-party modules and for names that are not modules (a class imported with
    `from a.b import C`)."""
    top, *rest = name.split(".")
    root = _package_roots().get(top)
    if root is None:
        return None
    base = root.joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if rest and candidate.is_file():
            return candidate
    return root / "__init__.py" if not rest else None


def _imports(name: str, path: Path) -> set[str]:
    """Module names `path` imports anywhere in its body (absolute and relative imports;
    `from a import b` yields `a.b` when b is a module, else `a`)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            subs = {f"{base}.{a.name}" for a in node.names}
            modules = {m for m in subs if module_file(m) is not None}
            found.update(modules)
            if len(modules) < len(subs):  # some names are classes or functions of `base`
                found.add(base)
    return found


@cache
def closure(entries: tuple[str, ...]) -> tuple[str, ...]:
    """The project modules `entries` reach by imports, themselves included, sorted."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            if name in entries:
                raise ValueError(f"{name!r} is not a module of {', '.join(PROJECT_PACKAGES)}")
            continue
        seen.add(name)
        todo.extend(_imports(name, path))
    return tuple(sorted(seen))


def code_hash(
    entries: Iterable[str], functions: Iterable[Callable[..., Any]] = ()
) -> dict[str, Any]:
    """{"hash": sha256 (16 hex) of the closure's names and bytes and of `functions`' source,
    "modules": the closure's names}.

    `functions` are hashed by their own source only, imports not followed: the pipeline's
    method that wires a stage (which parameters reach it) belongs to the stage's code, but
    the module holding it imports every stage."""
    modules = closure(tuple(sorted(set(entries))))
    h = hashlib.sha256()
    for name in modules:
        path = module_file(name)
        assert path is not None
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for fn in functions:
        h.update(fn.__qualname__.encode() + b"\0" + inspect.getsource(fn).encode() + b"\0")
    return {"hash": h.hexdigest()[:16], "modules": list(modules)}


__all__ = ["closure", "code_hash", "module_file"]

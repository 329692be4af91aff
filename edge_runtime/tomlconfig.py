"""TOML files into frozen dataclasses: the one loader behind the daemon's config (config.py)
and the offline pipeline's recipes (edge_build/recipe.py).

    read_toml(path, noun)                  file → dict; unreadable or invalid TOML is an error
                                           naming the file
    TableLoader(source, base_dir).build(cls, table, where)
        table → dataclass, field by field, by the field's annotation:
          unknown key                     error naming 'where.key', the file and the known keys
          bool / int / float / str        strict: true is not an int, "80" is not an int;
                                          an int is accepted for a float
          Path                            a non-empty string, ~ expanded, relative to base_dir
                                          (`TableLoader.path` is the hook a caller overrides)
          tuple[T, ...]                   a TOML array, each item checked as T
          X | Y | None                    each non-None arm in turn (TOML has no null: a key
                                          that is absent keeps its default)
          a dataclass                     a sub-table, built the same way ('where.key.sub')
          CliValue                        a value typed on a command line: checked as TOML,
                                          then as its text (`version=1.0` is the string "1.0")
        the dataclass's own checks (__post_init__ raising the loader's error) are re-raised
        with the file named in front

Every error is the caller's exception class (`error=`: ConfigError for the daemon, the
pipeline's RecipeError) and names the key and the file, so one message format serves both.

Why not pydantic (a base dependency): its strict mode on these dataclasses would check the
types, but every message would have to be translated back from its `loc` tuples to name the
key and the file as the CLIs print them, path resolution against the file's directory would
be a validator per Path field anyway, and the dataclasses' own ConfigErrors would come out
wrapped in a ValidationError. The walk over annotations below is shorter than that glue.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson's system Python (JetPack 6) is 3.10
    import tomli as tomllib

__all__ = ["CliValue", "TableLoader", "read_toml", "tomllib"]

_SCALARS: dict[Any, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, str) and v != "",
}


def read_toml(
    path: Path, noun: str = "config file", error: type[Exception] = ConfigError
) -> dict[str, Any]:
    """The file's top-level table; `cannot read {noun} {path}: …` or `{path} is not valid
    TOML: …` otherwise."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise error(f"cannot read {noun} {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path} is not valid TOML: {e}") from e


@dataclass(frozen=True)
class CliValue:
    """A value given on a command line (`--set a.b=v`), parsed as TOML, with its text: a
    string field given `1.0` gets "1.0", not the float TOML reads."""

    parsed: Any
    raw: str


class TableLoader:
    """Builds dataclasses from TOML tables of one file (`source`, for messages)."""

    def __init__(
        self, source: str, base_dir: Path, error: type[Exception] = ConfigError
    ) -> None:
        self.source = source
        self.base_dir = base_dir
        """Relative paths are relative to it (the file's directory)."""
        self.error = error

    def fail(self, message: str) -> Exception:
        return self.error(f"{self.source}: {message}")

    def build(
        self, cls: type[Any], table: Any, where: str = "", skip: frozenset[str] = frozenset()
    ) -> Any:
        """An instance of the dataclass `cls` from `table`; `where` is the table's dotted key
        ("" at the top), `skip` names fields that are not TOML keys."""
        if not isinstance(table, Mapping):
            raise self.fail(f"'{where}' must be a table, got {table!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
        for key in table:
            if key not in names:
                raise self.fail(
                    f"unknown key '{_at(where, key)}' (known here: {', '.join(names)})"
                )
        values = {k: self.coerce(v, hints[k], _at(where, k)) for k, v in table.items()}
        try:
            return cls(**values)
        except self.error as e:  # the dataclass's own range checks: add the file
            raise self.fail(str(e)) from e

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        """`value` checked against the annotation `tp`; paths resolved."""
        if isinstance(value, CliValue):
            try:
                return self.coerce(value.parsed, tp, key)
            except self.error:
                if not isinstance(value.parsed, str):
                    return self.coerce(value.raw, tp, key)  # a string field given 1.0
                raise
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            errors = []
            for arm in (a for a in args if a is not type(None)):  # TOML has no null
                try:
                    return self.coerce(value, arm, key)
                except self.error as e:
                    errors.append(str(e))
            if len(errors) == 1:
                raise self.error(errors[0])
            raise self.fail(f"'{key}' has the wrong type: {value!r}")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)
        if origin is tuple:
            if not isinstance(value, list):
                raise self.fail(f"'{key}' must be a list, got {value!r}")
            return tuple(self.coerce(v, args[0], key) for v in value)
        check = _SCALARS.get(tp)
        if check is None:  # a programming error, not a user's: say which field
            raise TypeError(f"{key}: no TOML reading for the annotation {tp!r}")
        if not check(value):
            raise self.fail(f"'{key}' must be {tp.__name__}, got {value!r}")
        if tp is Path:
            return self.path(value, key)
        return float(value) if tp is float else value

    def path(self, value: str, key: str) -> Path:
        """A path key's value: ~ expanded, relative to `base_dir`."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key

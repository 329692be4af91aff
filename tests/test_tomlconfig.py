"""The shared TOML → dataclass loader (edge_runtime/tomlconfig.py), on its own dataclasses:
every refusal names the key and the file, types are strict, paths resolve against the file's
directory, and the caller's exception class is the one raised."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_runtime.errors import ConfigError, EdgeError
from edge_runtime.tomlconfig import CliValue, TableLoader, read_toml


class OtherError(EdgeError):
    """Stands for a caller's own error class (the pipeline's RecipeError)."""


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    name: str = "x"


@dataclass(frozen=True)
class Outer:
    count: int = 1
    on: bool = False
    where: Path | None = None
    files: tuple[Path, ...] = ()
    ids: str | tuple[int, ...] = "all"
    inner: Inner = field(default_factory=Inner)
    limit: int = 10

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


def load(table: dict[str, object], error: type[Exception] = ConfigError) -> Outer:
    return TableLoader("f.toml", Path("/base"), error).build(Outer, table, "sec")


def test_good_table_is_typed_and_paths_resolved() -> None:
    out = load({"count": 3, "on": True, "where": "~/m", "files": ["a", "/b"], "ids": [1, 2],
                "inner": {"rate": 2, "name": "n"}})
    assert out.count == 3 and out.on is True
    assert out.where == Path("~/m").expanduser()
    assert out.files == (Path("/base/a"), Path("/b"))
    assert out.ids == (1, 2)
    assert out.inner == Inner(rate=2.0, name="n") and isinstance(out.inner.rate, float)
    assert load({}) == Outer()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"cuont": 1}, "f.toml: unknown key 'sec.cuont' (known here: count, on, where,"),
        ({"inner": {"rat": 1}}, "f.toml: unknown key 'sec.inner.rat' (known here: rate, name)"),
        ({"count": "3"}, "f.toml: 'sec.count' must be int, got '3'"),
        ({"count": True}, "f.toml: 'sec.count' must be int, got True"),
        ({"count": 1.5}, "f.toml: 'sec.count' must be int, got 1.5"),
        ({"on": 1}, "f.toml: 'sec.on' must be bool, got 1"),
        ({"inner": {"rate": "fast"}}, "f.toml: 'sec.inner.rate' must be float, got 'fast'"),
        ({"where": ""}, "f.toml: 'sec.where' must be Path, got ''"),
        ({"files": "a"}, "f.toml: 'sec.files' must be a list, got 'a'"),
        ({"files": ["a", 3]}, "f.toml: 'sec.files' must be Path, got 3"),
        ({"ids": 3.5}, "f.toml: 'sec.ids' has the wrong type: 3.5"),
        ({"inner": 3}, "f.toml: 'sec.inner' must be a table, got 3"),
        ({"limit": 0}, "f.toml: limit must be >= 1, got 0"),
    ],
)
def test_refusals_name_the_key_and_the_file(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(table)
    assert str(info.value).startswith(message)


def test_the_callers_error_class_is_raised() -> None:
    with pytest.raises(OtherError, match=r"f\.toml: 'sec\.count' must be int"):
        load({"count": "x"}, OtherError)


def test_cli_values_are_read_as_toml_then_as_text() -> None:
    loader = TableLoader("cli", Path("/base"))
    assert loader.coerce(CliValue(1.0, "1.0"), str, "v") == "1.0"  # version=1.0 is a string
    assert loader.coerce(CliValue(3, "3"), int, "n") == 3
    with pytest.raises(ConfigError, match="cli: 'n' must be int, got 'x'"):
        loader.coerce(CliValue("x", '"x"'), int, "n")


def test_an_unsupported_annotation_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Odd:
        m: dict[str, int] = field(default_factory=dict)

    with pytest.raises(TypeError, match="m: no TOML reading"):
        TableLoader("f.toml", Path("/")).build(Odd, {"m": {}})


def test_read_toml_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[a]\nb = 1\n")
    assert read_toml(good) == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[a\n")
    with pytest.raises(OtherError, match=r"bad\.toml is not valid TOML"):
        read_toml(bad, "recipe", OtherError)
    with pytest.raises(OtherError, match=r"cannot read recipe "):
        read_toml(tmp_path, "recipe", OtherError)  # a directory

"""set-config's file side: validation through config.py's loader, the TOML writer, the diff,
and the old file untouched by a refusal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_runtime.config import load_config
from edge_runtime.errors import ConfigError
from edge_runtime.fleet.config_update import prepare_config, render_toml, write_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_render_reads_back_exactly() -> None:
    table = {"server": {"host": "0.0.0.0", "port": 8001, "api_key": 'q"uote\\\x7f\n'},
             "model": {"pubkeys": ["a.pub", "ü/b.pub"], "threads": 2},
             "offload": {"failure_rate": 0.25, "open_s": 1e-3},
             "odd key": {"x-y": True}}
    assert tomllib.loads(render_toml(table)) == table


def test_keys_merge_validate_diff_and_write(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[server]\nport = 8000\n[model]\npubkeys = ["k.pub"]\n')
    u = prepare_config(path, keys={"server": {"port": 9000}, "log.level": "debug",
                                   "model.bundle": "bundles/b"})
    assert u.changed == {"log.level": ["info", "debug"],
                         "model.bundle": [None, str(tmp_path / "bundles/b")],
                         "server.port": [8000, 9000]}
    assert path.read_text().startswith("[server]\nport = 8000")  # nothing written yet
    write_config(u)
    cfg = load_config(path)
    assert (cfg.server.port, cfg.log.level) == (9000, "debug")
    assert cfg.model.pubkeys == (tmp_path / "k.pub",)  # untouched keys kept, paths resolved


@pytest.mark.parametrize(("kw", "match"), [
    ({"keys": {"server.port": 70000}}, r"server.port must be in \[0, 65535\], got 70000"),
    ({"keys": {"server.nope": 1}}, "unknown key 'server.nope'"),
    ({"keys": {"port": 1}}, "must be 'section.key'"),
    ({"keys": {"a.b.c": 1}}, "must be 'section.key'"),
    ({"toml": "[server]\nport = 'x'"}, "'server.port' must be int"),
    ({"toml": "[[server]]"}, "must be a table"),
    ({}, "exactly one"),
])
def test_refusals_write_nothing(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text("[server]\nport = 8000\n")
    with pytest.raises(ConfigError, match=match):
        prepare_config(path, **kw)  # type: ignore[arg-type]
    assert path.read_text() == "[server]\nport = 8000\n"
